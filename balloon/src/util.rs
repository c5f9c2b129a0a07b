//! Pure helpers: turning the guest's PFNs into a few coalesced guest-physical ranges.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The balloon's page size: PFNs in the inflate and deflate queues count 4 KiB pages whatever
/// the guest's own page size (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const BALLOON_PAGE_SHIFT: u32 = 12;
/// Bytes per balloon page.
pub const BALLOON_PAGE_SIZE: u64 = 1 << BALLOON_PAGE_SHIFT;

/// A run of consecutive balloon pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PfnRange {
    /// First page frame number.
    pub start_pfn: u64,
    /// Number of pages (at least 1).
    pub num_pages: u64,
}

impl PfnRange {
    /// One past the last page frame number.
    pub fn end_pfn(&self) -> u64 {
        self.start_pfn + self.num_pages
    }
}

/// Sorts and deduplicates `pfns` in place and merges consecutive ones into ranges, in ascending
/// order, none touching or overlapping another.
pub fn compact_pfns(pfns: &mut [u64]) -> Vec<PfnRange> {
    pfns.sort_unstable();
    let mut ranges: Vec<PfnRange> = Vec::new();
    for &pfn in pfns.iter() {
        match ranges.last_mut() {
            Some(last) if pfn < last.end_pfn() => {} // a duplicate
            Some(last) if pfn == last.end_pfn() => last.num_pages += 1,
            _ => ranges.push(PfnRange {
                start_pfn: pfn,
                num_pages: 1,
            }),
        }
    }
    ranges
}

/// Sorts `ranges` and merges overlapping or touching ones; empty ranges are dropped.
pub fn merge_ranges(ranges: &mut [PfnRange]) -> Vec<PfnRange> {
    ranges.sort_unstable_by_key(|r| r.start_pfn);
    let mut merged: Vec<PfnRange> = Vec::new();
    for &range in ranges.iter().filter(|r| r.num_pages > 0) {
        match merged.last_mut() {
            Some(last) if range.start_pfn <= last.end_pfn() => {
                last.num_pages = last.end_pfn().max(range.end_pfn()) - last.start_pfn;
            }
            _ => merged.push(range),
        }
    }
    merged
}

/// The parts of a PFN range that are guest RAM, as (address, length in bytes) split at region
/// boundaries, and the number of pages of the range that are not guest RAM.
pub fn clip_to_memory(range: PfnRange, mem: &GuestMemoryMmap) -> (Vec<(GuestAddress, u64)>, u64) {
    // PFNs come from 32-bit or 64-bit guest fields; shifting can overflow for garbage values.
    let start = range.start_pfn.checked_mul(BALLOON_PAGE_SIZE);
    let end = range.end_pfn().checked_mul(BALLOON_PAGE_SIZE);
    let (Some(start), Some(end)) = (start, end) else {
        return (Vec::new(), range.num_pages);
    };
    let mut parts = Vec::new();
    let mut inside = 0u64;
    for region in mem.iter() {
        let r_start = region.start_addr().0;
        let r_end = r_start + region.len();
        let lo = start.max(r_start);
        let hi = end.min(r_end);
        if lo < hi {
            // Regions are page aligned (memory::GuestRam checks), so lo..hi is too.
            parts.push((GuestAddress(lo), hi - lo));
            inside += hi - lo;
        }
    }
    (parts, range.num_pages - inside / BALLOON_PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(start_pfn: u64, num_pages: u64) -> PfnRange {
        PfnRange {
            start_pfn,
            num_pages,
        }
    }

    #[test]
    fn consecutive_pfns_in_any_order_become_one_range() {
        let mut pfns = vec![7, 5, 6, 4, 10, 11, 6];
        assert_eq!(compact_pfns(&mut pfns), vec![r(4, 4), r(10, 2)]);
    }

    #[test]
    fn no_pfns_give_no_ranges() {
        assert!(compact_pfns(&mut []).is_empty());
    }

    #[test]
    fn range_is_clipped_to_ram_and_split_at_regions() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x4000), 0x2000),
            (GuestAddress(0x10000), 0x1000),
        ])
        .expect("mem");
        let (parts, bad) = clip_to_memory(r(2, 16), &mem);
        assert_eq!(
            parts,
            vec![
                (GuestAddress(0x2000), 0x2000),
                (GuestAddress(0x4000), 0x2000),
                (GuestAddress(0x10000), 0x1000)
            ]
        );
        assert_eq!(bad, 16 - 5);
    }

    #[test]
    fn pfn_whose_address_overflows_is_outside_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000)]).expect("mem");
        let (parts, bad) = clip_to_memory(r(u64::MAX - 1, 1), &mem);
        assert!(parts.is_empty());
        assert_eq!(bad, 1);
    }

    proptest! {
        #[test]
        fn compaction_covers_exactly_the_input_pfns(
            mut pfns in proptest::collection::vec(0u64..2048, 0..600)
        ) {
            let mut expected: Vec<u64> = pfns.clone();
            expected.sort_unstable();
            expected.dedup();
            let ranges = compact_pfns(&mut pfns);
            let covered: Vec<u64> = ranges
                .iter()
                .flat_map(|r| r.start_pfn..r.end_pfn())
                .collect();
            prop_assert_eq!(covered, expected);
            for pair in ranges.windows(2) {
                // Strictly ascending with a gap: otherwise they should have been merged.
                prop_assert!(pair[0].end_pfn() < pair[1].start_pfn);
            }
            prop_assert!(ranges.iter().all(|r| r.num_pages >= 1));
        }

        #[test]
        fn merging_covers_exactly_the_union_of_ranges(
            mut ranges in proptest::collection::vec((0u64..512, 0u64..40), 0..50)
                .prop_map(|v| v.into_iter().map(|(s, n)| r(s, n)).collect::<Vec<_>>())
        ) {
            let mut expected: Vec<u64> = ranges
                .iter()
                .flat_map(|r| r.start_pfn..r.end_pfn())
                .collect();
            expected.sort_unstable();
            expected.dedup();
            let merged = merge_ranges(&mut ranges);
            let covered: Vec<u64> = merged
                .iter()
                .flat_map(|r| r.start_pfn..r.end_pfn())
                .collect();
            prop_assert_eq!(covered, expected);
            for pair in merged.windows(2) {
                prop_assert!(pair[0].end_pfn() < pair[1].start_pfn);
            }
        }

        #[test]
        fn clipping_conserves_pages(start in 0u64..64, len in 1u64..64) {
            let mem = GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0x4000), 0x8000),
                (GuestAddress(0x20000), 0x4000),
            ])
            .expect("mem");
            let (parts, bad) = clip_to_memory(r(start, len), &mem);
            let inside: u64 = parts.iter().map(|(_, l)| l / BALLOON_PAGE_SIZE).sum();
            prop_assert_eq!(inside + bad, len);
            for (addr, l) in parts {
                prop_assert!(
                    <GuestMemoryMmap as GuestMemoryBackend>::check_range(&mem, addr, l as usize)
                );
            }
        }
    }
}
