//! CPUID filtering: start from what KVM supports and describe each vCPU the way a real VMM
//! does (its APIC ID, the topology, the hypervisor bit, no PMU).

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Number of bits needed to hold `n` distinct IDs (ceil(log2 n)).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Adjusts `entries` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `cpu_index` of `cpu_count`. Each
/// vCPU is one core of one package, one thread per core.
pub fn filter_cpuid(entries: &mut [kvm_cpuid_entry2], cpu_index: u8, cpu_count: u8) {
    let count = u32::from(cpu_count.max(1));
    let apic_id = u32::from(cpu_index);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
                e.ecx |= ECX_HYPERVISOR;
            }
            LEAF_CACHE => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: threads sharing the cache - 1.
                // Caches above L2 are shared by the package; L1/L2 are per core.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            LEAF_PMU => {
                // No virtual PMU: guests must not program counters we do not save or migrate.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0; // one thread per core
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index; // level type 0: invalid, ends the enumeration
                    }
                }
            }
            _ => {}
        }
    }
}

/// The guest's physical address width from CPUID leaf 0x8000_0008 (EAX bits 7:0), 36 (the
/// architectural minimum) when the leaf is missing.
pub fn phys_addr_bits(entries: &[kvm_cpuid_entry2]) -> u32 {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| e.eax & 0xff)
        .filter(|b| *b > 0)
        .unwrap_or(36)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn physical_address_width_comes_from_leaf_0x80000008() {
        assert_eq!(phys_addr_bits(&sample()), 36, "missing leaf: the minimum");
        let mut entries = sample();
        entries.push(entry(0x8000_0008, 0, 0x3028, 0, 0, 0));
        assert_eq!(phys_addr_bits(&entries), 40);
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0, 0x000a_0f11, 0xff00_0800, 0x0000_0001, 0x1000_0000),
            entry(0x4, 0, 0x0000_0121, 0, 0, 0), // L1 data cache
            entry(0x4, 3, 0x0000_0163, 0, 0, 0), // L3 cache
            entry(0xa, 0, 0x0704_0803, 0xff, 0, 0x603),
            entry(0xb, 0, 1, 2, 0x100, 9),
            entry(0xb, 1, 4, 16, 0x201, 9),
            entry(0xb, 2, 0, 0, 2, 9),
            entry(0x8000_0001, 0, 1, 2, 3, 4),
        ]
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut c = sample();
        filter_cpuid(&mut c, 3, 4);
        assert_eq!(c[0].ebx >> 24, 3);
        assert_eq!((c[0].ebx >> 16) & 0xff, 4);
        assert_eq!(c[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(c[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(c[0].ecx & 1, 0, "other feature bits are kept");
        assert_ne!(c[0].edx & EDX_HTT, 0);
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut c = sample();
        filter_cpuid(&mut c, 0, 1);
        assert_eq!(c[0].edx & EDX_HTT, 0);
        assert_eq!(c[0].ebx >> 24, 0);
    }

    #[test]
    fn pmu_is_hidden_and_other_leaves_untouched() {
        let mut c = sample();
        filter_cpuid(&mut c, 0, 2);
        assert_eq!((c[3].eax, c[3].ebx, c[3].ecx, c[3].edx), (0, 0, 0, 0));
        assert_eq!((c[7].eax, c[7].ebx, c[7].ecx, c[7].edx), (1, 2, 3, 4));
    }

    #[test]
    fn topology_describes_one_thread_per_core() {
        let mut c = sample();
        filter_cpuid(&mut c, 5, 6);
        assert_eq!((c[4].eax, c[4].ebx, c[4].ecx >> 8, c[4].edx), (0, 1, 1, 5));
        assert_eq!((c[5].eax, c[5].ebx, c[5].ecx >> 8, c[5].edx), (3, 6, 2, 5));
        assert_eq!(c[6].ecx >> 8, 0, "enumeration ends");
        assert_eq!(c[1].eax >> 26, 5, "cores per package - 1");
        assert_eq!((c[1].eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((c[2].eax >> 14) & 0xfff, 5, "L3 is shared by the package");
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
