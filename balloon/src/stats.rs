//! The guest's memory statistics (virtio 1.x 5.5.6.3 plus the tags Linux 6.12 added).

use std::collections::BTreeMap;

use serde::Serialize;

/// Size of one `struct virtio_balloon_stat` (le16 tag, le64 value, packed).
pub const STAT_SIZE: usize = 10;

/// The statistics of one stats buffer. A tag the guest did not send is `None`; tags this
/// version does not know are kept by number in `unknown`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BalloonStats {
    /// Tag 0: memory swapped in, bytes.
    pub swap_in_bytes: Option<u64>,
    /// Tag 1: memory swapped out, bytes.
    pub swap_out_bytes: Option<u64>,
    /// Tag 2: major page faults.
    pub major_faults: Option<u64>,
    /// Tag 3: minor page faults.
    pub minor_faults: Option<u64>,
    /// Tag 4: free memory, bytes.
    pub free_memory_bytes: Option<u64>,
    /// Tag 5: total memory, bytes.
    pub total_memory_bytes: Option<u64>,
    /// Tag 6: available memory (MemAvailable), bytes.
    pub available_memory_bytes: Option<u64>,
    /// Tag 7: disk caches, bytes.
    pub disk_caches_bytes: Option<u64>,
    /// Tag 8: hugetlb page allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Tag 9: hugetlb page allocation failures.
    pub hugetlb_failures: Option<u64>,
    /// Tag 10 (Linux 6.12+): OOM killer invocations.
    pub oom_kills: Option<u64>,
    /// Tag 11 (Linux 6.12+): memory allocation stalls.
    pub alloc_stalls: Option<u64>,
    /// Tag 12 (Linux 6.12+): memory scanned by kswapd, bytes.
    pub async_scan_bytes: Option<u64>,
    /// Tag 13 (Linux 6.12+): memory scanned by direct reclaim, bytes.
    pub direct_scan_bytes: Option<u64>,
    /// Tag 14 (Linux 6.12+): memory reclaimed by kswapd, bytes.
    pub async_reclaim_bytes: Option<u64>,
    /// Tag 15 (Linux 6.12+): memory reclaimed by direct reclaim, bytes.
    pub direct_reclaim_bytes: Option<u64>,
    /// Tags this version does not know, by number.
    pub unknown: BTreeMap<u16, u64>,
}

impl BalloonStats {
    fn slot(&mut self, tag: u16) -> Option<&mut Option<u64>> {
        Some(match tag {
            0 => &mut self.swap_in_bytes,
            1 => &mut self.swap_out_bytes,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory_bytes,
            5 => &mut self.total_memory_bytes,
            6 => &mut self.available_memory_bytes,
            7 => &mut self.disk_caches_bytes,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kills,
            11 => &mut self.alloc_stalls,
            12 => &mut self.async_scan_bytes,
            13 => &mut self.direct_scan_bytes,
            14 => &mut self.async_reclaim_bytes,
            15 => &mut self.direct_reclaim_bytes,
            _ => return None,
        })
    }

    /// Records one (tag, value) pair; a repeated tag keeps the last value.
    pub fn set(&mut self, tag: u16, value: u64) {
        match self.slot(tag) {
            Some(slot) => *slot = Some(value),
            None => {
                self.unknown.insert(tag, value);
            }
        }
    }

    /// Parses a stats buffer: whole 10-byte entries; trailing bytes of a partial entry are
    /// ignored.
    pub fn parse(bytes: &[u8]) -> Self {
        let mut stats = BalloonStats::default();
        for entry in bytes.chunks_exact(STAT_SIZE) {
            let tag = u16::from_le_bytes([entry[0], entry[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&entry[2..]);
            stats.set(tag, u64::from_le_bytes(value));
        }
        stats
    }

    /// Every stat the guest sent as (name, value), unknown tags as `tag_<n>`.
    pub fn values(&self) -> Vec<(String, u64)> {
        let named = [
            ("swap_in_bytes", self.swap_in_bytes),
            ("swap_out_bytes", self.swap_out_bytes),
            ("major_faults", self.major_faults),
            ("minor_faults", self.minor_faults),
            ("free_memory_bytes", self.free_memory_bytes),
            ("total_memory_bytes", self.total_memory_bytes),
            ("available_memory_bytes", self.available_memory_bytes),
            ("disk_caches_bytes", self.disk_caches_bytes),
            ("hugetlb_allocations", self.hugetlb_allocations),
            ("hugetlb_failures", self.hugetlb_failures),
            ("oom_kills", self.oom_kills),
            ("alloc_stalls", self.alloc_stalls),
            ("async_scan_bytes", self.async_scan_bytes),
            ("direct_scan_bytes", self.direct_scan_bytes),
            ("async_reclaim_bytes", self.async_reclaim_bytes),
            ("direct_reclaim_bytes", self.direct_reclaim_bytes),
        ];
        named
            .into_iter()
            .filter_map(|(n, v)| v.map(|v| (n.to_string(), v)))
            .chain(self.unknown.iter().map(|(t, v)| (format!("tag_{t}"), *v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tag: u16, value: u64) -> Vec<u8> {
        let mut e = tag.to_le_bytes().to_vec();
        e.extend_from_slice(&value.to_le_bytes());
        e
    }

    #[test]
    fn every_linux_tag_up_to_6_12_has_a_name() {
        let bytes: Vec<u8> = (0..16u16)
            .flat_map(|t| entry(t, u64::from(t) + 100))
            .collect();
        let stats = BalloonStats::parse(&bytes);
        assert!(stats.unknown.is_empty());
        assert_eq!(stats.values().len(), 16);
        assert_eq!(stats.oom_kills, Some(110));
        assert_eq!(stats.direct_reclaim_bytes, Some(115));
    }

    #[test]
    fn unknown_tags_are_kept_by_number_and_partial_entries_ignored() {
        let mut bytes = entry(4, 1 << 20);
        bytes.extend(entry(42, 7));
        bytes.extend([1, 2, 3]);
        let stats = BalloonStats::parse(&bytes);
        assert_eq!(stats.free_memory_bytes, Some(1 << 20));
        assert_eq!(stats.unknown.get(&42), Some(&7));
        assert!(stats.values().contains(&("tag_42".to_string(), 7)));
    }
}
