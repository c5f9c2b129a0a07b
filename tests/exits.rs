//! Small purpose-built guest programs that exercise the VMM's boot state and exit handling
//! through real KVM exits, in milliseconds instead of a kernel boot.

mod common;

use std::time::Duration;

use common::{temp_file, tiny_elf, Capture};
use vmm::{Vm, VmConfig, VmExit, VmIo};

/// Checks the boot protocol from the guest side (`rsi` points at a zero page carrying the
/// 0xaa55 boot flag), prints `OK` or `BAD` on COM1, then resets through the i8042.
const CHECK_ZERO_PAGE_THEN_RESET: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x66, 0x81, 0xbe, 0xfe, 0x01, 0x00, 0x00, 0x55, 0xaa, // cmp word [rsi+0x1fe], 0xaa55
    0x75, 0x0b, // jne bad
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xeb, 0x06, // jmp reset
    0xb0, b'B', 0xee, // bad: mov al, 'B'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xb0, 0xfe, // reset: mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, // hlt
];

/// Writes to a port no device claims, reads it back into al, prints it, then triple-faults by
/// loading an empty IDT and raising an exception.
const UNCLAIMED_PORT_THEN_TRIPLE_FAULT: &[u8] = &[
    0xe4, 0x99, // in al, 0x99 (no device: reads 0xff)
    0x3c, 0xff, // cmp al, 0xff
    0x75, 0x08, // jne skip
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'F', 0xee, // mov al, 'F'; out dx, al
    0x90, // nop
    // skip: lidt [rip+0] with a zero limit, then ud2: #UD -> no IDT -> #DF -> triple fault.
    0x0f, 0x01, 0x1d, 0x02, 0x00, 0x00, 0x00, // lidt [rip+2]
    0x0f, 0x0b, // ud2
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, // 10-byte IDTR: limit 0, base 0
];

fn run_program(name: &str, code: &[u8], cpus: u8) -> (VmExit, String) {
    let kernel = temp_file(name, &tiny_elf(code, 0x20_0000));
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(32 << 20);
    config.cpus = cpus;
    let capture = Capture::default();
    let mut vm = Vm::new(
        &config,
        VmIo {
            console_out: Box::new(capture.clone()),
        },
    )
    .expect("build VM");
    vm.start().expect("start");
    let exit = vm.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|| {
        vm.stop();
        panic!("guest program did not finish; console: {}", capture.text())
    });
    (exit, capture.text())
}

#[test]
fn guest_sees_the_zero_page_and_resets_through_the_i8042() {
    memory::require!(Kvm);
    let (exit, out) = run_program("zero-page", CHECK_ZERO_PAGE_THEN_RESET, 1);
    assert_eq!(out, "OK\n");
    assert_eq!(exit, VmExit::Reset);
}

#[test]
fn two_vcpus_boot_and_stop_together() {
    memory::require!(Kvm);
    // The second vCPU waits for a SIPI that never comes; the VM must still stop cleanly.
    let (exit, out) = run_program("two-cpus", CHECK_ZERO_PAGE_THEN_RESET, 2);
    assert_eq!(out, "OK\n");
    assert_eq!(exit, VmExit::Reset);
}

#[test]
fn unclaimed_ports_read_all_ones_and_a_triple_fault_is_a_reset() {
    memory::require!(Kvm);
    let (exit, out) = run_program("triple-fault", UNCLAIMED_PORT_THEN_TRIPLE_FAULT, 1);
    assert_eq!(out, "F");
    assert_eq!(exit, VmExit::Reset);
}

#[test]
fn a_vm_that_never_stops_can_be_stopped() {
    memory::require!(Kvm);
    // jmp $: spins forever in the guest.
    let kernel = temp_file("spin", &tiny_elf(&[0xeb, 0xfe], 0x20_0000));
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(32 << 20);
    let mut vm = Vm::new(
        &config,
        VmIo {
            console_out: Box::new(std::io::sink()),
        },
    )
    .expect("build VM");
    vm.start().expect("start");
    assert_eq!(vm.wait_timeout(Duration::from_millis(300)), None);
    assert_eq!(vm.stop(), VmExit::Stopped);
}
