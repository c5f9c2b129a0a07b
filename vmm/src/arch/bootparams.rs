//! The Linux zero page (`struct boot_params`), its e820 map and the `setup_data` chain.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// `setup_data` type of a random seed for the guest's RNG.
pub const SETUP_RNG_SEED: u32 = 9;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
/// The boot protocol version we claim when booting an ELF vmlinux (2.12: 64-bit entry,
/// `setup_data`, 64-bit `ext_*` fields).
const BOOT_PROTOCOL_VERSION: u16 = 0x020c;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// `E820_RAM` or `E820_RESERVED`.
    pub kind: u32,
}

/// The e820 map for `mem_size` bytes of RAM laid out by [`super::layout::ram_ranges`].
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let low_end = mem_size.min(MMIO_HOLE_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        // The EBDA and BIOS area hold the MP table; Linux must not use them as RAM.
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > low_end {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: mem_size - low_end,
            kind: E820_RAM,
        });
    }
    map
}

/// What goes into the zero page besides the e820 map.
#[derive(Clone, Copy, Debug, Default)]
pub struct ZeroPageInputs {
    /// The kernel's own setup header (bzImage), or `None` for an ELF vmlinux.
    pub kernel_header: Option<setup_header>,
    /// Guest address and length (without NUL) of the command line.
    pub cmdline_addr: u64,
    /// Command line length including the terminating NUL.
    pub cmdline_size: u32,
    /// Guest address and size of the initrd, if any.
    pub initrd: Option<(u64, u32)>,
    /// Guest address of the first `setup_data` node, or 0.
    pub setup_data: u64,
}

/// Builds the zero page.
pub fn build_zero_page(inputs: &ZeroPageInputs, e820: &[E820Entry]) -> boot_params {
    let mut params = boot_params::default();
    match inputs.kernel_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.version = BOOT_PROTOCOL_VERSION;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = inputs.cmdline_addr as u32;
    params.hdr.cmdline_size = inputs.cmdline_size;
    if let Some((addr, size)) = inputs.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size;
    }
    params.hdr.setup_data = inputs.setup_data;
    let n = e820.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(e820.iter().take(n)) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = n as u8;
    params
}

/// A `setup_data` node carrying `seed` as the guest RNG's seed (type 9). The guest credits it
/// as entropy, which spares it a long wait for its entropy pool at boot.
pub fn rng_seed_setup_data(seed: &[u8; 32]) -> Vec<u8> {
    let mut node = Vec::with_capacity(16 + seed.len());
    node.extend_from_slice(&0u64.to_le_bytes()); // next
    node.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node.extend_from_slice(&(seed.len() as u32).to_le_bytes());
    node.extend_from_slice(seed);
    node
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_the_bios_area() {
        let m = e820_map(128 << 20);
        let ram: u64 = m
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (128 << 20) - (HIMEM_START - EBDA_START));
        assert!(m
            .iter()
            .any(|e| e.kind == E820_RESERVED && e.addr == EBDA_START));
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "sorted, no overlap");
        }
    }

    #[test]
    fn e820_puts_ram_beyond_the_hole_above_4g() {
        let m = e820_map(5 << 30);
        let last = m.last().expect("entries");
        assert_eq!(last.addr, MMIO_HOLE_END);
        assert_eq!(last.size, 2 << 30);
        assert!(m
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
    }

    #[test]
    fn zero_page_for_elf_kernel_has_magic_and_pointers() {
        let inputs = ZeroPageInputs {
            kernel_header: None,
            cmdline_addr: 0x20000,
            cmdline_size: 17,
            initrd: Some((0x700_0000, 0x1234)),
            setup_data: 0x8000,
        };
        let p = build_zero_page(&inputs, &e820_map(128 << 20));
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 17);
        assert_eq!({ p.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.hdr.setup_data }, 0x8000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, HIMEM_START);
    }

    #[test]
    fn zero_page_for_bzimage_keeps_the_kernel_header() {
        let hdr = setup_header {
            version: 0x020f,
            setup_sects: 30,
            ..Default::default()
        };
        let inputs = ZeroPageInputs {
            kernel_header: Some(hdr),
            ..Default::default()
        };
        let p = build_zero_page(&inputs, &[]);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.setup_sects }, 30);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn rng_seed_node_layout() {
        let node = rng_seed_setup_data(&[7u8; 32]);
        assert_eq!(node.len(), 48);
        assert_eq!(&node[0..8], &[0; 8]);
        assert_eq!(u32::from_le_bytes(node[8..12].try_into().expect("4")), 9);
        assert_eq!(u32::from_le_bytes(node[12..16].try_into().expect("4")), 32);
        assert!(node[16..].iter().all(|b| *b == 7));
    }
}
