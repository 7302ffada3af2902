//! `testenv`: prepares and drives the real-guest test environment.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;
use testenv::{Env, InitramfsSpec, ModuleOrder, NestedOptions, QemuKind, RunOptions};

#[derive(Parser)]
#[command(about = "Real-guest test environment (kernel, busybox, QEMU peers, runners)")]
struct Cli {
    /// Cache directory (default: $TESTENV_DIR or <workspace>/target/testenv).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Qemu {
    Debian12,
    Sid,
}

#[derive(clap::Args)]
struct JobArgs {
    /// Kernel modules (comma-separated or repeated); `lsi` = the LSI disk set.
    #[arg(long, value_delimiter = ',')]
    modules: Vec<String>,
    /// Load the modules exactly in the given order (no dependency resolution).
    #[arg(long)]
    exact: bool,
    /// Job shell script file.
    #[arg(long, conflicts_with = "script")]
    job: Option<PathBuf>,
    /// Job shell script text.
    #[arg(long)]
    script: Option<String>,
    /// Keep kernel messages on the console during the job.
    #[arg(long)]
    verbose_kernel: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fetch and unpack everything (each step skipped when cached).
    Prepare,
    /// Print the paths of the prepared environment.
    Info,
    /// Build a job initramfs.
    Initramfs {
        #[command(flatten)]
        job: JobArgs,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Boot a job initramfs under TCG and print the job output.
    Run {
        #[command(flatten)]
        job: JobArgs,
        /// QEMU to use.
        #[arg(long, value_enum, default_value = "debian12")]
        qemu: Qemu,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Time limit in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Print the whole console, not only the job output.
        #[arg(long)]
        console: bool,
        /// Extra QEMU arguments.
        #[arg(last = true)]
        qemu_args: Vec<String>,
    },
    /// Unpack the prepared kernel's ELF vmlinux (for `host`'s ELF boot).
    Vmlinux {
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Run a command on this machine's root inside a nested-KVM L1 guest.
    Nested {
        /// Time limit in seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// L1 RAM in MiB.
        #[arg(long, default_value_t = 3072)]
        memory: u32,
        /// L1 vCPUs.
        #[arg(long, default_value_t = 2)]
        smp: u32,
        /// Print the whole L1 console, not only the command output.
        #[arg(long)]
        console: bool,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn spec(j: &JobArgs) -> Result<InitramfsSpec> {
    let job = match (&j.job, &j.script) {
        (Some(f), _) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, Some(s)) => s.clone(),
        (None, None) => "echo hello from the guest; uname -a".into(),
    };
    let mut modules = Vec::new();
    for m in &j.modules {
        if m == "lsi" {
            modules.extend(testenv::LSI_MODULES.iter().map(|s| s.to_string()));
        } else {
            modules.push(m.clone());
        }
    }
    let mut s = InitramfsSpec::new(&modules, &job);
    s.order = if j.exact {
        ModuleOrder::Exact
    } else {
        ModuleOrder::ResolveDeps
    };
    s.verbose_kernel = j.verbose_kernel;
    Ok(s)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let dir = cli.dir.clone().unwrap_or_else(testenv::testenv_dir);
    match cli.cmd {
        Cmd::Prepare => {
            testenv::prepare(&dir)?;
        }
        Cmd::Info => {
            let env = Env::load(&dir)?;
            println!("{env:#?}");
        }
        Cmd::Vmlinux { output } => {
            let env = Env::load(&dir)?;
            testenv::vmlinux::extract_vmlinux(&env.kernel, &output)?;
            eprintln!("{} -> {}", env.kernel.display(), output.display());
        }
        Cmd::Initramfs { job, output } => {
            let env = Env::load(&dir)?;
            let mods = env.build_initramfs(&spec(&job)?, &output)?;
            for m in mods {
                eprintln!("module {}", m.display());
            }
            eprintln!("wrote {}", output.display());
        }
        Cmd::Run {
            job,
            qemu,
            memory,
            timeout,
            console,
            qemu_args,
        } => {
            let env = Env::load(&dir)?;
            let opts = RunOptions {
                qemu: match qemu {
                    Qemu::Debian12 => QemuKind::Debian12,
                    Qemu::Sid => QemuKind::Sid,
                },
                name: "cli-run".into(),
                memory_mib: memory,
                timeout: Duration::from_secs(timeout),
                extra_args: qemu_args,
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let r = env.run_job(&spec(&job)?, &opts)?;
            print!("{}", if console { &r.console } else { &r.output });
            eprintln!(
                "testenv: job status {} after {:.1} s",
                r.status,
                t.elapsed().as_secs_f64()
            );
            std::process::exit(r.status);
        }
        Cmd::Nested {
            timeout,
            memory,
            smp,
            console,
            command,
        } => {
            let env = Env::load(&dir)?;
            let opts = NestedOptions {
                timeout: Duration::from_secs(timeout),
                memory_mib: memory,
                smp,
                ..Default::default()
            };
            let t = std::time::Instant::now();
            let r = env.run_nested(&command, &opts)?;
            print!("{}", if console { &r.console } else { &r.output });
            eprintln!(
                "testenv: nested status {} after {:.1} s",
                r.status,
                t.elapsed().as_secs_f64()
            );
            std::process::exit(r.status);
        }
    }
    Ok(())
}
