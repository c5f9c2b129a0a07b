//! The `memvisor` command.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use memory::ByteSize;
use std::sync::Arc;
use vmm::config::RunFile;
use vmm::{Vm, VmConfig, VmExit, VmIo};

#[derive(Parser, Debug)]
#[command(
    name = "memvisor",
    version,
    about = "A minimal KVM VMM with a built-in memory manager"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot one VM. With no arguments, boots the default guest from target/guest/.
    Run(RunArgs),
    /// Talk to a running memvisor through its API socket.
    Ctl(vmm::ctl::CtlArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Kernel image (ELF vmlinux or bzImage). Default: the default guest's vmlinux.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk. Default: the default guest's initramfs when --kernel is not given.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (replaces the default).
    #[arg(long, value_name = "STRING")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    cpus: Option<u8>,
    /// Guest RAM, e.g. 128M or 1G.
    #[arg(long, value_name = "SIZE")]
    memory: Option<ByteSize>,
    /// Add a virtio-balloon device; options: deflate_on_oom=on|off, free_page_reporting=on|off,
    /// stats_interval_s=N (comma separated).
    #[arg(long, value_name = "OPTIONS", num_args = 0..=1, default_missing_value = "",
          value_parser = vmm::config::parse_balloon_options)]
    balloon: Option<balloon::BalloonConfig>,
    /// Serve the REST API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Read the flags from a JSON or TOML file; flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Let host KSM merge this VM's identical pages (turns KSM on while the VM runs).
    #[arg(long)]
    mergeable: bool,
    /// Back guest RAM with transparent huge pages (default: on).
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    thp: Option<bool>,
    /// Add a virtio-mem device with a hotplug region of SIZE (placed above RAM); options:
    /// block_size=SIZE (default 2M), slot_size=SIZE (default 128M), comma separated.
    #[arg(long, value_name = "SIZE[,OPTIONS]", value_parser = vmm::config::parse_hotplug_options)]
    hotplug: Option<hotplug::VirtioMemConfig>,
    /// Directory for the VM's swap file (default: the API socket's directory, else the current
    /// directory). The file is created at the first swap request and removed at exit.
    #[arg(long, value_name = "DIR")]
    swap_dir: Option<PathBuf>,
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("expected on or off, got '{s}'")),
    }
}

/// Where the default guest lives: `$MEMVISOR_GUEST_DIR`, else `target/guest` under the current
/// directory, else next to this executable's `target/` directory.
fn default_guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MEMVISOR_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let local = PathBuf::from("target/guest");
    if local.join("vmlinux").exists() {
        return local;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|t| t.join("guest")))
        .filter(|d| d.join("vmlinux").exists())
        .unwrap_or(local)
}

/// The file's values, then the flags over them.
fn build_config(args: RunArgs, file: RunFile, guest_dir: &Path) -> (VmConfig, Option<PathBuf>) {
    let kernel = args.kernel.or(file.kernel);
    let mut config = match kernel {
        Some(kernel) => VmConfig::new(kernel),
        None => VmConfig::default_guest(guest_dir),
    };
    if let Some(initrd) = args.initrd.or(file.initrd) {
        config.initrd = Some(initrd);
    }
    if let Some(cmdline) = args.cmdline.or(file.cmdline) {
        config.cmdline = Some(cmdline);
    }
    if let Some(cpus) = args.cpus.or(file.cpus) {
        config.cpus = cpus;
    }
    if let Some(memory) = args.memory.or(file.memory) {
        config.memory = memory;
    }
    if let Some(balloon) = args.balloon.or(file.balloon) {
        config.balloon = Some(balloon);
    }
    if args.mergeable || file.mergeable == Some(true) {
        config.mergeable = true;
    }
    if let Some(thp) = args.thp.or(file.thp) {
        config.thp = thp;
    }
    if let Some(hotplug) = args.hotplug.or(file.hotplug) {
        config.hotplug = Some(hotplug);
    }
    let api_socket = args.api_socket.or(file.api_socket);
    config.swap_dir = args.swap_dir.or(file.swap_dir).or_else(|| {
        api_socket
            .as_deref()
            .and_then(Path::parent)
            .filter(|d| !d.as_os_str().is_empty())
            .map(Path::to_path_buf)
    });
    (config, api_socket)
}

/// SIGTERM and SIGINT, blocked in every thread of `memvisor run` (threads inherit the mask of
/// the thread that starts them) and taken by [`stop_on_signals`]'s thread with `sigwait`.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset and sigaddset only write the set we own; the signal numbers are valid.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this thread, before any other thread exists.
fn block_stop_signals() -> anyhow::Result<()> {
    let set = stop_signals();
    // SAFETY: pthread_sigmask reads `set` and writes no old mask (null).
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        anyhow::bail!(
            "cannot block SIGTERM/SIGINT: {}",
            std::io::Error::from_raw_os_error(ret)
        );
    }
    Ok(())
}

/// The first SIGTERM or SIGINT stops the VM as `PUT /shutdown` would (the API socket and the
/// swap file go with it, and the exit status is 0); a second one, should the stop hang, ends
/// the process at once with 128 + the signal number.
fn stop_on_signals(shared: Arc<vmm::vcpu::VmShared>) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = stop_signals();
            let mut stopping = false;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait reads `set` and writes the signal number into `sig`.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if stopping {
                    eprintln!("memvisor: second signal {sig} while stopping, exiting now");
                    std::process::exit(128 + sig);
                }
                tracing::info!("signal {sig}: stopping the VM");
                stopping = true;
                shared.request_exit(VmExit::Stopped);
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    block_stop_signals()?;
    let file = match &args.config {
        Some(path) => RunFile::load(path).map_err(anyhow::Error::msg)?,
        None => RunFile::default(),
    };
    let using_default = args.kernel.is_none() && file.kernel.is_none();
    let guest_dir = default_guest_dir();
    let (config, api_socket) = build_config(args, file, &guest_dir);
    if using_default && !config.kernel.exists() {
        anyhow::bail!(
            "no default guest at {}: build it with guest-images/build, or pass --kernel",
            guest_dir.display()
        );
    }
    let mut vm = Vm::new(
        &config,
        VmIo {
            console_out: Box::new(std::io::stdout()),
        },
    )?;
    // The API server lives as long as the VM runs; dropping it removes the socket.
    let _api = match api_socket {
        Some(path) => {
            let handle = vm.handle()?;
            Some(vmm::api::ApiServer::start(&path, Arc::new(handle))?)
        }
        None => None,
    };
    stop_on_signals(vm.shared().clone())?;
    let input = vm.console_input();
    // Console input: stdin is forwarded to the guest's UART as it arrives.
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut buf = [0u8; 256];
            let mut stdin = std::io::stdin().lock();
            while let Ok(n) = stdin.read(&mut buf) {
                if n == 0 || !input.send(&buf[..n]) {
                    break;
                }
            }
        })
        .context("cannot start the console input thread")?;
    match vm.run()? {
        VmExit::Reset | VmExit::Shutdown | VmExit::Stopped => Ok(ExitCode::SUCCESS),
        VmExit::Error(e) => anyhow::bail!("{e}"),
    }
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MEMVISOR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line: clap's first line names the flag and the problem.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("memvisor: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Ctl(args) => vmm::ctl::run_ctl(&args)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("memvisor: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
