//! Hypervisor swap under a real vCPU: a purpose-built guest program writes a pattern over
//! 16 MiB of its RAM, the host swaps the VM out, the guest verifies every qword (each access
//! brings a page back through userfaultfd while the vCPU is in KVM_RUN) and writes a second
//! pattern over the same pages, the host swaps out again (the re-dirtied pages must be written
//! anew, not served from their old slots), and the guest verifies again and reports `OK` or
//! `BAD` on COM1.

mod common;

use std::time::{Duration, Instant};

use common::{captured_vm, temp_dir, temp_file, tiny_elf, Capture};
use vm_memory::{Bytes, GuestAddress};
use vmm::action::{Action, ActionReply, SwapRequest};
use vmm::{Vm, VmConfig, VmExit};

/// Where the host writes the round number the guest waits for.
const FLAG: u64 = 0x10_0000;
/// The pattern covers [START, END): 4096 pages.
const START: u64 = 0x40_0000;
const END: u64 = 0x140_0000;

/// Two rounds: write a pattern over [START, END) (round 1: each qword's own address; round 2:
/// its complement), say `W<round>` on COM1, wait until the host sets the qword at FLAG to the
/// round number, verify every qword. Then `OK` or `BAD`, then reset through the i8042.
/// Assembled from:
/// ```text
/// start: mov dx, 0x3f8; mov r8, 0; mov r9, 1
/// round: mov rdi, START
/// fill:  mov rax, rdi; xor rax, r8; mov [rdi], rax; add rdi, 8; cmp rdi, END; jb fill
///        mov al, 'W'; out dx, al; mov al, r9b; add al, '0'; out dx, al; mov al, '\n'; out dx, al
/// wait:  pause; cmp [FLAG], r9; jne wait
///        mov rdi, START
/// check: mov rax, rdi; xor rax, r8; cmp [rdi], rax; jne bad; add rdi, 8; cmp rdi, END; jb check
///        not r8; inc r9; cmp r9, 3; jb round
///        mov al, 'O'; out dx, al; mov al, 'K'; out dx, al; jmp done
/// bad:   mov al, 'B'; out dx, al; mov al, 'A'; out dx, al; mov al, 'D'; out dx, al
/// done:  mov al, '\n'; out dx, al; mov al, 0xfe; out 0x64, al; hlt
/// ```
const SWAP_PATTERN: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x49, 0xc7, 0xc0, 0x00, 0x00, 0x00, 0x00, // mov r8, 0
    0x49, 0xc7, 0xc1, 0x01, 0x00, 0x00, 0x00, // mov r9, 1
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // round: mov rdi, START
    0x48, 0x89, 0xf8, // fill: mov rax, rdi
    0x4c, 0x31, 0xc0, // xor rax, r8
    0x48, 0x89, 0x07, // mov [rdi], rax
    0x48, 0x83, 0xc7, 0x08, // add rdi, 8
    0x48, 0x81, 0xff, 0x00, 0x00, 0x40, 0x01, // cmp rdi, END
    0x72, 0xea, // jb fill
    0xb0, b'W', 0xee, // mov al, 'W'; out dx, al
    0x44, 0x88, 0xc8, // mov al, r9b
    0x04, b'0', 0xee, // add al, '0'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xf3, 0x90, // wait: pause
    0x4c, 0x39, 0x0c, 0x25, 0x00, 0x00, 0x10, 0x00, // cmp [FLAG], r9
    0x75, 0xf4, // jne wait
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // mov rdi, START
    0x48, 0x89, 0xf8, // check: mov rax, rdi
    0x4c, 0x31, 0xc0, // xor rax, r8
    0x48, 0x39, 0x07, // cmp [rdi], rax
    0x75, 0x21, // jne bad
    0x48, 0x83, 0xc7, 0x08, // add rdi, 8
    0x48, 0x81, 0xff, 0x00, 0x00, 0x40, 0x01, // cmp rdi, END
    0x72, 0xe8, // jb check
    0x49, 0xf7, 0xd0, // not r8
    0x49, 0xff, 0xc1, // inc r9
    0x49, 0x83, 0xf9, 0x03, // cmp r9, 3
    0x72, 0xa0, // jb round
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xeb, 0x09, // jmp done
    0xb0, b'B', 0xee, // bad: mov al, 'B'; out dx, al
    0xb0, b'A', 0xee, // mov al, 'A'; out dx, al
    0xb0, b'D', 0xee, // mov al, 'D'; out dx, al
    0xb0, b'\n', 0xee, // done: mov al, '\n'; out dx, al
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, // hlt
];

/// Rewrites [START, END) pass after pass (pass k writes each qword's address xor k), saying `W`
/// on COM1 after the first pass, until the host sets the qword at FLAG; then verifies every
/// qword against the last pass and says `OK` or `BAD`, then resets. The host swaps the VM out
/// while the passes run, so guest writes race the swap-out. Assembled from:
/// ```text
/// start:  mov dx, 0x3f8; xor r8, r8
/// pass:   inc r8; mov rdi, START
/// fill:   mov rax, rdi; xor rax, r8; mov [rdi], rax; add rdi, 8; cmp rdi, END; jb fill
///         cmp r8, 1; jne polled; mov al, 'W'; out dx, al; mov al, '\n'; out dx, al
/// polled: cmp qword [FLAG], 0; je pass
///         mov rdi, START
/// check:  mov rax, rdi; xor rax, r8; cmp [rdi], rax; jne bad; add rdi, 8; cmp rdi, END; jb check
///         mov al, 'O'; out dx, al; mov al, 'K'; out dx, al; jmp done
/// bad:    mov al, 'B'; out dx, al; mov al, 'A'; out dx, al; mov al, 'D'; out dx, al
/// done:   mov al, '\n'; out dx, al; mov al, 0xfe; out 0x64, al; hlt
/// ```
const SWAP_RACE: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0x4d, 0x31, 0xc0, // xor r8, r8
    0x49, 0xff, 0xc0, // pass: inc r8
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // mov rdi, START
    0x48, 0x89, 0xf8, // fill: mov rax, rdi
    0x4c, 0x31, 0xc0, // xor rax, r8
    0x48, 0x89, 0x07, // mov [rdi], rax
    0x48, 0x83, 0xc7, 0x08, // add rdi, 8
    0x48, 0x81, 0xff, 0x00, 0x00, 0x40, 0x01, // cmp rdi, END
    0x72, 0xea, // jb fill
    0x49, 0x83, 0xf8, 0x01, // cmp r8, 1
    0x75, 0x06, // jne polled
    0xb0, b'W', 0xee, // mov al, 'W'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0x48, 0x83, 0x3c, 0x25, 0x00, 0x00, 0x10, 0x00, 0x00, // polled: cmp qword [FLAG], 0
    0x74, 0xc9, // je pass
    0x48, 0xc7, 0xc7, 0x00, 0x00, 0x40, 0x00, // mov rdi, START
    0x48, 0x89, 0xf8, // check: mov rax, rdi
    0x4c, 0x31, 0xc0, // xor rax, r8
    0x48, 0x39, 0x07, // cmp [rdi], rax
    0x75, 0x15, // jne bad
    0x48, 0x83, 0xc7, 0x08, // add rdi, 8
    0x48, 0x81, 0xff, 0x00, 0x00, 0x40, 0x01, // cmp rdi, END
    0x72, 0xe8, // jb check
    0xb0, b'O', 0xee, // mov al, 'O'; out dx, al
    0xb0, b'K', 0xee, // mov al, 'K'; out dx, al
    0xeb, 0x09, // jmp done
    0xb0, b'B', 0xee, // bad: mov al, 'B'; out dx, al
    0xb0, b'A', 0xee, // mov al, 'A'; out dx, al
    0xb0, b'D', 0xee, // mov al, 'D'; out dx, al
    0xb0, b'\n', 0xee, // done: mov al, '\n'; out dx, al
    0xb0, 0xfe, // mov al, 0xfe
    0xe6, 0x64, // out 0x64, al
    0xf4, // hlt
];

/// Generous: guest code is emulated on some hosts (~2 M instructions/s, and a round is
/// 2 x 2 M qwords).
const ROUND_TIMEOUT: Duration = Duration::from_secs(300);

fn swap_status(vm: &mut Vm, action: Action) -> serde_json::Value {
    match vm.handle_action(action) {
        Ok(ActionReply::Swap { status, .. }) => status,
        other => panic!("unexpected swap reply: {other:?}"),
    }
}

fn field(status: &serde_json::Value, name: &str) -> u64 {
    status[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// Runs the event loop until the console shows `text`.
fn wait_for_console(vm: &mut Vm, capture: &Capture, text: &str) {
    let deadline = Instant::now() + ROUND_TIMEOUT;
    while !capture.text().contains(text) {
        if let Some(exit) = vm.wait_timeout(Duration::from_millis(50)) {
            panic!(
                "guest stopped ({exit:?}) before {text:?}; console: {}",
                capture.text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no {text:?} from the guest; console: {}",
            capture.text()
        );
    }
}

/// Writes `value` to the flag the guest polls (a host access that faults a swapped page in).
fn set_flag(vm: &mut Vm, value: u64) {
    vm.ram()
        .memory()
        .write_obj(value, GuestAddress(FLAG))
        .expect("set the flag");
}

/// Sets the flag to `value` and runs the guest to its end: its exit and the swap status.
fn finish(vm: &mut Vm, capture: &Capture, value: u64) -> (VmExit, serde_json::Value) {
    set_flag(vm, value);
    let exit = vm.wait_timeout(ROUND_TIMEOUT).unwrap_or_else(|| {
        vm.stop();
        panic!("guest did not finish; console: {}", capture.text())
    });
    (exit, swap_status(vm, Action::GetSwap))
}

/// Swaps the VM out (everything it has resident) and waits for the worker to finish.
fn swap_out_all(vm: &mut Vm) -> serde_json::Value {
    let mib = vm.config().memory.mib();
    let started = swap_status(vm, Action::SetSwap(SwapRequest { target_mib: mib }));
    assert_eq!(started["armed"], true, "{started}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // Keep the event loop (and so the vCPUs' exits) going while the worker runs.
        assert_eq!(vm.wait_timeout(Duration::from_millis(20)), None);
        let status = swap_status(vm, Action::GetSwap);
        if status["busy"] == false {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "swap-out did not finish: {status}"
        );
    }
}

#[test]
fn guest_pattern_survives_two_swap_outs_byte_for_byte() {
    memory::require!(Kvm, UffdWriteProtect);
    let kernel = temp_file("swap-pattern", &tiny_elf(SWAP_PATTERN, 0x20_0000));
    let swap_dir = temp_dir("swap-dir");
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(64 << 20);
    config.swap_dir = Some(swap_dir.clone());
    let (mut vm, capture) = captured_vm(&config);
    vm.start().expect("start");

    let pattern_pages = (END - START) / 4096;
    let mut written_before = 0;
    for round in 1u64..=2 {
        wait_for_console(&mut vm, &capture, &format!("W{round}\n"));
        let status = swap_out_all(&mut vm);
        assert_eq!(status["state"], "active", "{status}");
        eprintln!(
            "round {round}: swap-out of {} pages ({} written, {} zero) in {} µs",
            status["last"]["swapped_pages"],
            status["last"]["pages_written"],
            status["last"]["zero_pages"],
            status["last"]["elapsed_us"]
        );
        assert!(
            field(&status, "swapped_pages") >= pattern_pages,
            "round {round}: the pattern pages are swapped: {status}"
        );
        // Every pattern page is new data this round: it must reach the file again.
        let written = field(&status, "bytes_written");
        assert!(
            written - written_before >= pattern_pages * 4096,
            "round {round}: {} bytes written for {pattern_pages} changed pages: {status}",
            written - written_before
        );
        written_before = written;
        assert!(field(&status, "file_size_bytes") <= 64 << 20, "{status}");
        assert_eq!(field(&status, "errors"), 0, "{status}");
        if round == 1 {
            // The host's own access to a swapped page is served too.
            set_flag(&mut vm, round);
        }
    }
    let (exit, status) = finish(&mut vm, &capture, 2);
    assert_eq!(
        capture.text(),
        "W1\nW2\nOK\n",
        "the guest read back what it wrote; swap: {status}"
    );
    assert_eq!(exit, VmExit::Reset);
    eprintln!(
        "guest faults served {}, fault latency p50 {} µs, p99 {} µs",
        status["faults_served"], status["fault_latency_p50_us"], status["fault_latency_p99_us"]
    );
    assert!(
        field(&status, "faults_served") >= 2 * pattern_pages,
        "each verification faulted the pattern back in: {status}"
    );
    let file = status["file_path"]
        .as_str()
        .expect("a swap file")
        .to_owned();
    assert!(file.starts_with(swap_dir.to_str().expect("utf-8 path")));
    drop(vm);
    assert!(
        !std::path::Path::new(&file).exists(),
        "the swap file is removed with the VM"
    );
}

#[test]
fn guest_writes_racing_swap_outs_are_never_lost() {
    memory::require!(Kvm, UffdWriteProtect);
    let kernel = temp_file("swap-race", &tiny_elf(SWAP_RACE, 0x20_0000));
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(64 << 20);
    config.swap_dir = Some(temp_dir("swap-race-dir"));
    let (mut vm, capture) = captured_vm(&config);
    vm.start().expect("start");
    wait_for_console(&mut vm, &capture, "W\n");
    // The guest keeps rewriting the pattern while we swap it out, three times over.
    let mut status = serde_json::Value::Null;
    for _ in 0..3 {
        status = swap_out_all(&mut vm);
        assert_eq!(field(&status, "errors"), 0, "{status}");
    }
    eprintln!(
        "write-protect faults {}, pages kept in RAM because a write raced them {}",
        field(&status, "wp_faults"),
        field(&status, "raced_pages")
    );
    let (exit, status) = finish(&mut vm, &capture, 1);
    assert_eq!(
        capture.text(),
        "W\nOK\n",
        "every qword holds the guest's last write; swap: {status}"
    );
    assert_eq!(exit, VmExit::Reset);
    assert!(field(&status, "faults_served") > 0, "{status}");
}

/// Swap storage whose reads fail: a page swapped out can never come back.
#[derive(Debug)]
struct UnreadableSwap(memory::swap::SwapFile);

impl memory::swap::SwapBacking for UnreadableSwap {
    fn write_pages_at(
        &self,
        pages: &memory::swap::GuestPieces,
        offset: u64,
    ) -> std::io::Result<()> {
        self.0.write_pages_at(pages, offset)
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc_eio()))
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn path(&self) -> Option<&std::path::Path> {
        self.0.path()
    }
}

/// `EIO`.
fn libc_eio() -> i32 {
    5
}

#[test]
fn a_swap_that_cannot_serve_a_fault_stops_the_vm_with_its_reason() {
    memory::require!(Kvm, UffdWriteProtect);
    let kernel = temp_file("swap-unreadable", &tiny_elf(SWAP_PATTERN, 0x20_0000));
    let swap_dir = temp_dir("swap-unreadable-dir");
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(64 << 20);
    let (mut vm, capture) = captured_vm(&config);
    let file = memory::swap::SwapFile::create(&swap_dir).expect("swap file");
    vm.swap()
        .set_backing(Box::new(UnreadableSwap(file)))
        .expect("backing");
    vm.start().expect("start");
    wait_for_console(&mut vm, &capture, "W1\n");
    // The guest spins reading the flag page; once that page is swapped out its next read
    // faults, the read from the swap storage fails, and the VM must stop rather than hang or
    // run on with a zero page.
    let target_mib = vm.config().memory.mib();
    let started = swap_status(&mut vm, Action::SetSwap(SwapRequest { target_mib }));
    assert_eq!(started["armed"], true, "{started}");
    let exit = vm.wait_timeout(Duration::from_secs(60)).unwrap_or_else(|| {
        let status = swap_status(&mut vm, Action::GetSwap);
        vm.stop();
        panic!("the VM kept running with a failed swap: {status}")
    });
    match &exit {
        VmExit::Error(reason) => assert!(reason.starts_with("swap failed: "), "{reason}"),
        other => panic!("expected a swap failure, got {other:?}"),
    }
    let status = swap_status(&mut vm, Action::GetSwap);
    assert_eq!(status["state"], "failed", "{status}");
    assert!(field(&status, "read_errors") > 0, "{status}");
    assert_eq!(capture.text(), "W1\n", "the guest never saw wrong data");
}
