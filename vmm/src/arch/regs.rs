//! vCPU register state at the 64-bit Linux entry point: general registers, segments and control
//! registers, FPU, MSRs and the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::gdt::{boot_gdt, segment_from_gdt, BOOT_CS, BOOT_DS, BOOT_TSS};
use super::layout::{BOOT_STACK_POINTER, GDT_START, IDT_START, ZERO_PAGE_START};

/// Errors from setting up a vCPU's registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM vCPU ioctl failed.
    #[error("cannot set the vCPU's {what}")]
    Kvm {
        /// Which piece of state.
        what: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many were set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// The GDT or IDT could not be written.
    #[error("cannot write the boot GDT/IDT to guest memory")]
    Memory,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// MSR numbers set at boot.
mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// The MSRs Linux expects a firmware to have initialised.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(msr::IA32_SYSENTER_CS, 0),
        e(msr::IA32_SYSENTER_ESP, 0),
        e(msr::IA32_SYSENTER_EIP, 0),
        e(msr::STAR, 0),
        e(msr::CSTAR, 0),
        e(msr::KERNEL_GS_BASE, 0),
        e(msr::SYSCALL_MASK, 0),
        e(msr::LSTAR, 0),
        e(msr::IA32_TSC, 0),
        e(msr::IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(msr::MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

/// General registers at the 64-bit entry: `rsi` points at the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Segment and control registers for long mode with paging rooted at `cr3`.
pub fn boot_sregs(mut sregs: kvm_sregs, cr3: u64) -> kvm_sregs {
    let gdt = boot_gdt();
    let code = segment_from_gdt(gdt[2], BOOT_CS);
    let data = segment_from_gdt(gdt[3], BOOT_DS);
    let tss = segment_from_gdt(gdt[4], BOOT_TSS);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// Writes the boot GDT and an empty IDT into guest memory.
pub fn write_gdt_idt(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    for (i, entry) in boot_gdt().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + 8 * i as u64))
            .map_err(|_| RegsError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|_| RegsError::Memory)
}

/// Sets every register of the boot vCPU for a jump to `entry`.
pub fn setup_boot_vcpu(vcpu: &VcpuFd, entry: u64, cr3: u64) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    vcpu.set_sregs(&boot_sregs(sregs, cr3))
        .map_err(kvm("special registers"))?;
    vcpu.set_regs(&boot_regs(entry)).map_err(kvm("registers"))?;
    Ok(())
}

/// State every vCPU needs: FPU, MSRs, LAPIC LINT0 as ExtINT and LINT1 as NMI.
pub fn setup_common_vcpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU"))?;

    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("MSRs"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC"))?;
    set_lvt(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_lvt(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC"))?;
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Sets the delivery mode of a local vector table register, keeping its other bits.
fn set_lvt(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, byte) in b.iter_mut().enumerate() {
        *byte = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_registers_follow_the_boot_protocol() {
        let r = boot_regs(0x100_0000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, ZERO_PAGE_START);
        assert_eq!(r.rflags & 0x2, 0x2, "reserved bit 1 set");
        assert_eq!(r.rflags & 0x200, 0, "interrupts off");
    }

    #[test]
    fn long_mode_with_paging() {
        let s = boot_sregs(kvm_sregs::default(), 0x9000);
        assert_eq!(s.cr3, 0x9000);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.cr0 & X86_CR0_PE, 0);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cs.selector, BOOT_CS);
        assert_eq!(s.ds.selector, BOOT_DS);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 39);
    }

    #[test]
    fn boot_msrs_enable_mtrrs_write_back_and_fast_strings() {
        let m = boot_msr_entries();
        let get = |i| m.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(
            get(msr::MTRR_DEF_TYPE),
            Some(MTRR_ENABLE | MTRR_MEM_TYPE_WB)
        );
        assert_eq!(get(msr::IA32_MISC_ENABLE), Some(MISC_ENABLE_FAST_STRING));
        assert_eq!(get(msr::LSTAR), Some(0));
    }

    #[test]
    fn lvt_mode_is_replaced_and_mask_kept() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0 + 2] = 1; // mask bit 16
        regs[APIC_LVT0 + 1] = 0x05; // some old mode bits
        set_lvt(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let v = u32::from_le_bytes([
            regs[APIC_LVT0] as u8,
            regs[APIC_LVT0 + 1] as u8,
            regs[APIC_LVT0 + 2] as u8,
            regs[APIC_LVT0 + 3] as u8,
        ]);
        assert_eq!((v >> 8) & 0x7, 7);
        assert_eq!(v & (1 << 16), 1 << 16);
    }
}
