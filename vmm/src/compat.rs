//! Compatibility steps for hosts whose KVM emulates guest kernel code.
//!
//! Some hosts offer `/dev/kvm` without hardware virtualization: a nested, page-table based
//! hypervisor (the `kvm_pvm` module) runs guest ring 0 through KVM's instruction emulator. A
//! stock Linux guest's kernel boots there, slowly, but its user space cannot run, and a few
//! instructions are not emulated. Everything memvisor does differently on such a host lives in
//! this module, is decided once at start and logged once:
//!
//! 1. guest command-line additions that keep the kernel off instructions the emulator lacks
//!    (`clearcpuid=...`, `noxsave`) and off work that is pointless or very slow there (`nopti`;
//!    `rodata=off`, since write-protecting the kernel frees and poisons megabytes of memory with
//!    string instructions, measured at about 6 s of a 50 s boot);
//! 2. the `int3` rule: the emulator cannot execute `int3`, which the kernel uses when it patches
//!    its own code; memvisor skips the instruction and injects the breakpoint exception the CPU
//!    would have raised;
//! 3. the boot milestone: the kernel's `Run /init as init process` line instead of the marker
//!    that the guest's `/init` prints, since `/init` cannot run.
//!
//! Detection: the `kvm_pvm` module is loaded, or the CPU shows neither `vmx` nor `svm`.
//! `MEMVISOR_COMPAT=on|off` overrides it.

use kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
use kvm_ioctls::VcpuFd;

use crate::config::GUEST_READY_MARKER;

/// The kernel line that marks the end of its own boot.
pub const KERNEL_INIT_MILESTONE: &str = "Run /init as init process";

/// Command-line additions for emulated-kernel hosts.
pub const EMULATED_KERNEL_CMDLINE: &str = "tsc=reliable noxsave nopti rodata=off \
clearcpuid=smap,xsave,popcnt,avx,avx2,avx512f,bmi1,bmi2,movbe,fsgsbase,rdrand,rdseed,erms,fsrm,pcid,invpcid,rdpid";

const INT3: u8 = 0xcc;
const BP_VECTOR: u8 = 3;
const FLAG_INSTRUCTION_BYTES: u64 = 1;

/// What kind of host this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCompat {
    emulated_kernel: Option<String>,
}

impl HostCompat {
    /// A host with hardware virtualization: no compatibility steps.
    pub fn native() -> Self {
        HostCompat {
            emulated_kernel: None,
        }
    }

    /// A host whose KVM emulates guest kernel code, detected because of `reason`.
    pub fn emulated(reason: impl Into<String>) -> Self {
        HostCompat {
            emulated_kernel: Some(reason.into()),
        }
    }

    /// Looks at the host once.
    pub fn detect() -> Self {
        match std::env::var("MEMVISOR_COMPAT").as_deref() {
            Ok("on") => return Self::emulated("MEMVISOR_COMPAT=on"),
            Ok("off") => return Self::native(),
            _ => {}
        }
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            return Self::emulated("the kvm_pvm module is loaded");
        }
        if let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") {
            if let Some(flags) = cpuinfo.lines().find(|l| l.starts_with("flags")) {
                let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
                if !hw {
                    return Self::emulated("the CPU has neither vmx nor svm");
                }
            }
        }
        Self::native()
    }

    /// Whether guest kernel code is emulated on this host.
    pub fn is_emulated(&self) -> bool {
        self.emulated_kernel.is_some()
    }

    /// Logs what was detected, once per VM.
    pub fn log(&self) {
        if let Some(reason) = &self.emulated_kernel {
            tracing::warn!(
                "host KVM emulates guest kernel code ({reason}): adding guest command-line \
                 options, handling int3 in the VMM, boot milestone is the kernel starting /init"
            );
        }
    }

    /// Extra guest command-line options, if any.
    pub fn cmdline_additions(&self) -> Option<&'static str> {
        self.is_emulated().then_some(EMULATED_KERNEL_CMDLINE)
    }

    /// The console line that marks a finished boot of the default guest.
    pub fn boot_milestone(&self) -> &'static str {
        if self.is_emulated() {
            KERNEL_INIT_MILESTONE
        } else {
            GUEST_READY_MARKER
        }
    }

    /// Handles a `KVM_EXIT_INTERNAL_ERROR`. Returns `Ok(true)` when it was the `int3` case and
    /// the vCPU may resume, `Ok(false)` when it is a real error for the caller to report.
    pub fn handle_internal_error(&self, vcpu: &mut VcpuFd) -> Result<bool, kvm_ioctls::Error> {
        if !self.is_emulated() {
            return Ok(false);
        }
        // SAFETY: reading the `internal` member of the kvm_run union is valid right after
        // KVM_RUN returned with exit reason KVM_EXIT_INTERNAL_ERROR, which the caller checked.
        let (suberror, ndata, data) = unsafe {
            let internal = &vcpu.get_kvm_run().__bindgen_anon_1.internal;
            (internal.suberror, internal.ndata, internal.data)
        };
        if !is_int3_emulation_failure(suberror, ndata, &data) {
            return Ok(false);
        }
        let mut regs = vcpu.get_regs()?;
        regs.rip += 1;
        vcpu.set_regs(&regs)?;
        let mut events = vcpu.get_vcpu_events()?;
        events.exception.injected = 1;
        events.exception.nr = BP_VECTOR;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        vcpu.set_vcpu_events(&events)?;
        Ok(true)
    }
}

/// Reads the failing instruction out of an emulation-failure exit: `data[0]` holds flags,
/// then one byte of instruction length and the instruction bytes.
pub fn is_int3_emulation_failure(suberror: u32, ndata: u32, data: &[u64; 16]) -> bool {
    suberror == KVM_INTERNAL_ERROR_EMULATION
        && ndata >= 2
        && data[0] & FLAG_INSTRUCTION_BYTES != 0
        && (data[1] & 0xff) >= 1
        && ((data[1] >> 8) & 0xff) as u8 == INT3
}

/// Formats the instruction bytes of an emulation failure for an error message.
pub fn emulation_failure_bytes(ndata: u32, data: &[u64; 16]) -> String {
    if ndata < 2 || data[0] & FLAG_INSTRUCTION_BYTES == 0 {
        return String::from("unknown");
    }
    let len = (data[1] & 0xff).min(15) as usize;
    let bytes: Vec<u8> = data[1..]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .skip(1)
        .take(len)
        .collect();
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(bytes: &[u8]) -> [u64; 16] {
        let mut raw = vec![bytes.len() as u8];
        raw.extend_from_slice(bytes);
        raw.resize(120, 0);
        let mut data = [0u64; 16];
        data[0] = FLAG_INSTRUCTION_BYTES;
        for (i, chunk) in raw.chunks(8).enumerate() {
            data[1 + i] = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        data
    }

    #[test]
    fn int3_is_recognised_from_the_instruction_bytes() {
        let d = failure(&[0xcc, 0x90, 0x90]);
        assert!(is_int3_emulation_failure(
            KVM_INTERNAL_ERROR_EMULATION,
            4,
            &d
        ));
        assert!(!is_int3_emulation_failure(
            KVM_INTERNAL_ERROR_EMULATION,
            1,
            &d
        ));
        assert!(!is_int3_emulation_failure(2, 4, &d));
        let clac = failure(&[0x0f, 0x01, 0xca]);
        assert!(!is_int3_emulation_failure(
            KVM_INTERNAL_ERROR_EMULATION,
            4,
            &clac
        ));
        let mut no_bytes = d;
        no_bytes[0] = 0;
        assert!(!is_int3_emulation_failure(
            KVM_INTERNAL_ERROR_EMULATION,
            4,
            &no_bytes
        ));
    }

    #[test]
    fn failure_bytes_are_printable() {
        assert_eq!(
            emulation_failure_bytes(4, &failure(&[0x0f, 0x01, 0xca])),
            "0f 01 ca"
        );
        assert_eq!(emulation_failure_bytes(0, &[0; 16]), "unknown");
    }

    #[test]
    fn native_hosts_change_nothing() {
        let n = HostCompat::native();
        assert_eq!(n.cmdline_additions(), None);
        assert_eq!(n.boot_milestone(), GUEST_READY_MARKER);
        let e = HostCompat::emulated("test");
        assert!(e
            .cmdline_additions()
            .expect("additions")
            .contains("clearcpuid="));
        assert_eq!(e.boot_milestone(), KERNEL_INIT_MILESTONE);
    }
}
