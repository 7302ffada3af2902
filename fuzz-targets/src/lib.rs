//! # fuzz-targets: bytes in, the real code out
//!
//! Each target takes arbitrary bytes and feeds them through the code that
//! takes the same input from another trust domain in production, never a
//! copy of it:
//!
//! | target | what reads the bytes |
//! |---|---|
//! | [`vfio_user`] | `channel::vfio_user::serve_connection` over remote-host's vfio-user `Adapter` of a real LSI53C895A device, on a socket, with fds attached |
//! | [`vfio_user_client`] | the VMM's `channel::vfio_user::VfioUserClient`, every call the VMM makes, answered by a hostile server |
//! | [`mpqemu`] | `channel::mpqemu::serve_connection` over remote-host's mpqemu `Adapter`, likewise |
//! | [`mpqemu_client`] | the VMM's `channel::mpqemu::MpqemuClient`, every call its proxy makes, answered by a hostile remote |
//! | [`control`] | `remote_host::control::Control::run` (and so `channel::control::serve_control`) with an LSI controller |
//! | [`qmp`] | `qmp::Server`: a monitor client's bytes (greeting, negotiation, framing, dispatch, argument checks), events emitted meanwhile |
//! | [`config`] | `config::Config::parse` and `parse_devices` |
//! | [`lsi`] | the LSI53C895A plugin in `plugin_api::harness::TestBench`: register and configuration accesses, guest RAM the SCRIPTS run from, SCSI commands to a disk |
//! | [`lsi_state`] | the LSI53C895A plugin's `restore_state` (a state blob another process wrote), then the restored controller |
//!
//! A target panics (the fuzzer's crash) when the code under test panics,
//! including a panic the plugin guard caught (a device that reports
//! itself failed afterwards), or when one device access takes longer than
//! [`ACCESS_LIMIT`]. Each returns once the input is consumed: every
//! server runs until the peer's end of the stream.
//!
//! The fuzzer (`fuzz/`, `scripts/fuzz`) calls these from libFuzzer; the
//! tests in `tests/corpus.rs` replay the committed corpus
//! (`fuzz/corpus/<target>/`) through the same functions under `cargo
//! test`. `docs/security.md` says what is fuzzed and what was found.

use std::time::{Duration, Instant};

pub mod seeds;
mod wire;

mod config_target;
mod control_target;
mod lsi_state_target;
mod lsi_target;
mod mpqemu_client_target;
mod mpqemu_target;
mod qmp_target;
mod vfio_user_client_target;
mod vfio_user_target;

pub use config_target::config;
pub use control_target::control;
pub use lsi_state_target::{lsi_state, lsi_state_verdict};
pub use lsi_target::lsi;
pub use mpqemu_client_target::mpqemu_client;
pub use mpqemu_target::mpqemu;
pub use qmp_target::qmp;
pub use vfio_user_client_target::vfio_user_client;
pub use vfio_user_target::vfio_user;

/// The longest one guest-facing call (a BAR access, a message served)
/// may take before the target reports it as a stall. Generous: the
/// bound is about runaway work (a SCRIPTS loop inside one access), not
/// speed, and the replay and the short fuzz run happen in CI on a loaded
/// 2-core machine (a budgeted SCRIPTS run takes milliseconds; runaway work
/// takes seconds per access, as issue 11 measured: 11 s).
pub const ACCESS_LIMIT: Duration = Duration::from_secs(8);

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target, by the name its corpus directory and fuzz binary have.
pub const TARGETS: &[(&str, Target)] = &[
    ("vfio_user", vfio_user),
    ("vfio_user_client", vfio_user_client),
    ("mpqemu", mpqemu),
    ("mpqemu_client", mpqemu_client),
    ("control", control),
    ("config", config),
    ("qmp", qmp),
    ("lsi", lsi),
    ("lsi_state", lsi_state),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// Runs `f`, panicking when it takes longer than [`ACCESS_LIMIT`].
pub(crate) fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = f();
    let took = start.elapsed();
    assert!(
        took <= ACCESS_LIMIT,
        "{what} took {took:?}, more than {ACCESS_LIMIT:?}"
    );
    r
}

/// Reads fixed-size fields off the front of a fuzz input; missing bytes
/// read as zero, so every input means something.
pub(crate) struct Input<'a> {
    rest: &'a [u8],
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Input { rest: data }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub(crate) fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.rest.len());
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        head
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    pub(crate) fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.take(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_le_bytes(b)
    }

    pub(crate) fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.take(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }
}

/// An LSI53C895A controller (the plugin linked, not loaded: two plugins
/// cannot be linked into one binary, so every target uses this one), built
/// as remote-host builds a config device: `settings` is its TOML, relative
/// paths in it resolve in `base_dir`.
pub(crate) fn lsi_device(
    id: &str,
    settings: &str,
    base_dir: &std::path::Path,
) -> std::sync::Arc<remote_host::devices::RemoteDevice> {
    let plugin = plugin_api::loader::LoadedPlugin::linked(lsi53c895a::plugin_module());
    let spec = remote_host::devices::DeviceSpec {
        id: id.into(),
        plugin: "lsi53c895a".into(),
        kind: None,
        slot: 4,
        settings: settings.into(),
        base_dir: base_dir.to_path_buf(),
    };
    match remote_host::devices::create_from(&spec, &plugin) {
        Ok(d) => std::sync::Arc::new(d),
        Err(e) => panic!("cannot create lsi53c895a: {e}"),
    }
}

/// Panics when `dev`'s plugin failed (a panic the guard caught is a bug
/// all the same: guest- or peer-controlled input must never panic).
pub(crate) fn assert_not_failed(dev: &remote_host::devices::RemoteDevice) {
    if let Some(why) = dev.function().failure() {
        panic!("device `{}` failed: {why}", dev.id);
    }
}

/// A protocol adapter of remote-host, with every call timed ([`timed`])
/// and the device checked after it ([`assert_not_failed`]): what the
/// protocol targets serve instead of the bare adapter.
pub(crate) struct Checked<A> {
    pub(crate) inner: A,
    pub(crate) dev: std::sync::Arc<remote_host::devices::RemoteDevice>,
}

impl<A> Checked<A> {
    pub(crate) fn call<T>(&mut self, what: &str, f: impl FnOnce(&mut A) -> T) -> T {
        let r = timed(what, || f(&mut self.inner));
        assert_not_failed(&self.dev);
        r
    }
}
