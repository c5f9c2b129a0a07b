//! The control plane against a running VM: `memvisor ctl` commands through the API socket,
//! answered by the real `Vm`'s event loop while a purpose-built guest spins in ring 0.
//!
//! One behaviour per test. Tests that only read, or change what no other test reads, share one
//! VM (started once, on first use: a spinning guest costs a host CPU while it runs); a test that
//! changes the VM's run state gets its own.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

mod common;

use common::{temp_file, tiny_elf};
use vmm::api::ApiServer;
use vmm::ctl::{run_ctl_to, CtlArgs, CtlCommand};
use vmm::{Vm, VmConfig, VmExit, VmIo};

fn ctl(socket: &Path, json: bool, command: CtlCommand) -> Result<String, String> {
    let args = CtlArgs {
        api_socket: socket.to_path_buf(),
        json,
        command,
    };
    let mut out = Vec::new();
    run_ctl_to(&args, &mut out).map_err(|e| format!("{e:#}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn vm0() -> String {
    "vm0".to_owned()
}

/// A 32 MiB VM with a balloon and a swap directory, whose guest spins (`jmp $`), started with
/// an API server on a socket named after `name`.
fn start_vm(name: &str) -> (Vm, ApiServer, PathBuf) {
    let kernel = temp_file("api-spin", &tiny_elf(&[0xeb, 0xfe], 0x20_0000));
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(32 << 20);
    config.balloon = Some(balloon::BalloonConfig::default());
    let swap_dir = common::temp_dir(&format!("api-swap-{name}"));
    config.swap_dir = Some(swap_dir);
    let mut vm = Vm::new(
        &config,
        VmIo {
            console_out: Box::new(std::io::sink()),
        },
    )
    .expect("build VM");
    let socket = std::env::temp_dir().join(format!(
        "memvisor-api-test-{}-{name}.sock",
        std::process::id()
    ));
    let api = ApiServer::start(&socket, Arc::new(vm.handle().expect("handle"))).expect("API");
    vm.start().expect("start");
    (vm, api, socket)
}

/// The socket of the VM the read-only tests share. Its thread runs the VM's event loop until
/// the test process ends.
fn shared_vm() -> &'static Path {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut vm, _api, socket) = start_vm("shared");
            tx.send(socket).expect("the test waits for the socket");
            while vm.wait_timeout(Duration::from_secs(1)).is_none() {}
            panic!("the shared VM stopped");
        });
        rx.recv().expect("the shared VM started")
    })
}

/// A VM of one test's own, after its client ran.
struct OwnVm {
    vm: Vm,
    api: ApiServer,
    socket: PathBuf,
    /// How the VM ended while the client ran, if it did.
    exit: Option<VmExit>,
}

/// Runs `client` against a VM of its own on another thread while this one runs the VM's event
/// loop, until the client is done; a client's failed assertion fails the test.
fn with_own_vm(name: &str, client: impl FnOnce(&Path) + Send + 'static) -> OwnVm {
    let (mut vm, api, socket) = start_vm(name);
    let client_socket = socket.clone();
    let client = std::thread::spawn(move || client(&client_socket));
    let mut exit = None;
    while !client.is_finished() {
        if exit.is_none() {
            exit = vm.wait_timeout(Duration::from_millis(100));
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Err(panic) = client.join() {
        std::panic::resume_unwind(panic);
    }
    OwnVm {
        vm,
        api,
        socket,
        exit,
    }
}

#[test]
fn info_reports_a_running_vm_and_its_boot_memory() {
    memory::require!(Kvm);
    let s = shared_vm();
    let info = ctl(s, false, CtlCommand::Info { id: vm0() }).expect("info");
    assert!(info.starts_with("vm0: running"), "{info}");
    assert!(info.contains("boot 32 MiB"), "{info}");
    let json = ctl(s, true, CtlCommand::Info { id: vm0() }).expect("info --json");
    assert!(json.contains(r#""state":"running""#), "{json}");
}

#[test]
fn an_unknown_vm_is_a_404() {
    memory::require!(Kvm);
    let missing =
        ctl(shared_vm(), false, CtlCommand::Info { id: "vm9".into() }).expect_err("unknown VM");
    assert!(missing.contains("404"), "{missing}");
}

#[test]
fn pausing_a_paused_vm_is_refused_and_resume_runs_it_again() {
    memory::require!(Kvm);
    let mut own = with_own_vm("pause", |s| {
        assert_eq!(
            ctl(s, false, CtlCommand::Pause { id: vm0() }).expect("pause"),
            "vm0: paused\n"
        );
        let again = ctl(s, false, CtlCommand::Pause { id: vm0() }).expect_err("already paused");
        assert!(
            again.contains("409") && again.contains("already paused"),
            "{again}"
        );
        assert_eq!(
            ctl(s, false, CtlCommand::Resume { id: vm0() }).expect("resume"),
            "vm0: running\n"
        );
    });
    assert_eq!(own.exit, None, "the guest still runs");
    own.vm.stop();
    own.api.stop();
}

#[test]
fn shutdown_stops_the_vm_and_the_server_removes_its_socket() {
    memory::require!(Kvm);
    let mut own = with_own_vm("shutdown", |s| {
        ctl(s, false, CtlCommand::Shutdown { id: vm0() }).expect("shutdown");
    });
    let exit = own
        .exit
        .or_else(|| own.vm.wait_timeout(Duration::from_secs(60)));
    assert_eq!(exit, Some(VmExit::Stopped));
    own.api.stop();
    assert!(!own.socket.exists(), "socket removed at exit");
}

#[test]
fn balloon_target_is_set_and_one_above_the_vm_is_refused() {
    memory::require!(Kvm);
    let s = shared_vm();
    let balloon = |mib: u64| {
        ctl(
            s,
            false,
            CtlCommand::Balloon {
                size: Some(memory::ByteSize(mib << 20)),
                id: vm0(),
            },
        )
    };
    assert_eq!(
        balloon(16).expect("balloon"),
        "vm0: balloon target 16 MiB, actual 0 MiB\n"
    );
    let too_big = balloon(1024).expect_err("target above RAM");
    assert!(
        too_big.contains("400") && too_big.contains("larger than the VM"),
        "{too_big}"
    );
}

#[test]
fn balloon_stats_say_the_guest_has_not_reported() {
    memory::require!(Kvm);
    let stats = ctl(shared_vm(), false, CtlCommand::BalloonStats { id: vm0() }).expect("stats");
    assert!(stats.contains("has not reported"), "{stats}");
}

#[test]
fn sharing_and_host_report_their_status() {
    memory::require!(Kvm);
    let s = shared_vm();
    let sharing = ctl(s, true, CtlCommand::Sharing { id: vm0() }).expect("sharing");
    assert!(sharing.contains(r#""status":"#), "{sharing}");
    let readable = ctl(s, false, CtlCommand::Sharing { id: vm0() }).expect("sharing");
    assert!(readable.contains("status: "), "{readable}");
    let host = ctl(s, true, CtlCommand::Host).expect("host");
    assert!(host.contains(r#""ksm""#), "{host}");
}

#[test]
fn resizing_a_vm_without_virtio_mem_is_a_400_naming_the_flag() {
    memory::require!(Kvm);
    let no_device = ctl(
        shared_vm(),
        false,
        CtlCommand::Resize {
            size: Some(memory::ByteSize(128 << 20)),
            id: vm0(),
        },
    )
    .expect_err("no virtio-mem device");
    assert!(
        no_device.contains("--hotplug") && no_device.contains("400"),
        "{no_device}"
    );
}

#[test]
fn swap_moves_the_vm_out_and_back_in() {
    memory::require!(Kvm, UffdWriteProtect);
    let mut own = with_own_vm("swap", |s| {
        let swap = |size: Option<u64>| {
            let command = CtlCommand::Swap {
                size: size.map(memory::ByteSize),
                no_wait: false,
                id: vm0(),
            };
            let text = ctl(s, true, command).expect("swap");
            serde_json::from_str::<serde_json::Value>(&text).expect("json")
        };
        let before = swap(None);
        assert_eq!(before["armed"], false, "{before}");
        // The guest has written next to nothing; what the VMM loaded for it is resident.
        let out = swap(Some(8 << 20));
        assert_eq!(
            (&out["armed"], &out["busy"]),
            (&true.into(), &false.into()),
            "{out}"
        );
        assert_eq!(out["state"], "active", "{out}");
        assert!(out["swapped_pages"].as_u64().expect("pages") > 0, "{out}");
        let info = ctl(s, false, CtlCommand::Info { id: vm0() }).expect("info");
        assert!(info.contains("swapped "), "{info}");
        let back = swap(Some(0));
        assert_eq!(back["state"], "idle", "{back}");
        assert_eq!(back["swapped_pages"], 0, "{back}");
        let readable = ctl(
            s,
            false,
            CtlCommand::Swap {
                size: None,
                no_wait: false,
                id: vm0(),
            },
        )
        .expect("swap status");
        assert!(readable.contains("state: idle"), "{readable}");
        // An armed swapper exports its metrics: back to idle (0), with a counter of faults.
        let metrics = ctl(s, false, CtlCommand::Metrics).expect("metrics");
        assert!(
            metrics.contains(r#"memvisor_device_swap_state{vm="vm0",device="swap"} 0"#),
            "{metrics}"
        );
        assert!(
            metrics.contains("# TYPE memvisor_device_swap_faults_served_total counter"),
            "{metrics}"
        );
    });
    assert_eq!(own.exit, None, "the guest still runs");
    own.vm.stop();
    own.api.stop();
}

#[test]
fn metrics_name_the_vmm_the_vm_and_its_balloon() {
    memory::require!(Kvm);
    let s = shared_vm();
    // A sharing report is sampled on request; the metrics then carry its figures.
    let sharing = ctl(s, true, CtlCommand::Sharing { id: vm0() }).expect("sharing");
    let metrics = ctl(s, false, CtlCommand::Metrics).expect("metrics");
    if sharing.contains(r#""status":"ok""#) {
        assert!(
            metrics.contains("memvisor_sharing_count_harmonic_mean"),
            "{metrics}"
        );
    }
    assert!(metrics.contains("memvisor_vmm_resident_bytes"), "{metrics}");
    assert!(metrics.contains("vm=\"vm0\""), "{metrics}");
    assert!(metrics.contains("balloon0"), "{metrics}");
}
