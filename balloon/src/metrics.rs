//! Counters of one balloon device, owned by the instance (not global), read without locking the
//! device.

use std::sync::atomic::{AtomicU64, Ordering};

/// What the balloon did, since it was created.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Pages the guest put into the balloon (valid, distinct PFNs).
    pub inflated_pages: AtomicU64,
    /// Pages the guest took back out.
    pub deflated_pages: AtomicU64,
    /// Pages the guest reported free (free page reporting).
    pub reported_pages: AtomicU64,
    /// Discard calls (one per coalesced range), i.e. madvise syscalls on real guest RAM.
    pub discard_calls: AtomicU64,
    /// Discard calls that failed; their pages stay resident.
    pub discard_failures: AtomicU64,
    /// Descriptors refused: wrong direction, bad length, outside guest memory.
    pub bad_descriptors: AtomicU64,
    /// PFNs refused because they are not guest RAM.
    pub bad_pfns: AtomicU64,
    /// Stats buffers received from the guest.
    pub stats_updates: AtomicU64,
    /// Stats requests the guest had not answered when the next one was due.
    pub stats_requests_missed: AtomicU64,
    /// Interrupts that could not be raised.
    pub interrupt_failures: AtomicU64,
}

impl BalloonMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Every counter as (name, value), names in Prometheus style without prefix.
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("inflated_pages_total", get(&self.inflated_pages)),
            ("deflated_pages_total", get(&self.deflated_pages)),
            ("reported_pages_total", get(&self.reported_pages)),
            ("discard_calls_total", get(&self.discard_calls)),
            ("discard_failures_total", get(&self.discard_failures)),
            ("bad_descriptors_total", get(&self.bad_descriptors)),
            ("bad_pfns_total", get(&self.bad_pfns)),
            ("stats_updates_total", get(&self.stats_updates)),
            (
                "stats_requests_missed_total",
                get(&self.stats_requests_missed),
            ),
            ("interrupt_failures_total", get(&self.interrupt_failures)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_list_every_counter_by_name() {
        let m = BalloonMetrics::default();
        BalloonMetrics::add(&m.bad_pfns, 3);
        let values = m.values();
        assert_eq!(values.len(), 10);
        assert!(values.contains(&("bad_pfns_total", 3)));
        assert!(values.contains(&("inflated_pages_total", 0)));
    }
}
