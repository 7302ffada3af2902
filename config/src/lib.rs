//! The VM configuration file: one schema, one parser, read by both `host`
//! (the VMM) and `remote-host` (the device process).
//!
//! ```toml
//! [vm]
//! memory = "512M"
//! vcpus = 1
//! kernel = "vmlinuz"
//! initrd = "initrd.img"
//! cmdline = "console=ttyS0"
//! # console-log = "console.log"   # else the console goes to stdout
//! # qmp = "qmp.sock"              # QMP monitor socket (or host run --qmp)
//! # on-reboot = "restart"         # or "exit" (QEMU's -no-reboot)
//! # acpi = true                   # ACPI tables and PM registers (power
//! #                               # off, power button, reset, pvpanic)
//!
//! [[remote]]
//! id = "storage"
//! log = "storage.log"
//! # socket = "/run/vm/storage"   # connect to an orchestrator's remote
//! # protocol = "vfio-user"       # or "mpqemu"
//! # plugin-dirs = ["plugins"]
//! # heartbeat-ms = 250           # supervision: period ...
//! # timeout-ms = 1000            # ... and how long any wait may take
//! # sandbox = true               # remote-host's seccomp filter
//! # jail = true                  # its own namespaces and file view
//! # user = "nobody"              # run as (a remote started as root)
//! # restart = "on-failure"       # or "always"; default "never"
//! # restart-limit = 5            # automatic restarts per minute
//! # standby = true               # keep a replacement process started
//! # memory-max = "512M"          # limits, through a cgroup of its own:
//! # cpu-percent = 150            # CPU time (150: one and a half CPUs)
//! # tasks-max = 64               # threads at once
//!
//! [[device]]
//! id = "lsi0"
//! remote = "storage"       # or: in-process = true
//! plugin = "lsi53c895a"
//! slot = 4
//! # every other key (and sub-table) of a [[device]] belongs to its plugin:
//! [[device.drive]]
//! file = "disk.img"
//! scsi-id = 0
//! ```
//!
//! Every error names the file, line and column of the offending key or
//! value. Every relative path, a plugin given as a path included, is
//! relative to the config file's directory, made absolute when the file
//! is read ([`base_dir_of`], [`resolve_path`], [`resolve_plugin`]).

mod reader;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use reader::TableReader;
use toml_edit::{DocumentMut, ImDocument, Item, Table};

/// A position in a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// Errors loading a config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid or not what the schema allows.
    #[error("{location}: {message}")]
    Invalid { location: Location, message: String },
}

impl ConfigError {
    /// Where the error is, when it has a position.
    pub fn location(&self) -> Option<&Location> {
        match self {
            ConfigError::Invalid { location, .. } => Some(location),
            ConfigError::Read { .. } => None,
        }
    }
}

/// Maps byte offsets of one file to lines and columns.
pub(crate) struct SourceMap {
    file: PathBuf,
    text: String,
}

impl SourceMap {
    fn location(&self, offset: usize) -> Location {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before.get(line_start..).unwrap_or("").chars().count() + 1;
        Location {
            file: self.file.clone(),
            line,
            column,
        }
    }

    pub(crate) fn error(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        ConfigError::Invalid {
            location: self.location(span.map_or(0, |s| s.start)),
            message,
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// The directory every relative path in it resolves against: the
    /// file's, absolute ([`base_dir_of`] when it was read).
    pub base_dir: PathBuf,
    /// `[vm]`: always there in a config read by [`Config::load`] (the
    /// VMM's); `None` when [`Config::load_devices`] read a file that has
    /// only remotes and devices (what `remote-host` needs).
    pub vm: Option<VmConfig>,
    pub remotes: Vec<RemoteConfig>,
    pub devices: Vec<DeviceConfig>,
}

/// `[vm]`: the guest machine.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub memory_bytes: u64,
    pub vcpus: u8,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Where the serial console goes; `None` means standard output.
    pub console_log: Option<PathBuf>,
    /// QMP monitor socket, if any.
    pub qmp: Option<PathBuf>,
    /// What a guest reboot or a QMP `system_reset` does (`on-reboot`).
    pub on_reboot: OnReboot,
    /// ACPI (`acpi`, default true): tables, PM registers, pvpanic. Off,
    /// the guest has the MP table only and the VM ends on what its
    /// console says ("reboot: Power down", "Kernel panic").
    pub acpi: bool,
}

/// `[vm] on-reboot`: what a reset of the machine does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnReboot {
    /// Restart the guest from the kernel entry (QEMU's default).
    #[default]
    Restart,
    /// End the VM (QEMU's `-no-reboot`).
    Exit,
}

impl std::str::FromStr for OnReboot {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "restart" => Ok(OnReboot::Restart),
            "exit" => Ok(OnReboot::Exit),
            other => Err(format!(
                "`on-reboot` must be \"restart\" or \"exit\", found \"{other}\""
            )),
        }
    }
}

/// `[[remote]] restart`: what the VMM does when the remote dies or hangs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Leave it failed (its devices read all-ones) until the operator's
    /// `remote-restart`. The default while a restart still shows the guest
    /// reset devices (their state does not survive the process yet).
    #[default]
    Never,
    /// Replace it when it dies other than by exiting 0, or hangs.
    OnFailure,
    /// Replace it whenever it ends or hangs while the VM runs.
    Always,
}

impl std::str::FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(RestartPolicy::Never),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "always" => Ok(RestartPolicy::Always),
            other => Err(format!(
                "`restart` must be \"never\", \"on-failure\" or \"always\", found \"{other}\""
            )),
        }
    }
}

impl RestartPolicy {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            RestartPolicy::Never => "never",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
        }
    }
}

/// The wire protocol spoken on a remote's channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    VfioUser,
    Mpqemu,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::VfioUser => "vfio-user",
            Protocol::Mpqemu => "mpqemu",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vfio-user" => Ok(Protocol::VfioUser),
            "mpqemu" => Ok(Protocol::Mpqemu),
            other => Err(format!(
                "unknown protocol `{other}` (expected vfio-user or mpqemu)"
            )),
        }
    }
}

/// `[[remote]]`: one device process.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    pub id: String,
    /// Connect to this socket (made by an orchestrator) instead of spawning.
    pub socket: Option<PathBuf>,
    pub protocol: Protocol,
    /// Log file of the remote process.
    pub log: Option<PathBuf>,
    /// Extra directories searched for plugins.
    pub plugin_dirs: Vec<PathBuf>,
    /// Heartbeat period, milliseconds.
    pub heartbeat_ms: u64,
    /// How long any wait on this remote may take, milliseconds.
    pub timeout_ms: u64,
    /// Whether `remote-host` confines itself with its seccomp filter once
    /// its devices are built (default true; see remote-host's `sandbox`).
    pub sandbox: bool,
    /// `jail`: whether `remote-host` enters its own mount, network and
    /// IPC namespaces with a file view of its config's directory, plugin
    /// and library directories only (remote-host's `jail` module). `None`
    /// (not set): where the machine allows, with a warning where not;
    /// `true`: required (the remote fails to start without); `false`: off.
    pub jail: Option<bool>,
    /// `user`: a user (`name`, `uid` or `uid:gid`) the remote becomes once
    /// jailed; needs the remote to start as root.
    pub user: Option<String>,
    /// Whether BAR accesses to this remote's devices go through the
    /// shared-memory access ring (`fast-path`, default true) when the
    /// remote is ours (spawned, with a control channel); otherwise, and
    /// for any other peer, over the socket.
    pub fast_path: bool,
    /// Whether the writes a device declares as doorbells (a virtio queue
    /// notify) reach the remote through KVM ioeventfds, with no exit to
    /// the VMM (`doorbells`, default true; needs the fast path).
    pub doorbells: bool,
    /// `posted-writes` (default false): `remote-host` tells each device
    /// that the BAR writes its access ring delivers are posted (no vCPU
    /// waits for them: `plugin_api::control::POSTED_WRITES`), so a device
    /// may run the work they start inline (the LSI runs a disk command on
    /// the ring thread, with no I/O worker wakeup). Off by default: in
    /// this project's nested environment it raised the rate of lost L2
    /// guests under heavy I/O (docs/benchmarks.md); needs the fast path.
    pub posted_writes: bool,
    /// `restart`: automatic replacement of a remote that died or hung.
    pub restart: RestartPolicy,
    /// `restart-limit`: automatic restarts allowed within a minute; one
    /// more failure in that minute leaves the remote failed.
    pub restart_limit: u32,
    /// `standby` (default true): with `restart` other than `"never"`, a
    /// second `remote-host` is kept started ahead (config read, jail
    /// entered, devices not built), so that a restart does not wait for
    /// a process to start; `false` saves that process.
    pub standby: bool,
    /// Resource limits of a spawned remote's process, each applied through
    /// a cgroup of its own (`memory-max`, `cpu-percent`, `tasks-max`; none
    /// by default). See the VMM's `remote::cgroup`.
    pub limits: ResourceLimits,
    pub location: Location,
}

/// `[[remote]]` resource limits; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `memory-max` ("64M", "1G"): the most memory the process may be
    /// charged for; past it the kernel reclaims, then kills the remote
    /// (a death supervision handles like any other).
    pub memory_bytes: Option<u64>,
    /// `cpu-percent`: CPU time per period, in percent of one CPU (150 is
    /// one and a half CPUs).
    pub cpu_percent: Option<u32>,
    /// `tasks-max`: threads the process may have at once.
    pub tasks: Option<u32>,
}

impl ResourceLimits {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        *self != ResourceLimits::default()
    }
}

/// Where a device runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// In the `[[remote]]` with this id.
    Remote(String),
    /// Inside the VMM process.
    InProcess,
}

/// `[[device]]`: one PCI function.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub id: String,
    pub placement: Placement,
    /// Plugin name, or the path of a plugin library (made absolute: see
    /// [`resolve_plugin`]).
    pub plugin: String,
    /// Device kind inside the plugin; `None` means the plugin's only kind.
    pub kind: Option<String>,
    /// PCI slot on bus 0 (1..=31).
    pub slot: u8,
    /// The device's own settings, as TOML text, for its plugin alone.
    pub settings: String,
    /// Directory relative paths in `settings` are relative to (the
    /// config's [`base_dir`](Config::base_dir), absolute).
    pub base_dir: PathBuf,
    pub location: Location,
}

impl Config {
    /// Reads and validates `path` as a whole VM: `[vm]` is required.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(&read(path)?, path)
    }

    /// Reads and validates `path` for the remotes and devices it defines:
    /// `[vm]` may be missing (a file written for one `remote-host`), and is
    /// validated like any other table when present.
    pub fn load_devices(path: &Path) -> Result<Config, ConfigError> {
        Config::parse_devices(&read(path)?, path)
    }

    /// Validates `text` as if read from `path` (a whole VM: `[vm]` required).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_with(text, path, true)
    }

    /// Validates `text` as if read from `path`, `[vm]` optional.
    pub fn parse_devices(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::parse_with(text, path, false)
    }

    fn parse_with(text: &str, path: &Path, need_vm: bool) -> Result<Config, ConfigError> {
        let src = SourceMap {
            file: path.to_owned(),
            text: text.to_owned(),
        };
        let doc = ImDocument::parse(text.to_owned())
            .map_err(|e| src.error(e.span(), e.message().trim().to_owned()))?;
        let base_dir = base_dir_of(path);
        let resolve = |p: String| -> PathBuf { resolve_path(&base_dir, p) };

        let mut root = TableReader::new(doc.as_table(), &src, "the config".into());
        let vm = match root.table.get("vm") {
            Some(Item::Table(t)) => Some(parse_vm(
                TableReader::new(t, &src, "[vm]".into()),
                &resolve,
            )?),
            Some(other) => {
                return Err(src.error(other.span(), "`vm` must be a table ([vm])".into()))
            }
            None if need_vm => {
                return Err(src.error(
                    Some(0..0),
                    "missing [vm] section (the VM needs at least `memory` and `kernel`)".into(),
                ))
            }
            None => None,
        };

        let mut remotes: Vec<RemoteConfig> = Vec::new();
        for (i, t) in tables_of(&root, "remote")?.into_iter().enumerate() {
            let r = parse_remote(
                TableReader::new(t, &src, format!("[[remote]] #{}", i + 1)),
                &resolve,
            )?;
            if remotes.iter().any(|o| o.id == r.id) {
                return Err(src.error(
                    t.get("id").and_then(Item::span),
                    format!("duplicate remote id `{}`", r.id),
                ));
            }
            remotes.push(r);
        }

        let mut devices: Vec<DeviceConfig> = Vec::new();
        for (i, t) in tables_of(&root, "device")?.into_iter().enumerate() {
            let d = parse_device(
                TableReader::new(t, &src, format!("[[device]] #{}", i + 1)),
                &base_dir,
            )?;
            let id_span = t.get("id").and_then(Item::span);
            if devices.iter().any(|o| o.id == d.id) {
                return Err(src.error(id_span, format!("duplicate device id `{}`", d.id)));
            }
            if let Some(o) = devices.iter().find(|o| o.slot == d.slot) {
                return Err(src.error(
                    t.get("slot").and_then(Item::span),
                    format!(
                        "device `{}` uses slot {} which device `{}` already uses",
                        d.id, d.slot, o.id
                    ),
                ));
            }
            if let Placement::Remote(r) = &d.placement {
                if !remotes.iter().any(|o| &o.id == r) {
                    return Err(src.error(
                        t.get("remote").and_then(Item::span),
                        format!(
                            "device `{}` names remote `{r}`, which no [[remote]] defines",
                            d.id
                        ),
                    ));
                }
            }
            devices.push(d);
        }
        root.mark_used(&["vm", "remote", "device"]);
        root.deny_unknown()?;
        Ok(Config {
            path: path.to_owned(),
            base_dir,
            vm,
            remotes,
            devices,
        })
    }

    /// The remote with `id`.
    pub fn remote(&self, id: &str) -> Option<&RemoteConfig> {
        self.remotes.iter().find(|r| r.id == id)
    }

    /// The devices placed in remote `id`.
    pub fn devices_of_remote<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a DeviceConfig> {
        self.devices
            .iter()
            .filter(move |d| matches!(&d.placement, Placement::Remote(r) if r == id))
    }
}

/// The directory relative paths in the config file `path` resolve
/// against: the file's directory, made absolute against the current
/// directory now (without touching the file system), so that the paths
/// mean the same in every process that reads them, whatever its current
/// directory later (a remote-host, a QMP command long after start).
pub fn base_dir_of(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// `p` if it is absolute, else `p` under `base_dir`: the one rule for every
/// path a config (or a QMP command of the VM it describes) names.
pub fn resolve_path(base_dir: &Path, p: impl AsRef<Path>) -> PathBuf {
    let p = p.as_ref();
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// Whether a `plugin` value names a library file rather than a plugin
/// to look up by name in the plugin directories: it contains `/` or ends
/// in `.so` (the rule `plugin_api::loader::find` applies).
pub fn is_plugin_path(plugin: &str) -> bool {
    plugin.contains('/') || plugin.ends_with(".so")
}

/// A `plugin` value as the loader should get it: a path (see
/// [`is_plugin_path`]) resolved against `base_dir`, a name as it is.
pub fn resolve_plugin(base_dir: &Path, plugin: &str) -> String {
    if is_plugin_path(plugin) {
        resolve_path(base_dir, plugin)
            .to_string_lossy()
            .into_owned()
    } else {
        plugin.to_owned()
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn tables_of<'a>(root: &TableReader<'a>, key: &str) -> Result<Vec<&'a Table>, ConfigError> {
    match root.table.get(key) {
        None => Ok(Vec::new()),
        Some(Item::ArrayOfTables(a)) => Ok(a.iter().collect()),
        Some(other) => Err(root.error(
            other.span().or_else(|| root.key_span(key)),
            format!("`{key}` must be an array of tables ([[{key}]])"),
        )),
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => return None,
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(mult)
}

fn parse_vm(
    mut t: TableReader<'_>,
    resolve: &dyn Fn(String) -> PathBuf,
) -> Result<VmConfig, ConfigError> {
    let mem = t.string("memory")?;
    let memory_bytes = parse_size(&mem.value)
        .filter(|&m| (16 << 20..=64 << 30).contains(&m))
        .ok_or_else(|| {
            t.error(
                mem.span.clone(),
                format!(
                    "`memory` must be a size like \"512M\" or \"2G\" between 16M and 64G, found \"{}\"",
                    mem.value
                ),
            )
        })?;
    let vcpus = t.integer_in("vcpus", 1..=64, Some(1))?.value as u8;
    let kernel = resolve(t.string("kernel")?.value);
    let initrd = t.opt_string("initrd")?.map(|s| resolve(s.value));
    let cmdline = t
        .opt_string("cmdline")?
        .map_or_else(|| "console=ttyS0".to_owned(), |s| s.value);
    let console_log = t.opt_string("console-log")?.map(|s| resolve(s.value));
    let qmp = t.opt_string("qmp")?.map(|s| resolve(s.value));
    let on_reboot = match t.opt_string("on-reboot")? {
        None => OnReboot::default(),
        Some(v) => v.value.parse().map_err(|m| t.error(v.span.clone(), m))?,
    };
    let acpi = t.opt_bool("acpi")?.is_none_or(|b| b.value);
    t.deny_unknown()?;
    Ok(VmConfig {
        memory_bytes,
        vcpus,
        kernel,
        initrd,
        cmdline,
        console_log,
        qmp,
        on_reboot,
        acpi,
    })
}

fn parse_id(t: &mut TableReader<'_>) -> Result<String, ConfigError> {
    let id = t.string("id")?;
    let ok = !id.value.is_empty()
        && id.value.len() <= 64
        && id
            .value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !ok {
        return Err(t.error(
            id.span,
            format!(
                "id `{}` must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
                id.value
            ),
        ));
    }
    Ok(id.value)
}

fn parse_remote(
    mut t: TableReader<'_>,
    resolve: &dyn Fn(String) -> PathBuf,
) -> Result<RemoteConfig, ConfigError> {
    let location = t.src.location(t.span().map_or(0, |s| s.start));
    let id = parse_id(&mut t)?;
    let socket = t.opt_string("socket")?.map(|s| resolve(s.value));
    let protocol = match t.opt_string("protocol")? {
        None => Protocol::VfioUser,
        Some(p) => p.value.parse().map_err(|m| t.error(p.span.clone(), m))?,
    };
    let log = t.opt_string("log")?.map(|s| resolve(s.value));
    let plugin_dirs = t
        .string_list("plugin-dirs")?
        .into_iter()
        .map(|s| resolve(s.value))
        .collect();
    let heartbeat_ms = t.integer_in("heartbeat-ms", 10..=60_000, Some(250))?.value as u64;
    let timeout_ms = t.integer_in("timeout-ms", 10..=600_000, Some(1000))?.value as u64;
    let sandbox = t.opt_bool("sandbox")?.is_none_or(|b| b.value);
    let jail = t.opt_bool("jail")?.map(|b| b.value);
    let user = match t.opt_string("user")? {
        Some(u) if u.value.trim().is_empty() => {
            return Err(t.error(
                u.span.clone(),
                "user must name a user, a uid or uid:gid".into(),
            ))
        }
        u => u.map(|u| u.value),
    };
    let fast_path = t.opt_bool("fast-path")?.is_none_or(|b| b.value);
    let doorbells = t.opt_bool("doorbells")?.is_none_or(|b| b.value);
    let posted_writes = t.opt_bool("posted-writes")?.is_some_and(|b| b.value);
    let restart = match t.opt_string("restart")? {
        None => RestartPolicy::default(),
        Some(v) => v.value.parse().map_err(|m| t.error(v.span.clone(), m))?,
    };
    let restart_limit = t.integer_in("restart-limit", 1..=100, Some(5))?.value as u32;
    let standby = t.opt_bool("standby")?.is_none_or(|b| b.value);
    let limits = parse_limits(&mut t)?;
    t.deny_unknown()?;
    Ok(RemoteConfig {
        id,
        socket,
        protocol,
        log,
        plugin_dirs,
        heartbeat_ms,
        timeout_ms,
        sandbox,
        jail,
        user,
        fast_path,
        doorbells,
        posted_writes,
        restart,
        restart_limit,
        standby,
        limits,
        location,
    })
}

fn parse_limits(t: &mut TableReader<'_>) -> Result<ResourceLimits, ConfigError> {
    let memory_bytes = match t.opt_string("memory-max")? {
        None => None,
        Some(m) => Some(
            parse_size(&m.value)
                .filter(|&b| (16 << 20..=1 << 40).contains(&b))
                .ok_or_else(|| {
                    t.error(
                        m.span.clone(),
                        format!(
                            "`memory-max` must be a size from 16M to 1024G such as \"256M\", found \"{}\"",
                            m.value
                        ),
                    )
                })?,
        ),
    };
    let cpu_percent = t
        .opt_integer_in("cpu-percent", 1..=100_000)?
        .map(|c| c.value as u32);
    let tasks = t
        .opt_integer_in("tasks-max", 8..=100_000)?
        .map(|c| c.value as u32);
    Ok(ResourceLimits {
        memory_bytes,
        cpu_percent,
        tasks,
    })
}

fn parse_device(mut t: TableReader<'_>, base_dir: &Path) -> Result<DeviceConfig, ConfigError> {
    let location = t.src.location(t.span().map_or(0, |s| s.start));
    let id = parse_id(&mut t)?;
    let plugin = resolve_plugin(base_dir, &t.string("plugin")?.value);
    let kind = t.opt_string("kind")?.map(|s| s.value);
    let slot = t.integer_in("slot", 1..=31, None)?.value as u8;
    let remote = t.opt_string("remote")?;
    let in_process = t.opt_bool("in-process")?;
    let placement = match (remote, in_process) {
        (Some(r), None | Some(Spanned { value: false, .. })) => Placement::Remote(r.value),
        (None, Some(Spanned { value: true, .. })) => Placement::InProcess,
        (Some(r), Some(Spanned { value: true, .. })) => {
            return Err(t.error(
                r.span,
                format!("device `{id}` sets both `remote` and `in-process = true`; choose one"),
            ))
        }
        (None, _) => {
            return Err(t.error(
                t.span(),
                format!("device `{id}` needs `remote = \"ID\"` or `in-process = true`"),
            ))
        }
    };
    // Everything else is the plugin's: copy it into a document of its own.
    let mut settings = DocumentMut::new();
    for key in t.unused_keys() {
        if let Some(item) = t.table.get(key) {
            settings.insert(key, item.clone());
        }
    }
    Ok(DeviceConfig {
        id,
        placement,
        plugin,
        kind,
        slot,
        settings: settings.to_string(),
        base_dir: base_dir.to_owned(),
        location,
    })
}

use reader::Spanned;

#[cfg(test)]
mod tests;
