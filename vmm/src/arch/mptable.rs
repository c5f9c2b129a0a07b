//! The Intel MultiProcessor Specification (1.4) table that tells Linux how many CPUs there are
//! and how legacy IRQs reach the IOAPIC, for guests without ACPI.
//!
//! The floating pointer and the configuration table sit together at
//! [`MPTABLE_START`](super::layout::MPTABLE_START), in the BIOS area Linux scans.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, IOAPIC_START};

/// Legacy IRQ lines routed 1:1 to IOAPIC pins.
pub const IOAPIC_PINS: u8 = 24;
/// APIC IDs are 8 bits and the IOAPIC takes the one after the last CPU.
pub const MAX_CPUS: u8 = 254;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Errors from building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// Zero CPUs or more than [`MAX_CPUS`].
    #[error("{0} vCPUs cannot be described in an MP table (1 to 254)")]
    CpuCount(u8),
    /// The table could not be written to guest memory.
    #[error("cannot write the MP table to guest memory")]
    Write,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, for placement at `addr`.
pub fn build(addr: u64, num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MpTableError::CpuCount(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // ISA IRQ n arrives on IOAPIC pin n, with the bus's default polarity and trigger.
        entries.extend_from_slice(&[ENTRY_IO_INT, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCAL_INT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"MEMVISOR");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_LEN + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&((addr + FLOATING_LEN as u64) as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0u8; 5]); // feature bytes: a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` CPUs at `addr`.
pub fn write(mem: &GuestMemoryMmap, addr: u64, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(addr, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|_| MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid_and_pointer_points_to_table() {
        for cpus in [1u8, 2, 8, MAX_CPUS] {
            let t = build(0xf0000, cpus).expect("build");
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().expect("4 bytes"));
            assert_eq!(ptr, 0xf0010);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
        }
    }

    #[test]
    fn one_processor_entry_per_cpu_and_only_cpu0_is_bsp() {
        let t = build(0xf0000, 3).expect("build");
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;
        assert_eq!(count, 3 + 1 + 1 + IOAPIC_PINS as usize + 2);
        let procs: Vec<&[u8]> = table[HEADER_LEN..].chunks(20).take(3).collect();
        for (i, p) in procs.iter().enumerate() {
            assert_eq!(p[0], ENTRY_PROCESSOR);
            assert_eq!(p[1] as usize, i);
            assert_eq!(p[3] & CPU_BSP != 0, i == 0);
        }
        let ioapic = &table[HEADER_LEN + 60 + 8..HEADER_LEN + 60 + 16];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 3, "IOAPIC ID follows the CPUs");
    }

    #[test]
    fn cpu_count_is_bounded() {
        assert_eq!(build(0, 0), Err(MpTableError::CpuCount(0)));
        assert_eq!(build(0, 255), Err(MpTableError::CpuCount(255)));
    }
}
