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
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HOST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run { config } => match host::vm::run(&config) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("host: {e:#}");
                host::exit::code::ERROR
            }
        },
    };
    std::process::exit(code);
}
