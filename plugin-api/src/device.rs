//! The plain-Rust device trait plugin authors implement, and the guard that
//! turns it into an ABI object without ever letting a panic cross.
//!
//! abi_stable aborts the whole process when a panic reaches an `extern "C"`
//! boundary. A device bug must cost one device, not the remote-host and
//! every other device in it, so every call into author code goes through
//! `catch_unwind` here; after a panic the device is marked failed and every
//! later call returns [`DeviceErrorKind::Failed`].

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RErr, ROk, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec},
};

use crate::abi::{
    DeviceBox, DeviceDesc, DeviceError, DeviceErrorKind, Doorbell, FfiDevice, FfiDevice_TO,
    MirroredRead,
};
use crate::host::Host;

/// A PCI function implemented by a plugin. A plain struct with no knowledge
/// of sockets, processes or threads: the host calls these methods one at a
/// time.
///
/// Rules (see the crate docs for the whole threading model):
/// - BAR and config accesses must return promptly; slow work (disk I/O)
///   goes to a thread the device starts, which completes it and raises the
///   interrupt through [`Host`].
/// - `shutdown` must stop and join any thread the device started.
/// - Guest-controlled values must never cause a panic; but if one happens,
///   the guard contains it.
pub trait Device: Send + 'static {
    /// Identity, BARs and capabilities. Called once after creation.
    fn describe(&self) -> DeviceDesc;

    /// Device-specific configuration reads (beyond the standard header and
    /// declared capabilities). Default: zeros.
    fn config_read(&mut self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }

    /// Notification of a guest configuration write, after the host applied
    /// it to the standard header.
    fn config_write(&mut self, _offset: u16, _data: &[u8]) {}

    /// A guest read in BAR `bar`. `data.len()` is 1, 2, 4 or 8, and the
    /// access lies inside a BAR the device declared (hosts refuse others
    /// before the device sees them: `PciFunction`).
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// A guest write in BAR `bar` (same guarantees as `bar_read`).
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// Function-level reset.
    fn reset(&mut self);

    /// Serializes the device state (for snapshots and restarts).
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        Err("this device does not support saving its state".into())
    }

    /// Restores state from `save_state`.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), String> {
        Err("this device does not support restoring its state".into())
    }

    /// Whether background work is still running.
    fn is_busy(&self) -> bool {
        false
    }

    /// Stops background work; no call follows.
    fn shutdown(&mut self) {}

    /// A device-specific control operation asked for by the VMM's
    /// operator (QMP), not by the guest: e.g. the LSI controller's
    /// `drive-add`. Arguments and result are JSON; [`crate::control::call`]
    /// turns them into the author's own argument and reply types. It runs
    /// between guest accesses (calls never overlap), so it must return
    /// promptly. Default: refuses every `op` with
    /// [`crate::control::unknown`]'s message.
    fn control(
        &mut self,
        op: &str,
        _args: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        Err(crate::control::unknown(op))
    }

    /// Registers the host may answer guest reads of from a mirror, without
    /// a call into the device: in a remote, such a read never leaves the
    /// VMM (no round trip to the device process). Called once, after
    /// [`describe`](Self::describe). Default: none.
    ///
    /// Declare a register only if both hold:
    /// - reading it has no side effect (LSI's ISTAT: yes; DSTAT and SIST,
    ///   which clear on read: no);
    /// - its value changes only during a call into the device (an access,
    ///   a reset, a control operation), or else the device calls
    ///   [`Host::registers_changed`](crate::Host::registers_changed)
    ///   right after changing it from a thread of its own. Raising or
    ///   lowering the interrupt line counts as such a notice already.
    ///
    /// The host refreshes its mirrors by reading the registers through
    /// [`bar_read`](Self::bar_read) after every call and every notice,
    /// and answers from a mirror only while no access or notice is still
    /// unapplied; otherwise the read reaches the device as usual. At most
    /// [`crate::function::MAX_MIRRORS`] registers, each 1, 2 or 4 bytes
    /// inside a declared BAR; hosts ignore the rest, saying so.
    fn mirrored_reads(&self) -> Vec<MirroredRead> {
        Vec::new()
    }

    /// Writes that only ask the device to look for work (a queue notify):
    /// a VMM may deliver them without an exit to itself (KVM ioeventfd),
    /// straight to the device's process, as [`bar_write`](Self::bar_write)
    /// calls of exactly that value and width.
    ///
    /// Declare a write only if all hold:
    /// - its effect is work the device does on its own afterwards, never
    ///   a value the guest reads back at once;
    /// - several of them may be delivered as one (the host coalesces
    ///   doorbells rung before the device took the first), and one may be
    ///   delivered that the guest did not ring (hosts ring each once when
    ///   they place it, so that none is lost across a restart);
    /// - it may be applied after later accesses of the guest (each
    ///   doorbell is applied after every access the guest made before it,
    ///   but an access made after it may overtake it).
    ///
    /// A virtio queue notify (write the queue's index at its notify
    /// address) is the model case. At most [`crate::function::MAX_DOORBELLS`],
    /// each 1, 2, 4 or 8 bytes inside a declared BAR, not overlapping
    /// each other; hosts ignore the rest, saying so. Without a host that
    /// supports them (the test bench, mpqemu, an in-process function) the
    /// writes reach the device as any other access.
    fn doorbells(&self) -> Vec<Doorbell> {
        Vec::new()
    }

    /// Whether a state this device saved stays good after the guest rang
    /// its [`doorbells`](Self::doorbells): `true` promises that
    /// [`restore_state`](Self::restore_state) of a state saved before
    /// some doorbells, in a device whose guest rang them (and saw their
    /// work done) since, finds where it stands in guest RAM by itself,
    /// never repeats work whose completion the guest may have seen, and
    /// does the work still waiting (a virtio device: its ring indexes come
    /// from the used rings, the requests made available since are served,
    /// and each queue's interrupt is raised once).
    ///
    /// A host that keeps devices' states across a crash of their process
    /// (a VMM restarting a remote) then counts only the other accesses
    /// when it decides whether a saved state is still current: a device
    /// the guest only rings comes back as it was, not reset, even when
    /// its process dies in the middle of the guest's I/O.
    fn state_outlives_doorbells(&self) -> bool {
        false
    }
}

/// Constructor of one device kind as [`crate::export_plugin!`] stores it:
/// settings TOML text and host services in, device or error message out.
///
/// An author's constructor may have this signature, or take its settings
/// already deserialized: `fn(S, Host) -> Result<Box<dyn Device>, String>`
/// with `S: serde::de::DeserializeOwned` (see [`crate::settings`]).
pub type DeviceConstructor = fn(&str, Host) -> Result<Box<dyn Device>, String>;

/// What [`crate::export_plugin!`] wraps an author's constructor in, so
/// that one macro takes both kinds of constructor. Method resolution picks
/// the text form ([`TextConstructor`], implemented on `Constructor<F>`)
/// before the typed form ([`TypedConstructor`], on `&Constructor<F>`, one
/// auto-reference further): a trait bound alone could not tell them apart,
/// since `&str` could itself be a settings type as far as inference knows.
#[doc(hidden)]
pub struct Constructor<F>(pub F);

/// A constructor that takes the settings as TOML text.
#[doc(hidden)]
pub trait TextConstructor {
    /// Runs the constructor.
    fn construct(&self, settings: &str, host: Host) -> Result<Box<dyn Device>, String>;
}

impl<F> TextConstructor for Constructor<F>
where
    F: Fn(&str, Host) -> Result<Box<dyn Device>, String>,
{
    fn construct(&self, settings: &str, host: Host) -> Result<Box<dyn Device>, String> {
        (self.0)(settings, host)
    }
}

/// A constructor that takes its settings deserialized into `S`.
#[doc(hidden)]
pub trait TypedConstructor<S> {
    /// Deserializes the settings and runs the constructor.
    fn construct(&self, settings: &str, host: Host) -> Result<Box<dyn Device>, String>;
}

impl<F, S> TypedConstructor<S> for &Constructor<F>
where
    F: Fn(S, Host) -> Result<Box<dyn Device>, String>,
    S: serde::de::DeserializeOwned,
{
    fn construct(&self, settings: &str, host: Host) -> Result<Box<dyn Device>, String> {
        (self.0)(crate::settings::settings(settings)?, host)
    }
}

/// Wraps `device` as an ABI object whose every call is panic-guarded.
pub fn into_ffi(device: Box<dyn Device>) -> DeviceBox {
    FfiDevice_TO::from_value(Guarded::new(device), TD_Opaque)
}

/// Looks `kind` up in `kinds`, runs its constructor with panics caught, and
/// wraps the result. Used by [`crate::export_plugin!`].
pub fn create_guarded(
    kinds: &[(&str, DeviceConstructor)],
    kind: &str,
    settings: &str,
    host: Host,
) -> Result<DeviceBox, String> {
    let Some((_, ctor)) = kinds.iter().find(|(k, _)| *k == kind) else {
        let known: Vec<&str> = kinds.iter().map(|(k, _)| *k).collect();
        return Err(format!(
            "unknown device kind `{kind}` (this plugin provides: {})",
            known.join(", ")
        ));
    };
    match catch_unwind(AssertUnwindSafe(|| ctor(settings, host))) {
        Ok(Ok(dev)) => Ok(into_ffi(dev)),
        Ok(Err(msg)) => Err(msg),
        Err(payload) => Err(format!(
            "device constructor panicked: {}",
            panic_message(payload.as_ref())
        )),
    }
}

/// Text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}

struct Guarded {
    inner: Box<dyn Device>,
    failed: Option<String>,
    /// A panic in `describe`, which takes `&self` and so cannot set
    /// `failed`: the device is failed all the same.
    describe_panic: std::sync::OnceLock<String>,
}

impl Guarded {
    fn new(inner: Box<dyn Device>) -> Self {
        Guarded {
            inner,
            failed: None,
            describe_panic: std::sync::OnceLock::new(),
        }
    }

    /// Why the device failed, if it did.
    fn failed_message(&self) -> Option<&String> {
        self.failed.as_ref().or(self.describe_panic.get())
    }

    /// Runs `f` on the device unless it has failed; a panic marks it failed.
    fn call<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut dyn Device) -> T,
    ) -> Result<T, DeviceError> {
        if let Some(msg) = self.failed_message() {
            return Err(DeviceError::new(DeviceErrorKind::Failed, msg.clone()));
        }
        let inner = &mut self.inner;
        match catch_unwind(AssertUnwindSafe(|| f(inner.as_mut()))) {
            Ok(v) => Ok(v),
            Err(payload) => {
                let msg = format!(
                    "device panicked in {what}: {}",
                    panic_message(payload.as_ref())
                );
                self.failed = Some(msg.clone());
                Err(DeviceError::new(DeviceErrorKind::Panicked, msg))
            }
        }
    }
}

fn to_r<T>(r: Result<T, DeviceError>) -> RResult<T, DeviceError> {
    match r {
        Ok(v) => ROk(v),
        Err(e) => RErr(e),
    }
}

fn check_width(len: usize) -> Result<(), DeviceError> {
    if matches!(len, 1 | 2 | 4 | 8) {
        Ok(())
    } else {
        Err(DeviceError::new(
            DeviceErrorKind::InvalidAccess,
            format!("BAR access of {len} bytes (must be 1, 2, 4 or 8)"),
        ))
    }
}

impl FfiDevice for Guarded {
    fn describe(&self) -> DeviceDesc {
        // `describe` takes `&self` and is called once; a panic here fails
        // the device (hosts check `failure` right after and refuse it) and
        // returns an empty description.
        match catch_unwind(AssertUnwindSafe(|| self.inner.describe())) {
            Ok(d) => d,
            Err(payload) => {
                let _ = self.describe_panic.set(format!(
                    "device panicked in describe: {}",
                    panic_message(payload.as_ref())
                ));
                DeviceDesc {
                    identity: Default::default(),
                    bars: RVec::new(),
                    capabilities: RVec::new(),
                    msi_vectors: 0,
                }
            }
        }
    }

    fn config_read(
        &mut self,
        offset: u16,
        mut data: RSliceMut<'_, u8>,
    ) -> RResult<(), DeviceError> {
        to_r(self.call("config_read", |d| d.config_read(offset, &mut data)))
    }

    fn config_write(&mut self, offset: u16, data: RSlice<'_, u8>) -> RResult<(), DeviceError> {
        to_r(self.call("config_write", |d| d.config_write(offset, &data)))
    }

    fn bar_read(
        &mut self,
        bar: u8,
        offset: u64,
        mut data: RSliceMut<'_, u8>,
    ) -> RResult<(), DeviceError> {
        if let Err(e) = check_width(data.len()) {
            return RErr(e);
        }
        to_r(self.call("bar_read", |d| d.bar_read(bar, offset, &mut data)))
    }

    fn bar_write(
        &mut self,
        bar: u8,
        offset: u64,
        data: RSlice<'_, u8>,
    ) -> RResult<(), DeviceError> {
        if let Err(e) = check_width(data.len()) {
            return RErr(e);
        }
        to_r(self.call("bar_write", |d| d.bar_write(bar, offset, &data)))
    }

    fn reset(&mut self) -> RResult<(), DeviceError> {
        to_r(self.call("reset", |d| d.reset()))
    }

    fn save_state(&mut self) -> RResult<RVec<u8>, DeviceError> {
        let r = self.call("save_state", |d| d.save_state()).and_then(|r| {
            r.map(RVec::from)
                .map_err(|m| DeviceError::new(DeviceErrorKind::Unsupported, m))
        });
        to_r(r)
    }

    fn restore_state(&mut self, state: RSlice<'_, u8>) -> RResult<(), DeviceError> {
        let r = self
            .call("restore_state", |d| d.restore_state(&state))
            .and_then(|r| r.map_err(|m| DeviceError::new(DeviceErrorKind::Other, m)));
        to_r(r)
    }

    fn is_busy(&self) -> bool {
        self.failed.is_none()
            && catch_unwind(AssertUnwindSafe(|| self.inner.is_busy())).unwrap_or(false)
    }

    fn shutdown(&mut self) {
        // A failed device may be in any state; still let it try to stop
        // its threads, but contain a second panic.
        let inner = &mut self.inner;
        let _ = catch_unwind(AssertUnwindSafe(|| inner.shutdown()));
    }

    fn failure(&self) -> ROption<RString> {
        self.failed_message().cloned().map(RString::from).into()
    }

    fn mirrored_reads(&self) -> RVec<MirroredRead> {
        if self.failed_message().is_some() {
            return RVec::new();
        }
        catch_unwind(AssertUnwindSafe(|| self.inner.mirrored_reads()))
            .map(RVec::from)
            .unwrap_or_default()
    }

    fn doorbells(&self) -> RVec<Doorbell> {
        if self.failed_message().is_some() {
            return RVec::new();
        }
        catch_unwind(AssertUnwindSafe(|| self.inner.doorbells()))
            .map(RVec::from)
            .unwrap_or_default()
    }

    fn state_outlives_doorbells(&self) -> bool {
        self.failed_message().is_none()
            && catch_unwind(AssertUnwindSafe(|| self.inner.state_outlives_doorbells()))
                .unwrap_or(false)
    }

    fn control(&mut self, op: RStr<'_>, args: RStr<'_>) -> RResult<RString, DeviceError> {
        // Parsed here, outside the device: bad JSON never reaches it.
        let args: serde_json::Value = match serde_json::from_str(args.as_str()) {
            Ok(v) => v,
            Err(e) => {
                return RErr(DeviceError::new(
                    DeviceErrorKind::InvalidAccess,
                    format!("control `{op}`: arguments are not JSON: {e}"),
                ))
            }
        };
        let op = op.as_str();
        let r = self
            .call("control", |d| d.control(op, &args))
            .and_then(|r| {
                r.map(|v| RString::from(v.to_string()))
                    .map_err(|m| DeviceError::new(DeviceErrorKind::Other, m))
            });
        to_r(r)
    }
}

#[cfg(test)]
#[allow(clippy::panic)] // a device that panics on purpose
mod tests {
    use super::*;
    use serde_json::json;

    /// A device whose `describe` panics: failed from the start, never a
    /// 0000:0000 function that looks fine.
    struct BadDescribe;

    impl Device for BadDescribe {
        fn describe(&self) -> DeviceDesc {
            panic!("no identity today")
        }
        fn bar_read(&mut self, _bar: u8, _offset: u64, _data: &mut [u8]) {}
        fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
        fn reset(&mut self) {}
    }

    #[test]
    fn a_panic_in_describe_fails_the_device() {
        let mut dev = into_ffi(Box::new(BadDescribe));
        let _ = dev.describe();
        let why = dev.failure().into_option().map(|s| s.into_string());
        assert_eq!(
            why.as_deref(),
            Some("device panicked in describe: no identity today")
        );
        let mut data = [0u8; 4];
        let r = dev.bar_read(0, 0, RSliceMut::from_mut_slice(&mut data));
        assert!(
            matches!(r, RErr(ref e) if e.kind == DeviceErrorKind::Failed),
            "later calls are refused"
        );
        #[cfg(feature = "host")]
        {
            let r = crate::function::PciFunction::new(into_ffi(Box::new(BadDescribe)));
            match r {
                Err(e) => assert!(e.contains("panicked in describe"), "{e}"),
                Ok(_) => panic!("a device whose describe panicked was accepted"),
            }
        }
    }

    struct Dev {
        with_control: bool,
    }

    impl Device for Dev {
        fn describe(&self) -> DeviceDesc {
            DeviceDesc {
                identity: Default::default(),
                bars: RVec::new(),
                capabilities: RVec::new(),
                msi_vectors: 0,
            }
        }
        fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
        fn reset(&mut self) {}
        fn control(
            &mut self,
            op: &str,
            args: &serde_json::Value,
        ) -> Result<serde_json::Value, String> {
            match op {
                _ if !self.with_control => {
                    Err(format!("this device has no control operation `{op}`"))
                }
                "echo" => Ok(json!({"args": args})),
                "refuse" => Err("no, because".into()),
                _ => panic!("control panicked on `{op}`"),
            }
        }
    }

    fn control(dev: &mut DeviceBox, op: &str, args: &str) -> Result<String, DeviceError> {
        dev.control(RStr::from_str(op), RStr::from_str(args))
            .into_result()
            .map(RString::into_string)
    }

    #[test]
    fn control_crosses_the_abi_as_json_text() {
        let mut dev = into_ffi(Box::new(Dev { with_control: true }));
        let v: serde_json::Value =
            serde_json::from_str(&control(&mut dev, "echo", r#"{"scsi-id": 1}"#).expect("echo"))
                .expect("json");
        assert_eq!(v, json!({"args": {"scsi-id": 1}}));
        let e = control(&mut dev, "refuse", "{}").expect_err("refused");
        assert_eq!(
            (e.kind, e.message.as_str()),
            (DeviceErrorKind::Other, "no, because")
        );
        let e = control(&mut dev, "echo", "{not json").expect_err("bad JSON");
        assert_eq!(e.kind, DeviceErrorKind::InvalidAccess);
        assert!(dev.failure().is_none(), "refusals do not fail the device");
    }

    #[test]
    fn control_panic_fails_the_device() {
        let mut dev = into_ffi(Box::new(Dev { with_control: true }));
        let e = control(&mut dev, "explode", "null").expect_err("panic");
        assert_eq!(e.kind, DeviceErrorKind::Panicked);
        assert!(
            e.message.contains("control panicked on `explode`"),
            "{}",
            e.message
        );
        assert!(dev.failure().is_some());
        let mut b = [0u8; 4];
        let r = dev
            .bar_read(0, 0, RSliceMut::from_mut_slice(&mut b))
            .into_result();
        assert_eq!(r.map_err(|e| e.kind), Err(DeviceErrorKind::Failed));
        let e = control(&mut dev, "echo", "{}").expect_err("failed");
        assert_eq!(e.kind, DeviceErrorKind::Failed);
    }

    #[test]
    fn control_default_refuses_by_name() {
        struct Plain;
        impl Device for Plain {
            fn describe(&self) -> DeviceDesc {
                Dev {
                    with_control: false,
                }
                .describe()
            }
            fn bar_read(&mut self, _: u8, _: u64, _: &mut [u8]) {}
            fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
            fn reset(&mut self) {}
        }
        let mut dev = into_ffi(Box::new(Plain));
        let e = control(&mut dev, "drive-add", "{}").expect_err("no control");
        assert_eq!(
            e.message.as_str(),
            "this device has no control operation `drive-add`"
        );
    }
}
