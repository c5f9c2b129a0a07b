//! Helpers shared by the integration tests (a module of each test: `mod common;`): where the
//! default guest is, booting it, and purpose-built guest programs.
//!
//! Every test here needs KVM, and some the built guest or userfaultfd write-protect: each says
//! so first with `memory::require!(Kvm, ...)`, which skips it with one printed reason on a
//! machine without them, or fails it under `MEMVISOR_REQUIRE_KVM=1` (see `memory::test_utils`).

// Each test uses its own part of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm::{Vm, VmConfig, VmExit, VmIo};

/// The default guest's configuration (built by `guest-images/build`; a test that uses it starts
/// with `memory::require!(Kvm, Guest)`).
pub fn default_guest() -> VmConfig {
    VmConfig::default_guest(&memory::test_utils::guest_dir())
}

/// The line the default guest's kernel logs once it has booted and sits idle without a root
/// device (see [`idle_kernel_guest`]).
pub const IDLE_LINE: &str = "before mounting root device";

/// The default guest's kernel with `memory_mib` of RAM, booted without an initramfs and with
/// `rootdelay=`, so that it finishes booting and then sits idle with its drivers running. That
/// keeps the kernel alive on hosts where guest user space cannot run, and costs nothing on
/// others; device tests against the real kernel use it.
pub fn idle_kernel_guest(memory_mib: u64) -> VmConfig {
    let mut config = default_guest();
    config.initrd = None;
    config.cmdline = Some(format!("{} rootdelay=900", config.base_cmdline()));
    config.memory = memory::ByteSize(memory_mib << 20);
    config
}

/// What a boot produced.
#[derive(Debug)]
pub struct BootOutcome {
    /// Time from VM creation to the milestone, if reached.
    pub milestone: Option<Duration>,
    /// How the VM ended, `None` if it was still running at the deadline.
    pub exit: Option<VmExit>,
    /// The last console lines.
    pub tail: Vec<String>,
}

impl BootOutcome {
    /// The console tail, for failure messages.
    pub fn tail_text(&self) -> String {
        self.tail.join("\n")
    }
}

/// Boots `config` with the console captured, until the VM exits or `timeout` passes.
pub fn boot(config: &VmConfig, timeout: Duration) -> BootOutcome {
    let mut vm = Vm::new(
        config,
        VmIo {
            console_out: Box::new(std::io::sink()),
        },
    )
    .expect("build the VM");
    vm.start().expect("start the VM");
    let exit = vm.wait_timeout(timeout);
    if exit.is_none() {
        vm.stop();
    }
    BootOutcome {
        milestone: vm.console().milestone_reached(),
        exit,
        tail: vm.console().tail(),
    }
}

/// Wraps raw 64-bit code in a minimal ELF executable whose one segment loads at `load_addr`
/// (which is also the entry point). memvisor loads it like a vmlinux: long mode, paging on,
/// `rsi` pointing at the zero page.
pub fn tiny_elf(code: &[u8], load_addr: u64) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const CODE_OFFSET: usize = 0x1000;
    let mut f = vec![0u8; CODE_OFFSET];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // ELF version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&load_addr.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let p = &mut f[EHDR..EHDR + PHDR];
    p[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    p[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    p[8..16].copy_from_slice(&(CODE_OFFSET as u64).to_le_bytes()); // p_offset
    p[16..24].copy_from_slice(&load_addr.to_le_bytes()); // p_vaddr
    p[24..32].copy_from_slice(&load_addr.to_le_bytes()); // p_paddr
    p[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    p[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    p[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(code);
    f
}

/// A console sink the test can read back.
#[derive(Clone, Debug, Default)]
pub struct Capture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
    }
}

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `bytes` to a fresh file in a per-process temporary directory and returns its path.
pub fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memvisor-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write temp file");
    path
}

/// A VM built from `config` whose console output goes to the returned [`Capture`].
pub fn captured_vm(config: &VmConfig) -> (Vm, Capture) {
    let capture = Capture::default();
    let vm = Vm::new(
        config,
        VmIo {
            console_out: Box::new(capture.clone()),
        },
    )
    .expect("build the VM");
    (vm, capture)
}

/// This process's resident memory (`VmRSS`), in bytes.
pub fn vm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS value");
    kib * 1024
}

/// Runs the VM's event loop until `done` holds, panicking with the console tail if `timeout`
/// passes or the VM stops first.
pub fn run_until(
    vm: &mut Vm,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&mut Vm) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while !done(vm) {
        if Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; last console lines:\n{}",
                vm.console().tail().join("\n")
            );
        }
        if let Some(exit) = vm.wait_timeout(Duration::from_millis(200)) {
            panic!(
                "VM stopped ({exit:?}) while waiting for {what}; last console lines:\n{}",
                vm.console().tail().join("\n")
            );
        }
    }
}

/// Starts a VM built from [`idle_kernel_guest`] and runs it until its kernel is idle.
pub fn start_idle_kernel(vm: &mut Vm, timeout: Duration) {
    vm.start().expect("start");
    run_until(vm, timeout, "the guest kernel to finish booting", |vm| {
        vm.console().tail().iter().any(|l| l.contains(IDLE_LINE))
    });
}

/// A fresh directory for this test process.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memvisor-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}
