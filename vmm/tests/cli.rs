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
