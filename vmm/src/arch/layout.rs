//! The guest physical address map.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_0520  IDT
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8000  setup_data (RNG seed)         0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4   0xa000 PDPT   0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  top of base RAM (e820)        0x000f_0000  MP table (reserved, BIOS area)
//! 0x0010_0000  high memory: kernel (vmlinux loads at its physical address), initrd at the top
//! 0xc000_0000  32-bit MMIO hole (virtio-mmio devices, IOAPIC, LAPIC) up to 4 GiB
//! 0x1_0000_0000  RAM above 4 GiB, then the hotplug region
//! ```

use memory::RamRange;

/// Global descriptor table.
pub const GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty; Linux installs its own).
pub const IDT_START: u64 = 0x520;
/// The Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// `setup_data` chain (RNG seed).
pub const SETUP_DATA_START: u64 = 0x8000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum command line length, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// End of conventional memory reported as RAM (the EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer and configuration table (Linux scans 0xf0000..0x100000).
pub const MPTABLE_START: u64 = 0xf0000;
/// Start of high memory, where Linux expects to be loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window (inside the MMIO hole).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Three pages KVM needs for its real-mode TSS (inside the MMIO hole, never RAM).
pub const KVM_TSS_START: u64 = 0xfffb_d000;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;

/// The guest RAM ranges for `mem_size` bytes of RAM: below the MMIO hole first, the rest above
/// 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    let low = mem_size.min(MMIO_HOLE_START);
    let mut ranges = vec![RamRange::new(0, low)];
    if mem_size > low {
        ranges.push(RamRange::new(MMIO_HOLE_END, mem_size - low));
    }
    ranges
}

/// End of RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range() {
        assert_eq!(ram_ranges(128 << 20), vec![RamRange::new(0, 128 << 20)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_hole() {
        let r = ram_ranges(4 << 30);
        assert_eq!(
            r,
            vec![RamRange::new(0, 3 << 30), RamRange::new(4 << 30, 1 << 30)]
        );
        assert_eq!(r.iter().map(|r| r.size).sum::<u64>(), 4 << 30);
    }

    #[test]
    fn fixed_areas_do_not_overlap() {
        let areas = [
            (GDT_START, 0x20),
            (IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (SETUP_DATA_START, 0xff0),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
        ];
        for (i, a) in areas.iter().enumerate() {
            for b in &areas[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
            assert!(a.0 + a.1 <= EBDA_START);
        }
    }
}
