//! `host run CONFIG`: boot the VM a config describes.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "host",
    about = "KVM VMM with out-of-process PCI devices",
    version
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boots the VM described by CONFIG and runs it until the guest powers
    /// off or reboots. Exit code: 0 guest powered off or rebooted, 1 VMM
    /// error, 2 guest kernel panic, 3 guest reset without saying why.
    Run {
        /// The TOML config ([vm], [[remote]], [[device]]).
        config: PathBuf,
        /// ID=N: remote ID is already running on the other end of the
        /// connected socket this process inherited as fd N (e.g. QEMU's
        /// `-machine x-remote` started with the other end of a socketpair,
        /// for a `protocol = "mpqemu"` remote). Nothing is spawned for it.
        /// Repeatable.
        #[arg(long = "remote-fd", value_name = "ID=N", value_parser = parse_remote_fd)]
        remote_fd: Vec<(String, i32)>,
        /// Serve the QMP monitor on this UNIX socket (overrides the
        /// config's `[vm] qmp`); see docs/qmp.md.
        #[arg(long, value_name = "PATH")]
        qmp: Option<PathBuf>,
        /// Start from a migration stream instead of booting: `file:PATH`
        /// (a snapshot QMP `migrate` wrote), or `tcp:HOST:PORT` /
        /// `unix:PATH` to listen on for a live migration; the source runs
        /// the same config (docs/migration.md). `defer`: wait, stopped,
        /// for QMP `migrate-incoming URI` (devices the source hot-added
        /// are added with `device_add` first).
        #[arg(long, value_name = "URI", value_parser = host::snapshot::uri::Incoming::parse)]
        incoming: Option<host::snapshot::uri::Incoming>,
    },
}

fn parse_remote_fd(s: &str) -> Result<(String, i32), String> {
    let (id, fd) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected ID=FD"))?;
    let fd: i32 = fd
        .parse()
        .map_err(|_| format!("`{s}`: `{fd}` is not an fd number"))?;
    if id.is_empty() {
        return Err(format!("`{s}`: empty remote id"));
    }
    Ok((id.to_owned(), fd))
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        // Colour codes only for a person at a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run {
            config,
            remote_fd,
            qmp,
            incoming,
        } => match host::vm::run(&config, &remote_fd, qmp.as_deref(), incoming.as_ref()) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("host: {e:#}");
                host::exit::code::ERROR
            }
        },
    };
    std::process::exit(code);
}
