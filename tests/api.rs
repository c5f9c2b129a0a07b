//! The control plane against a running VM: `memvisor ctl` commands through the API socket,
//! answered by the VM's event loop while a purpose-built guest runs.

use std::sync::Arc;
use std::time::Duration;

use memvisor_tests::{temp_file, tiny_elf};
use vmm::ctl::{run_ctl_to, CtlArgs, CtlCommand};
use vmm::{Vm, VmConfig, VmExit, VmIo};

fn ctl(socket: &std::path::Path, json: bool, command: CtlCommand) -> Result<String, String> {
    let args = CtlArgs {
        api_socket: socket.to_path_buf(),
        json,
        command,
    };
    let mut out = Vec::new();
    run_ctl_to(&args, &mut out).map_err(|e| format!("{e:#}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn ctl_drives_a_running_vm_through_the_api() {
    // jmp $: the guest spins in ring 0 until the VMM stops it.
    let kernel = temp_file("api-spin", &tiny_elf(&[0xeb, 0xfe], 0x20_0000));
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(32 << 20);
    config.balloon = Some(balloon::BalloonConfig::default());
    let swap_dir = std::env::temp_dir().join(format!("memvisor-api-swap-{}", std::process::id()));
    std::fs::create_dir_all(&swap_dir).expect("swap dir");
    config.swap_dir = Some(swap_dir);
    let mut vm = Vm::new(
        &config,
        VmIo {
            console_out: Box::new(std::io::sink()),
        },
    )
    .expect("build VM");
    let socket =
        std::env::temp_dir().join(format!("memvisor-api-test-{}.sock", std::process::id()));
    let api = vmm::api::ApiServer::start(&socket, Arc::new(vm.handle().expect("handle")))
        .expect("API server");
    vm.start().expect("start");

    let client_socket = socket.clone();
    let client = std::thread::spawn(move || {
        let s = client_socket.as_path();
        let id = || "vm0".to_string();
        let info = ctl(s, false, CtlCommand::Info { id: id() }).expect("info");
        assert!(info.starts_with("vm0: running"), "{info}");
        assert!(info.contains("boot 32 MiB"), "{info}");
        let json = ctl(s, true, CtlCommand::Info { id: id() }).expect("info --json");
        assert!(json.contains(r#""state":"running""#), "{json}");

        assert_eq!(
            ctl(s, false, CtlCommand::Pause { id: id() }).expect("pause"),
            "vm0: paused\n"
        );
        let again = ctl(s, false, CtlCommand::Pause { id: id() }).expect_err("already paused");
        assert!(again.contains("already paused"), "{again}");
        assert_eq!(
            ctl(s, false, CtlCommand::Resume { id: id() }).expect("resume"),
            "vm0: running\n"
        );

        let b = ctl(
            s,
            false,
            CtlCommand::Balloon {
                size: Some(memory::ByteSize(16 << 20)),
                id: id(),
            },
        )
        .expect("balloon");
        assert_eq!(b, "vm0: balloon target 16 MiB, actual 0 MiB\n");
        let too_big = ctl(
            s,
            false,
            CtlCommand::Balloon {
                size: Some(memory::ByteSize(1 << 30)),
                id: id(),
            },
        )
        .expect_err("target above RAM");
        assert!(too_big.contains("larger than the VM"), "{too_big}");
        let stats = ctl(s, false, CtlCommand::BalloonStats { id: id() }).expect("stats");
        assert!(stats.contains("has not reported"), "{stats}");

        let sharing = ctl(s, true, CtlCommand::Sharing { id: id() }).expect("sharing");
        assert!(sharing.contains(r#""status":"#), "{sharing}");
        let readable = ctl(s, false, CtlCommand::Sharing { id: id() }).expect("sharing");
        assert!(readable.contains("status: "), "{readable}");
        let host = ctl(s, true, CtlCommand::Host).expect("host");
        assert!(host.contains(r#""ksm""#), "{host}");

        let no_device = ctl(
            s,
            false,
            CtlCommand::Resize {
                size: Some(memory::ByteSize(128 << 20)),
                id: id(),
            },
        )
        .expect_err("no virtio-mem device");
        assert!(
            no_device.contains("--hotplug") && no_device.contains("400"),
            "{no_device}"
        );
        let swap = |size: Option<u64>| {
            ctl(
                s,
                true,
                CtlCommand::Swap {
                    size: size.map(memory::ByteSize),
                    no_wait: false,
                    id: id(),
                },
            )
            .expect("swap")
        };
        let before: serde_json::Value = serde_json::from_str(&swap(None)).expect("json");
        assert_eq!(before["armed"], false, "{before}");
        // The guest has written next to nothing; what the VMM loaded for it is resident.
        let out: serde_json::Value = serde_json::from_str(&swap(Some(8 << 20))).expect("json");
        assert_eq!(
            (&out["armed"], &out["busy"]),
            (&true.into(), &false.into()),
            "{out}"
        );
        assert_eq!(out["state"], "active", "{out}");
        assert!(out["swapped_pages"].as_u64().expect("pages") > 0, "{out}");
        let info = ctl(s, false, CtlCommand::Info { id: id() }).expect("info");
        assert!(info.contains("swapped "), "{info}");
        let back: serde_json::Value = serde_json::from_str(&swap(Some(0))).expect("json");
        assert_eq!(back["state"], "idle", "{back}");
        assert_eq!(back["swapped_pages"], 0, "{back}");
        let readable = ctl(
            s,
            false,
            CtlCommand::Swap {
                size: None,
                no_wait: false,
                id: id(),
            },
        )
        .expect("swap status");
        assert!(readable.contains("state: idle"), "{readable}");

        let missing = ctl(s, false, CtlCommand::Info { id: "vm9".into() }).expect_err("unknown VM");
        assert!(missing.contains("404"), "{missing}");

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
        assert!(
            metrics.contains(r#"memvisor_device_swap_state{vm="vm0",device="swap"} 0"#),
            "{metrics}"
        );
        assert!(
            metrics.contains("# TYPE memvisor_device_swap_faults_served_total counter"),
            "{metrics}"
        );

        ctl(s, false, CtlCommand::Shutdown { id: id() }).expect("shutdown");
    });

    let exit = vm.wait_timeout(Duration::from_secs(60));
    client.join().expect("client assertions");
    assert_eq!(exit, Some(VmExit::Stopped));
    api.stop();
    assert!(!socket.exists(), "socket removed at exit");
}
