//! Identity-mapped page tables for the 64-bit boot protocol.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{PDE_START, PDPTE_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// The entries of the three tables that identity-map the first 1 GiB with 2 MiB pages:
/// `(pml4[0], pdpt[0], pd[0..512])`.
pub fn identity_map_entries() -> (u64, u64, Vec<u64>) {
    let pml4 = PDPTE_START | PRESENT_RW;
    let pdpt = PDE_START | PRESENT_RW;
    let pd = (0..512u64)
        .map(|i| (i << 21) | PRESENT_RW | PAGE_SIZE_2M)
        .collect();
    (pml4, pdpt, pd)
}

/// Writes the page tables; returns the value for CR3.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<u64, vm_memory::GuestMemoryError> {
    let (pml4, pdpt, pd) = identity_map_entries();
    mem.write_obj(pml4, GuestAddress(PML4_START))?;
    mem.write_obj(pdpt, GuestAddress(PDPTE_START))?;
    for (i, e) in pd.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(PDE_START + 8 * i as u64))?;
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables the way the MMU does for a 2 MiB mapping.
    fn translate(mem: &GuestMemoryMmap, cr3: u64, va: u64) -> Option<u64> {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + 8 * ((va >> 39) & 0x1ff)))
            .ok()?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + 8 * ((va >> 30) & 0x1ff)))
            .ok()?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((va >> 21) & 0x1ff)))
            .ok()?;
        if pde & 1 == 0 || pde & PAGE_SIZE_2M == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn first_gib_is_identity_mapped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        let cr3 = write_page_tables(&mem).expect("write");
        assert_eq!(cr3, PML4_START);
        for va in [0u64, 0x7000, 0x100_0000, 0x1234_5678, (1 << 30) - 1] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 1 << 30), None, "nothing above 1 GiB");
    }
}
