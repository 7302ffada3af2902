//! `remote-host`: serves the devices of one `[[remote]]` of a VM config.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use config::{Config, Protocol};
use plugin_api::loader;
use remote_host::devices;

#[derive(Parser)]
#[command(
    version,
    about = "Generic device process: loads device plugins and serves their PCI functions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Lists the plugins found, with their versions and device kinds.
    Plugins {
        /// Extra plugin directories (searched first).
        #[arg(long = "plugin-dir")]
        plugin_dirs: Vec<PathBuf>,
    },
    /// Creates the devices of one remote and reports each, then exits.
    Check {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        remote: String,
        #[arg(long = "plugin-dir")]
        plugin_dirs: Vec<PathBuf>,
    },
    /// Writes a new plugin crate to start from, outside any workspace:
    /// a device with one register BAR, a setting, a control operation,
    /// and tests run linked and from the .so (docs/plugins.md).
    NewPlugin {
        /// The plugin's name, also its crate's (its library is
        /// lib<NAME with - as _>.so): lowercase letters, digits and `-`.
        name: String,
        /// Where to write it (default: ./NAME); must not exist or be empty.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The plugin-api to depend on: the path of its crate directory,
        /// or a version. Default: the checkout this remote-host was built
        /// in, when it runs from that checkout's target/, else this
        /// remote-host's plugin-api version (the ABI it loads).
        #[arg(long = "plugin-api")]
        plugin_api: Option<String>,
    },
    /// Serves the devices of one remote on a socket or an inherited fd.
    Serve {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        remote: String,
        /// Listen on this UNIX socket path.
        #[arg(long, conflicts_with = "fd")]
        socket: Option<PathBuf>,
        /// Serve an inherited, connected socket fd.
        #[arg(long)]
        fd: Option<i32>,
        /// An inherited, connected socket for the control channel (ping,
        /// device-add/del/control). The process exits when it reaches EOF.
        /// With it, a remote may start with no device.
        #[arg(long)]
        control: Option<i32>,
        /// Wire protocol (default: the remote's `protocol`, else vfio-user).
        #[arg(long)]
        protocol: Option<Protocol>,
        /// Log file (default: the remote's `log`, else standard error).
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long = "plugin-dir")]
        plugin_dirs: Vec<PathBuf>,
        /// Busy-poll window (µs) before sleeping on a channel, adapted to
        /// the traffic; 0 sleeps at once (for hosts with few spare cores).
        #[arg(long, default_value_t = 50)]
        poll_us: u64,
        /// Do not enter the seccomp sandbox (see `sandbox = false` in the
        /// remote's config; the sandbox refuses exec, network sockets,
        /// ptrace, mounts and the like once the devices are built).
        #[arg(long)]
        no_sandbox: bool,
        /// Do not enter the jail (see `jail = false` in the remote's
        /// config: its own namespaces and a file view of its config's,
        /// plugins' and libraries' directories only).
        #[arg(long)]
        no_jail: bool,
        /// Standby: get ready (config, log, jail), then wait on this
        /// inherited fd before building the devices: one byte starts
        /// serving, end of file exits. What a VMM keeps ahead of a
        /// restart, so that the restart does not wait for a process to
        /// start.
        #[arg(long)]
        standby: Option<i32>,
        /// A user id (besides this process's own and root) whose processes
        /// may connect to `--socket` (repeatable). Others are refused at
        /// accept, by their SO_PEERCRED.
        #[arg(long = "allow-uid")]
        allow_uids: Vec<u32>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("remote-host: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn load_remote(config: &Path, remote: &str) -> anyhow::Result<Config> {
    let cfg = Config::load_devices(config)?;
    if cfg.remote(remote).is_none() {
        let known: Vec<&str> = cfg.remotes.iter().map(|r| r.id.as_str()).collect();
        anyhow::bail!(
            "{}: no [[remote]] with id `{remote}` (defined: {})",
            config.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    Ok(cfg)
}

/// Enters the jail (`jail`: `None` where the machine allows, `Some(true)`
/// required, `Some(false)` off) with the remote's view: its config's
/// directory and socket directory read-write, its plugin directories (and
/// those of plugins named by path) and the system's libraries read-only.
fn enter_jail(
    jail: Option<bool>,
    user: Option<&str>,
    cfg: &Config,
    remote: &str,
    plugin_dirs: &[PathBuf],
    socket: Option<&Path>,
) -> anyhow::Result<()> {
    use remote_host::jail::{self, Identity, JailError, View, SYSTEM_LIBRARIES};
    if jail == Some(false) {
        if user.is_some() {
            anyhow::bail!("remote `{remote}`: `user` needs the jail (`jail = false` is set)");
        }
        return Ok(());
    }
    // A change of user is never skipped: it makes the jail required.
    let required = jail == Some(true) || user.is_some();
    let identity = user
        .map(Identity::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("remote `{remote}`: {e}"))?;
    let mut view = View {
        read_write: vec![cfg.base_dir.clone()],
        read_only: plugin_dirs.to_vec(),
    };
    // The socket directory (made later, inside the jail, if missing).
    if let Some(s) = socket {
        let dir = if s.is_dir() { Some(s) } else { s.parent() };
        view.read_write.extend(dir.map(Path::to_path_buf));
    }
    for d in cfg.devices_of_remote(remote) {
        if config::is_plugin_path(&d.plugin) {
            view.read_only
                .extend(Path::new(&d.plugin).parent().map(Path::to_path_buf));
        }
        view.read_write.extend(jail::paths_in_settings(&d.settings));
    }
    view.read_only
        .extend(SYSTEM_LIBRARIES.iter().map(PathBuf::from));
    match jail::enter(&view, identity) {
        Ok(e) => {
            let shown: Vec<String> = e
                .visible
                .iter()
                .map(|(p, w)| format!("{}{}", p.display(), if *w { " (rw)" } else { "" }))
                .collect();
            tracing::info!(
                user_namespace = e.user_namespace,
                user = user.unwrap_or("unchanged"),
                "jail: own mount, network and IPC namespaces; visible: {}",
                shown.join(", ")
            );
            Ok(())
        }
        Err(e @ (JailError::Unshare { .. } | JailError::NoBase)) if !required => {
            tracing::warn!("jail not entered ({e}); set `jail = false` to silence this");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("remote `{remote}`: {e}")),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Plugins { plugin_dirs } => {
            let mut dirs = plugin_dirs;
            dirs.extend(loader::default_dirs());
            let mut bad = 0;
            for (path, result) in loader::scan(&dirs) {
                match result {
                    Ok(p) => println!(
                        "{}\t{}\t{}\t{}",
                        p.name,
                        p.version,
                        p.kinds.join(","),
                        path.display()
                    ),
                    Err(e) => {
                        bad += 1;
                        println!("!error\t{e}");
                    }
                }
            }
            if bad > 0 {
                eprintln!(
                    "remote-host: {bad} file(s) could not be loaded (listed as !error); \
                     rebuild or remove them"
                );
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            config,
            remote,
            plugin_dirs,
        } => {
            remote_host::logging::init(None)?;
            let cfg = load_remote(&config, &remote)?;
            let dirs = devices::plugin_dirs(&cfg, &remote, &plugin_dirs);
            let (ok, failed) = devices::build(&cfg, &remote, &dirs);
            for d in &ok {
                let f = d.function();
                let id = f.description().identity;
                println!(
                    "ok\t{}\t{}@{}\t{:04x}:{:04x}\tslot {}",
                    d.id, d.plugin_name, d.plugin_version, id.vendor_id, id.device_id, d.slot
                );
            }
            for f in &failed {
                println!("failed\t{}\t{}", f.id, f.message);
            }
            Ok(if failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::NewPlugin {
            name,
            dir,
            plugin_api,
        } => {
            let api = match plugin_api {
                Some(a) => remote_host::new_plugin::PluginApi::parse(&a)?,
                None => remote_host::new_plugin::PluginApi::default_for_this_host(),
            };
            let dir = dir.unwrap_or_else(|| PathBuf::from(&name));
            remote_host::new_plugin::write(&name, &dir, &api)?;
            println!(
                "created plugin `{name}` in {} (plugin-api: {api})",
                dir.display()
            );
            println!(
                "next: cd {} && cargo test && cargo build && remote-host plugins --plugin-dir target/debug",
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            config,
            remote,
            socket,
            fd,
            control,
            protocol,
            log,
            plugin_dirs,
            poll_us,
            no_sandbox,
            no_jail,
            standby,
            allow_uids,
        } => {
            remote_host::sockets::allow_peer_uids(&allow_uids);
            let cfg = load_remote(&config, &remote)?;
            let rcfg = cfg.remote(&remote).cloned();
            let log = log.or_else(|| rcfg.as_ref().and_then(|r| r.log.clone()));
            remote_host::logging::init(log.as_deref())?;
            let protocol = protocol
                .or_else(|| rcfg.as_ref().map(|r| r.protocol))
                .unwrap_or(Protocol::VfioUser);
            // mpqemu carries no MSI-X: its devices are presented without.
            devices::set_msix(protocol != Protocol::Mpqemu);
            // Absolute paths: in the jail the current directory may be `/`.
            let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let dirs: Vec<PathBuf> = devices::plugin_dirs(&cfg, &remote, &plugin_dirs)
                .into_iter()
                .map(absolute)
                .collect();
            let socket = socket.map(absolute);
            // Before the devices: their plugins start threads, and
            // namespaces are per process only while it has one.
            let jail = if no_jail {
                Some(false)
            } else {
                rcfg.as_ref().and_then(|r| r.jail)
            };
            let user = rcfg.as_ref().and_then(|r| r.user.as_deref());
            enter_jail(jail, user, &cfg, &remote, &dirs, socket.as_deref())?;
            if let Some(fd) = standby {
                tracing::info!(remote = %remote, "standby: ready, waiting to be started");
                if !remote_host::standby::wait(fd)? {
                    tracing::info!("standby: released unused; exiting");
                    return Ok(ExitCode::SUCCESS);
                }
                tracing::info!("standby: started");
            }
            let (devs, failed) = devices::build(&cfg, &remote, &dirs);
            tracing::info!(
                remote = %remote,
                protocol = protocol.name(),
                devices = devs.len(),
                failed = failed.len(),
                "remote-host ready"
            );
            // The devices exist (their plugins are loaded, their threads
            // started): from here on the process only needs what serving
            // them takes.
            if !no_sandbox && rcfg.as_ref().is_none_or(|r| r.sandbox) {
                remote_host::sandbox::enter()?;
                tracing::info!("sandbox: seccomp filter installed on every thread");
            }
            let endpoint = match (socket, fd) {
                (Some(path), _) => Some(remote_host::sockets::Endpoint::Socket {
                    path,
                    devices_in_config: cfg.devices_of_remote(&remote).count(),
                }),
                (None, Some(n)) => Some(remote_host::sockets::Endpoint::Fd(n)),
                (None, None) if control.is_some() && devs.is_empty() => None,
                (None, None) => anyhow::bail!("serve needs --socket PATH or --fd N"),
            };
            let dialect = remote_host::dialect::Dialect::new(
                protocol,
                std::time::Duration::from_micros(poll_us),
            );
            // Before any thread that may post to it (the control thread).
            remote_host::main_thread::init();
            let control_thread = match control {
                None => None,
                Some(n) => {
                    let sock = remote_host::control::inherited_socket(n)?;
                    // Paths in device-add are relative to the config's directory.
                    let base_dir = cfg.base_dir.clone();
                    let ctl =
                        remote_host::control::Control::new(&devs, dirs, base_dir, dialect.clone())
                            .with_posted_writes(rcfg.as_ref().is_some_and(|r| r.posted_writes));
                    let t =
                        std::thread::Builder::new()
                            .name("control".into())
                            .spawn(move || {
                                if let Err(e) = ctl.run(sock) {
                                    tracing::error!("control channel: {e}");
                                }
                                // The VMM is gone (EOF) or unreachable: so is
                                // the reason to run.
                                tracing::info!("control channel closed; exiting");
                                std::process::exit(0);
                            })?;
                    Some(t)
                }
            };
            // With --control and nothing to serve from the config, the
            // devices come by device-add: only the control channel runs.
            let endpoint = endpoint.filter(|_| !devs.is_empty() || control_thread.is_none());
            // The devices are served on a thread of their own: the first
            // thread stays free for what only it can do (its parent-death
            // signal, `main_thread`).
            let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let serving = match endpoint {
                Some(endpoint) => {
                    let failed = failed.clone();
                    Some(
                        std::thread::Builder::new()
                            .name("serve".into())
                            .spawn(move || {
                                let r =
                                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                        dialect.serve(devs, endpoint)
                                    }));
                                let why = match r {
                                    Ok(Ok(())) => return,
                                    Ok(Err(e)) => format!("{e:#}"),
                                    Err(_) => "the serving thread panicked".to_string(),
                                };
                                tracing::error!("serving the config's devices: {why}");
                                failed.store(true, std::sync::atomic::Ordering::Release);
                            })?,
                    )
                }
                None => None,
            };
            // The config's devices may be gone (their client left, e.g.
            // after device_del, or a connected --fd was handed to another
            // VMM's connection) while devices reached over the control
            // channel are still served: with a control channel, it decides
            // when to exit. Serving that fails ends the process, as before.
            remote_host::main_thread::run_tasks_until(|| {
                failed.load(std::sync::atomic::Ordering::Acquire)
                    || match &control_thread {
                        Some(t) => t.is_finished(),
                        None => serving.as_ref().is_none_or(|s| s.is_finished()),
                    }
            });
            if failed.load(std::sync::atomic::Ordering::Acquire) {
                anyhow::bail!("serving the config's devices failed (see the log)");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
