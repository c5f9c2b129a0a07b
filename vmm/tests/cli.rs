//! The `memvisor` command's behaviour on bad input: one line on stderr, a non-zero status.

use std::process::{Command, Output};

fn memvisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(args)
        .env_remove("MEMVISOR_LOG")
        .output()
        .expect("run memvisor")
}

fn assert_one_line_error(out: &Output, needle: &str) {
    assert!(!out.status.success(), "status {:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains("host KVM emulates"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr:?}");
    assert!(
        lines[0].contains(needle),
        "{:?} does not mention {needle:?}",
        lines[0]
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("memvisor-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

#[test]
fn missing_kernel_is_one_line() {
    // The VMM opens /dev/kvm before it reads the kernel.
    memory::require!(Kvm);
    let out = memvisor(&["run", "--kernel", "/nonexistent"]);
    assert_one_line_error(&out, "cannot open kernel /nonexistent");
}

#[test]
fn a_file_that_is_not_a_kernel_is_one_line() {
    // The VMM opens /dev/kvm before it reads the kernel.
    memory::require!(Kvm);
    let p = temp_file("junk", &[0x5a; 4096]);
    let out = memvisor(&["run", "--kernel", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, "is not a Linux kernel");
}

#[test]
fn malformed_flag_values_are_one_line() {
    let out = memvisor(&["run", "--kernel", "/k", "--memory", "lots"]);
    assert_one_line_error(&out, "--memory");
    let out = memvisor(&["run", "--kernel", "/k", "--cpus", "many"]);
    assert_one_line_error(&out, "--cpus");
    let out = memvisor(&["run", "--no-such-flag"]);
    assert_one_line_error(&out, "--no-such-flag");
}

#[test]
fn out_of_range_values_are_one_line() {
    let p = temp_file("k", &[0; 16]);
    let k = p.to_str().expect("utf8");
    let out = memvisor(&["run", "--kernel", k, "--cpus", "0"]);
    assert_one_line_error(&out, "cpus must be between 1 and");
    let out = memvisor(&["run", "--kernel", k, "--memory", "1M"]);
    assert_one_line_error(&out, "memory must be at least");
    let out = memvisor(&["run", "--kernel", k, "--memory", "64T"]);
    assert_one_line_error(&out, "larger than the host");
}

#[test]
fn bad_hotplug_and_swap_flags_are_one_line() {
    let out = memvisor(&["run", "--kernel", "/k", "--hotplug", "lots"]);
    assert_one_line_error(&out, "--hotplug");
    let out = memvisor(&["run", "--kernel", "/k", "--hotplug", "1G,block_size=3M"]);
    assert_one_line_error(&out, "--hotplug");
    let out = memvisor(&["run", "--kernel", "/k", "--hotplug", "1G,colour=red"]);
    assert_one_line_error(&out, "unknown hotplug option 'colour'");
    let p = temp_file("k2", &[0; 16]);
    let k = p.to_str().expect("utf8");
    let out = memvisor(&["run", "--kernel", k, "--swap-dir", "/nonexistent/dir"]);
    assert_one_line_error(&out, "swap directory /nonexistent/dir is not a directory");
}

#[test]
fn memory_too_small_for_the_kernel_is_one_line() {
    // The VMM opens /dev/kvm before it reads the kernel.
    memory::require!(Kvm);
    // The ELF segment wants to load at 64 MiB; the VM has 32 MiB.
    let mut elf = vec![0u8; 0x1000];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&62u16.to_le_bytes());
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&0x400_0000u64.to_le_bytes());
    elf[32..40].copy_from_slice(&64u64.to_le_bytes());
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut elf[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes());
    ph[8..16].copy_from_slice(&0x800u64.to_le_bytes());
    ph[16..24].copy_from_slice(&0x400_0000u64.to_le_bytes());
    ph[24..32].copy_from_slice(&0x400_0000u64.to_le_bytes());
    ph[32..40].copy_from_slice(&0x100u64.to_le_bytes());
    ph[40..48].copy_from_slice(&0x100u64.to_le_bytes());
    let p = temp_file("far-kernel", &elf);
    let out = memvisor(&[
        "run",
        "--kernel",
        p.to_str().expect("utf8"),
        "--memory",
        "32M",
    ]);
    assert_one_line_error(&out, "does not fit in 32 MiB");
}

#[test]
fn help_succeeds() {
    let out = memvisor(&["run", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--memory"));
}

/// A minimal ELF executable whose one segment, `jmp $` (the guest spins), loads and starts at
/// 2 MiB: memvisor loads it like a vmlinux. (The layout of `memvisor_tests::tiny_elf`, which
/// this crate cannot depend on.)
fn spinning_kernel() -> Vec<u8> {
    const LOAD: u64 = 0x20_0000;
    const CODE: &[u8] = &[0xeb, 0xfe];
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4..7].copy_from_slice(&[2, 1, 1]); // 64-bit, little endian, version 1
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let p = &mut f[64..120];
    p[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    p[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    p[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    p[16..24].copy_from_slice(&LOAD.to_le_bytes()); // p_vaddr
    p[24..32].copy_from_slice(&LOAD.to_le_bytes()); // p_paddr
    p[32..40].copy_from_slice(&(CODE.len() as u64).to_le_bytes()); // p_filesz
    p[40..48].copy_from_slice(&(CODE.len() as u64).to_le_bytes()); // p_memsz
    p[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(CODE);
    f
}

/// `memvisor run` with an API socket and swap armed, stopped by `signal`: it must exit 0 within
/// a bound and leave neither the socket nor a swap file behind. (Run with `--release` to check
/// the release binary.)
fn stop_by_signal(signal: i32, name: &str) {
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("temp dir");
    let kernel = dir.path().join("spin.elf");
    std::fs::write(&kernel, spinning_kernel()).expect("write kernel");
    let socket = dir.path().join("api.sock");
    let swap_dir = dir.path().join("swap");
    std::fs::create_dir(&swap_dir).expect("swap dir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_memvisor"))
        .args(["run", "--memory", "32M", "--kernel"])
        .arg(&kernel)
        .arg("--api-socket")
        .arg(&socket)
        .arg("--swap-dir")
        .arg(&swap_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start memvisor");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "no API socket within 30 s");
        assert!(child.try_wait().expect("wait").is_none(), "memvisor ended");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctl = memvisor(&[
        "ctl",
        "--api-socket",
        socket.to_str().expect("utf-8"),
        "swap",
        "8M",
    ]);
    assert!(
        ctl.status.success(),
        "swap: {}",
        String::from_utf8_lossy(&ctl.stderr)
    );

    // SAFETY: kill sends a signal to the child we started; it touches no memory.
    let ret = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(ret, 0, "kill");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("memvisor did not stop within 20 s of {name}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(status.success(), "{name}: {status:?}\n{stderr}");
    assert!(!socket.exists(), "{name} left the API socket behind");
    let left: Vec<_> = std::fs::read_dir(&swap_dir)
        .expect("swap dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "{name} left swap files: {left:?}");
}

#[test]
fn sigterm_stops_the_vm_and_leaves_nothing_behind() {
    stop_by_signal(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_stops_the_vm_and_leaves_nothing_behind() {
    stop_by_signal(libc::SIGINT, "SIGINT");
}
