//! Failure paths that must end in a clear state within a bounded time, driven through real KVM
//! with small purpose-built guest programs (see `docs/security.md`).

mod common;

use std::io::{self, Write};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::{temp_file, tiny_elf};
use vmm::{Vm, VmConfig, VmExit, VmIo};

/// Prints `x` to COM1 forever.
const PRINT_FOREVER: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'x', // loop: mov al, 'x'
    0xee, // out dx, al
    0xeb, 0xfb, // jmp loop
];

/// A console writer that blocks forever once written to (stdout piped to a reader that never
/// reads), and says when it first blocked.
struct StuckWriter(Arc<(Mutex<bool>, Condvar)>);

impl Write for StuckWriter {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        let (m, c) = &*self.0;
        let mut blocked = m.lock().expect("lock");
        *blocked = true;
        c.notify_all();
        loop {
            blocked = c.wait(blocked).expect("wait");
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_console_nobody_reads_neither_blocks_the_guest_nor_the_stop() {
    memory::require!(Kvm);
    let kernel = temp_file("print-forever", &tiny_elf(PRINT_FOREVER, 0x20_0000));
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(32 << 20);
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let mut vm = Vm::new(
        &config,
        VmIo {
            console_out: Box::new(StuckWriter(gate.clone())),
        },
    )
    .expect("build VM");
    vm.start().expect("start");
    {
        let (m, c) = &*gate;
        let blocked = m.lock().expect("lock");
        let (blocked, _) = c
            .wait_timeout_while(blocked, Duration::from_secs(60), |b| !*b)
            .expect("wait");
        assert!(*blocked, "the guest printed nothing in 60 s");
    }
    // The guest keeps printing into a full buffer: its output is dropped, not waited for.
    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.console().dropped_bytes() < 64 * 1024 && Instant::now() < deadline {
        assert_eq!(vm.wait_timeout(Duration::from_millis(100)), None);
    }
    assert!(
        vm.console().dropped_bytes() >= 64 * 1024,
        "the vCPU is stuck behind the console: {} bytes dropped",
        vm.console().dropped_bytes()
    );
    assert!(vm
        .metrics_text()
        .contains("memvisor_console_dropped_bytes_total{vm=\"vm0\"}"));

    // The stop, under a watchdog: it must finish within a bound, whatever the writer does.
    let (done, finished) = mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        let exit = vm.stop();
        let _ = done.send(exit);
        drop(vm);
    });
    let exit = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the VM did not stop within 20 s");
    assert_eq!(exit, VmExit::Stopped);
    eprintln!("stopped in {:?}", started.elapsed());
}

#[test]
fn a_slow_sharing_sample_does_not_hold_up_the_event_loop() {
    memory::require!(Kvm);
    use memory::sharing::{SharingConfig, SharingSampler};
    use vmm::action::{Action, ActionHandler, ActionReply};

    // jmp $: the guest spins; only the API matters here.
    let kernel = temp_file("sharing-spin", &tiny_elf(&[0xeb, 0xfe], 0x20_0000));
    let mut config = VmConfig::new(kernel);
    config.memory = memory::ByteSize(32 << 20);
    let mut vm = Vm::new(
        &config,
        VmIo {
            console_out: Box::new(io::sink()),
        },
    )
    .expect("build VM");
    // 4,096 pages at 1,000 pages per second: a sample takes more than 3 s.
    vm.set_sharing_sampler(SharingSampler::new(SharingConfig {
        sample_pages: 4096,
        max_pages_per_s: Some(1000),
        seed: 7,
    }))
    .expect("sampler");
    let handle = Arc::new(vm.handle().expect("handle"));
    vm.start().expect("start");

    let sampling = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let reply = handle.handle(Some("vm0"), Action::GetSharing);
            (reply, started.elapsed())
        })
    };
    let asking = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            let started = Instant::now();
            let reply = handle.handle(Some("vm0"), Action::GetVm);
            (reply, started.elapsed())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(sampling.is_finished() && asking.is_finished()) {
        assert!(Instant::now() < deadline, "the API did not answer in 30 s");
        assert_eq!(vm.wait_timeout(Duration::from_millis(20)), None);
    }
    let (sample, sample_took) = sampling.join().expect("sampling");
    let (info, info_took) = asking.join().expect("asking");

    let Ok(ActionReply::Json(report)) = sample else {
        panic!("sharing: {sample:?}");
    };
    assert!(matches!(info, Ok(ActionReply::Vm(_))), "{info:?}");
    assert!(
        sample_took > Duration::from_secs(2),
        "the sample was not slow ({sample_took:?}): {report}"
    );
    assert!(
        info_took < Duration::from_millis(500),
        "GET /vms/vm0 waited {info_took:?} behind a {sample_took:?} sharing sample"
    );
    assert_eq!(vm.stop(), VmExit::Stopped);
}
