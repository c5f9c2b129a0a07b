//! The boot GDT and the segment registers derived from it.

use kvm_bindings::kvm_segment;

/// Selector of the 64-bit code segment (the boot protocol's `__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS: u16 = 0x20;

/// Packs a segment descriptor. `flags` holds the access byte in bits 0..8 and the G/DB/L/AVL
/// nibble in bits 12..16, the way they sit in the descriptor's bytes 5 and 6.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
}

/// The boot GDT: null, null, 64-bit code, data, TSS.
pub fn boot_gdt() -> [u64; 5] {
    [
        0,
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: present, ring 0, exec/read, accessed; G, L
        gdt_entry(0xc093, 0, 0xfffff), // data: present, ring 0, read/write, accessed; G, DB
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS; G
    ]
}

/// The `kvm_segment` KVM expects for descriptor `entry` loaded with `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: (present == 0) as u8,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_ring0_flat() {
        let gdt = boot_gdt();
        let cs = segment_from_gdt(gdt[2], BOOT_CS);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.g, 1);
        assert_eq!(cs.present, 1);
        assert_eq!(cs.dpl, 0);
        assert_eq!(cs.s, 1);
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.base, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector as usize / 8, 2);
    }

    #[test]
    fn data_and_tss_segments() {
        let gdt = boot_gdt();
        let ds = segment_from_gdt(gdt[3], BOOT_DS);
        assert_eq!((ds.type_, ds.db, ds.l, ds.s), (3, 1, 0, 1));
        let tss = segment_from_gdt(gdt[4], BOOT_TSS);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn entry_packing_matches_known_values() {
        // Values any x86 reference lists for flat 64-bit code/data descriptors.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let e = gdt_entry(0x808b, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 0);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, (0xabcde << 12) | 0xfff);
    }
}
