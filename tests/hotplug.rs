//! virtio-mem against the real guest kernel: the kernel's driver plugs the memory we request,
//! onlines it (the kernel's page count grows), and unplugs it again when we request 0, with the
//! host memory behind it given back.
//!
//! The guest boots without an initramfs and with `rootdelay=` (see tests/balloon.rs for why).

mod common;

use std::time::{Duration, Instant};

use common::{captured_vm, idle_kernel_guest, run_until, start_idle_kernel, vm_rss_bytes};
use vm_memory::{Bytes, GuestAddress};
use vmm::action::{Action, ActionError, ActionReply, MemoryRequest};
use vmm::{Vm, VmExit};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const PLUG_TIMEOUT: Duration = Duration::from_secs(180);

fn memory(vm: &mut Vm, action: Action) -> Result<hotplug::VirtioMemStatus, ActionError> {
    match vm.handle_action(action)? {
        ActionReply::Memory(status) => Ok(status),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn request(vm: &mut Vm, mib: u64) -> Result<hotplug::VirtioMemStatus, ActionError> {
    memory(vm, Action::SetMemory(MemoryRequest { requested_mib: mib }))
}

fn plugged_mib(vm: &mut Vm) -> u64 {
    memory(vm, Action::GetMemory).expect("memory").plugged_mib
}

/// The page counts the kernel printed each time it rebuilt its zone lists (at boot, and when
/// memory is onlined).
fn zonelist_totals(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.contains("Built 1 zonelists"))
        .filter_map(|l| l.rsplit("Total pages: ").next()?.trim().parse().ok())
        .collect()
}

#[test]
fn guest_kernel_plugs_256_mib_and_unplugs_it_again() {
    memory::require!(Kvm, Guest);
    let mut config = idle_kernel_guest(128);
    config.hotplug = Some(vmm::config::parse_hotplug_options("1G").expect("hotplug options"));
    let (mut vm, capture) = captured_vm(&config);
    start_idle_kernel(&mut vm, BOOT_TIMEOUT);
    let status = memory(&mut vm, Action::GetMemory).expect("memory");
    assert!(status.driver_active, "the guest's virtio-mem driver runs");
    assert_eq!((status.plugged_mib, status.region_size_mib), (0, 1024));
    let zonelists_at_boot = zonelist_totals(&capture.text()).len();
    assert!(
        zonelists_at_boot > 0,
        "the kernel logs its zone lists at boot"
    );

    // Bad requests change nothing.
    for bad in [3, 2048] {
        let e = request(&mut vm, bad).expect_err("refused");
        assert!(matches!(e, ActionError::BadRequest(_)), "{bad}: {e:?}");
    }
    assert_eq!(
        memory(&mut vm, Action::GetMemory)
            .expect("memory")
            .requested_mib,
        0
    );

    let plug_start = Instant::now();
    request(&mut vm, 256).expect("request 256 MiB");
    run_until(&mut vm, PLUG_TIMEOUT, "plugged_mib = 256", |vm| {
        plugged_mib(vm) == 256
    });
    eprintln!("guest plugged 256 MiB in {:?}", plug_start.elapsed());
    // The kernel onlined the memory: onlining the first 128 MiB memory block populated its
    // movable zone, so it rebuilt its zone lists with that block's pages (32Ki, less the
    // struct pages it needs for them). Later blocks join a populated zone and log nothing.
    run_until(
        &mut vm,
        PLUG_TIMEOUT,
        "the kernel to online the memory",
        |_| zonelist_totals(&capture.text()).len() > zonelists_at_boot,
    );
    let totals = zonelist_totals(&capture.text());
    let grown = totals[totals.len() - 1].saturating_sub(totals[zonelists_at_boot - 1]);
    assert!(
        grown >= 25_000,
        "the kernel's page count grew by {grown} pages: {totals:?}"
    );
    assert_eq!(vm.info().memory.guest_visible_mib, 128 + 256);
    assert_eq!(vm.info().memory.plugged_mib, 256);

    // A guest that used its new memory has it resident on the host (guest user space cannot
    // run on every test host, so the host writes it on the guest's behalf).
    let base = status.region_addr;
    let region = vm
        .virtio_mem()
        .expect("device")
        .lock()
        .expect("lock")
        .memory()
        .clone();
    let fill = vec![0xa5u8; 1 << 20];
    for mib in 0..256u64 {
        region
            .write_slice(&fill, GuestAddress(base + (mib << 20)))
            .expect("write plugged memory");
    }
    let rss_plugged = vm_rss_bytes();

    let unplug_start = Instant::now();
    request(&mut vm, 0).expect("request 0");
    run_until(&mut vm, PLUG_TIMEOUT, "plugged_mib = 0", |vm| {
        plugged_mib(vm) == 0
    });
    eprintln!("guest unplugged 256 MiB in {:?}", unplug_start.elapsed());
    let rss_unplugged = vm_rss_bytes();
    eprintln!(
        "RSS {} MiB plugged and used -> {} MiB unplugged",
        rss_plugged >> 20,
        rss_unplugged >> 20
    );
    assert!(
        rss_plugged.saturating_sub(rss_unplugged) >= 250 << 20,
        "RSS fell by only {} MiB",
        rss_plugged.saturating_sub(rss_unplugged) >> 20
    );
    // The kernel's own account: it reports the 256 MiB it had plugged when told the new size.
    assert!(
        capture
            .text()
            .contains("virtio_mem virtio0: plugged size: 0x10000000"),
        "the kernel logged 256 MiB plugged"
    );
    let metrics = vm.metrics_text();
    assert!(
        metrics
            .contains(r#"memvisor_device_plugged_bytes_total{vm="vm0",device="mem0"} 268435456"#),
        "{metrics}"
    );
    assert_eq!(vm.info().memory.guest_visible_mib, 128);
    assert_eq!(vm.stop(), VmExit::Stopped);
}
