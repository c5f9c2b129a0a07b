//! virtio-balloon against the real guest kernel: the kernel's driver inflates to the target we
//! set, the host gets the memory back, and deflating returns it to the guest.
//!
//! The guest boots without an initramfs and with `rootdelay=`, so that its kernel finishes
//! booting and then sits idle (waiting to mount a root device) with its drivers running. That
//! keeps the kernel alive on hosts where guest user space cannot run, and costs nothing on
//! others.

mod common;

use std::time::{Duration, Instant};

use common::{idle_kernel_guest, run_until, start_idle_kernel, vm_rss_bytes};
use vm_memory::{Bytes, GuestAddress};
use vmm::{Vm, VmExit, VmIo};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const BALLOON_TIMEOUT: Duration = Duration::from_secs(180);

fn actual_mib(vm: &Vm) -> u64 {
    vm.balloon()
        .expect("balloon")
        .lock()
        .expect("balloon lock")
        .actual_mib()
}

#[test]
fn guest_kernel_inflates_to_target_and_deflates_back() {
    memory::require!(Kvm, Guest);
    let mut config = idle_kernel_guest(256);
    config.balloon = Some(balloon::BalloonConfig::default());
    let mut vm = Vm::new(
        &config,
        VmIo {
            console_out: Box::new(std::io::sink()),
        },
    )
    .expect("build VM");

    // Guest RAM that a long-running guest has used is resident on the host; fill the free guest
    // RAM (all but the boot structures below 1 MiB and the kernel image at 16..26 MiB with its
    // bss) so that the pages the guest balloons are host memory to give back.
    let fill = vec![0x5au8; 1 << 20];
    for mib in (1..16u64).chain(28..256) {
        vm.ram()
            .memory()
            .write_slice(&fill, GuestAddress(mib << 20))
            .expect("fill guest RAM");
    }

    start_idle_kernel(&mut vm, BOOT_TIMEOUT);
    let rss_before = vm_rss_bytes();
    vm.balloon()
        .expect("balloon")
        .lock()
        .expect("lock")
        .set_target_mib(64)
        .expect("set target");
    let inflate_start = Instant::now();
    run_until(&mut vm, BALLOON_TIMEOUT, "actual_mib = 64", |vm| {
        actual_mib(vm) == 64
    });
    eprintln!("guest inflated 64 MiB in {:?}", inflate_start.elapsed());
    let rss_after = vm_rss_bytes();
    let dropped_mib = rss_before.saturating_sub(rss_after) >> 20;
    eprintln!(
        "inflated to 64 MiB: RSS {} -> {} MiB",
        rss_before >> 20,
        rss_after >> 20
    );
    assert!(dropped_mib >= 57, "RSS dropped by only {dropped_mib} MiB");
    let metrics = vm
        .balloon()
        .expect("balloon")
        .lock()
        .expect("lock")
        .metrics();
    assert!(metrics
        .values()
        .iter()
        .any(|(name, v)| name.contains("inflated") && *v >= 64 * 256));

    vm.balloon()
        .expect("balloon")
        .lock()
        .expect("lock")
        .set_target_mib(0)
        .expect("set target");
    run_until(&mut vm, BALLOON_TIMEOUT, "actual_mib = 0", |vm| {
        actual_mib(vm) == 0
    });

    assert_eq!(vm.stop(), VmExit::Stopped);
}
