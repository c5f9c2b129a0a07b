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

/// Linux's memory block size on x86_64 (also its sparsemem section size): hotplugged memory is
/// added to the guest in units of this, so the hotplug region is aligned to it.
pub const LINUX_MEMORY_BLOCK_SIZE: u64 = 128 << 20;
/// Highest guest physical address (exclusive) Linux x86_64 accepts for hotplugged memory with
/// 4-level paging (`MAX_PHYSMEM_BITS` = 46).
pub const MAX_GUEST_PHYS_ADDR: u64 = 1 << 46;

/// Why a hotplug region cannot go where it was asked to, or anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The region size is zero.
    #[error("the hotplug region is empty")]
    Empty,
    /// No address fits the region above guest RAM.
    #[error("no room for a hotplug region of {region_size:#x} bytes")]
    NoRoom {
        /// Region size.
        region_size: u64,
    },
    /// A user-given region address overlaps guest RAM or the MMIO hole.
    #[error("the hotplug region {addr:#x}+{size:#x} overlaps guest RAM or the 3-4 GiB MMIO hole")]
    Overlaps {
        /// Region address.
        addr: u64,
        /// Region size.
        size: u64,
    },
}

/// The hotplug region's address: `requested` if the user gave one (refused if it overlaps
/// guest RAM or the MMIO hole), otherwise the one [`place_hotplug_region`] picks.
pub fn hotplug_region_addr(
    ram: &[RamRange],
    requested: Option<u64>,
    size: u64,
) -> Result<u64, PlacementError> {
    let Some(addr) = requested else {
        return place_hotplug_region(ram, size);
    };
    let end = addr.saturating_add(size);
    let overlaps = |start: u64, len: u64| addr < start.saturating_add(len) && start < end;
    if ram.iter().any(|r| overlaps(r.start.0, r.size))
        || overlaps(MMIO_HOLE_START, MMIO_HOLE_END - MMIO_HOLE_START)
    {
        return Err(PlacementError::Overlaps { addr, size });
    }
    Ok(addr)
}

/// Where to put a hotplug region of `region_size` bytes above guest RAM `ram`: aligned to
/// [`LINUX_MEMORY_BLOCK_SIZE`], and not in the 3–4 GiB MMIO hole (above 4 GiB when the RAM
/// reaches the hole or the region would cross into it).
pub fn place_hotplug_region(ram: &[RamRange], region_size: u64) -> Result<u64, PlacementError> {
    let no_room = || PlacementError::NoRoom { region_size };
    if region_size == 0 {
        return Err(PlacementError::Empty);
    }
    let mut ram_end = 0u64;
    for r in ram {
        ram_end = ram_end.max(r.start.0.checked_add(r.size).ok_or_else(no_room)?);
    }
    let align = |a: u64| -> Result<u64, PlacementError> {
        a.checked_next_multiple_of(LINUX_MEMORY_BLOCK_SIZE)
            .ok_or_else(no_room)
    };
    let mut addr = align(ram_end)?;
    let crosses_hole = |a: u64| {
        a.checked_add(region_size)
            .is_none_or(|end| end > MMIO_HOLE_START && a < MMIO_HOLE_END)
    };
    if crosses_hole(addr) {
        addr = align(addr.max(MMIO_HOLE_END))?;
    }
    let end = addr.checked_add(region_size).ok_or_else(no_room)?;
    if end > MAX_GUEST_PHYS_ADDR {
        return Err(no_room());
    }
    Ok(addr)
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

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn ram(ranges: &[(u64, u64)]) -> Vec<RamRange> {
        ranges.iter().map(|&(a, s)| RamRange::new(a, s)).collect()
    }

    #[test]
    fn region_goes_right_above_small_ram_aligned_to_128_mib() {
        let place = |r: &[(u64, u64)], size| place_hotplug_region(&ram(r), size);
        assert_eq!(place(&[(0, 256 * MIB)], GIB), Ok(256 * MIB));
        assert_eq!(place(&[(0, 200 * MIB)], GIB), Ok(256 * MIB));
    }

    #[test]
    fn region_that_would_cross_the_mmio_hole_goes_above_4_gib() {
        let place = |r: &[(u64, u64)], size| place_hotplug_region(&ram(r), size);
        assert_eq!(place(&[(0, 2 * GIB)], 2 * GIB), Ok(4 * GIB));
        assert_eq!(place(&[(0, 3 * GIB)], 128 * MIB), Ok(4 * GIB));
    }

    #[test]
    fn region_goes_above_ram_that_crosses_the_mmio_hole() {
        let r = ram(&[(0, 3 * GIB), (4 * GIB, GIB + 3 * MIB)]);
        assert_eq!(place_hotplug_region(&r, GIB), Ok(5 * GIB + 128 * MIB));
        assert_eq!(
            hotplug_region_addr(&ram_ranges(4 * GIB), None, GIB),
            Ok(5 * GIB)
        );
    }

    #[test]
    fn region_that_does_not_fit_is_refused() {
        assert_eq!(
            place_hotplug_region(&ram(&[(0, GIB)]), MAX_GUEST_PHYS_ADDR),
            Err(PlacementError::NoRoom {
                region_size: MAX_GUEST_PHYS_ADDR
            })
        );
        assert!(matches!(
            place_hotplug_region(&ram(&[(u64::MAX - 10, 5)]), GIB),
            Err(PlacementError::NoRoom { .. })
        ));
        assert_eq!(
            place_hotplug_region(&ram(&[(0, GIB)]), 0),
            Err(PlacementError::Empty)
        );
    }

    #[test]
    fn a_given_region_address_is_kept() {
        assert_eq!(
            hotplug_region_addr(&ram(&[(0, GIB)]), Some(4 * GIB), 512 * MIB),
            Ok(4 * GIB)
        );
    }

    #[test]
    fn a_given_region_overlapping_ram_or_the_mmio_hole_is_refused() {
        let region = 4 * GIB;
        for r in [&[(0u64, 8 * GIB)][..], &[(0, GIB), (region + MIB, GIB)][..]] {
            assert!(
                matches!(
                    hotplug_region_addr(&ram(r), Some(region), 512 * MIB),
                    Err(PlacementError::Overlaps { .. })
                ),
                "{r:?}"
            );
        }
        assert_eq!(
            hotplug_region_addr(
                &ram(&[(0, GIB)]),
                Some(MMIO_HOLE_START - 128 * MIB),
                256 * MIB
            ),
            Err(PlacementError::Overlaps {
                addr: MMIO_HOLE_START - 128 * MIB,
                size: 256 * MIB
            })
        );
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
