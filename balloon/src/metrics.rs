//! Counters of one balloon device, owned by the instance (not global), read without locking the
//! device.

use std::sync::atomic::{AtomicU64, Ordering};

use memory::Metric;

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

    /// Every counter, as the exporter shows it (names in Prometheus style, without prefix).
    pub fn list(&self) -> Vec<Metric> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            Metric::counter(
                "inflated_pages_total",
                "Pages the guest put into the balloon.",
                get(&self.inflated_pages),
            ),
            Metric::counter(
                "deflated_pages_total",
                "Pages the guest took back out of the balloon.",
                get(&self.deflated_pages),
            ),
            Metric::counter(
                "reported_pages_total",
                "Pages the guest reported free.",
                get(&self.reported_pages),
            ),
            Metric::counter(
                "discard_calls_total",
                "Discards of guest memory (one per coalesced range).",
                get(&self.discard_calls),
            ),
            Metric::counter(
                "discard_failures_total",
                "Discards that failed; their memory stays resident.",
                get(&self.discard_failures),
            ),
            Metric::counter(
                "bad_descriptors_total",
                "Descriptors refused.",
                get(&self.bad_descriptors),
            ),
            Metric::counter(
                "bad_pfns_total",
                "Page frame numbers refused as not guest RAM.",
                get(&self.bad_pfns),
            ),
            Metric::counter(
                "stats_updates_total",
                "Statistics buffers received from the guest.",
                get(&self.stats_updates),
            ),
            Metric::counter(
                "stats_requests_missed_total",
                "Statistics requests the guest had not answered when the next was due.",
                get(&self.stats_requests_missed),
            ),
            Metric::counter(
                "interrupt_failures_total",
                "Interrupts that could not be raised.",
                get(&self.interrupt_failures),
            ),
        ]
    }

    /// Every counter as (name, value), names as in [`BalloonMetrics::list`].
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        self.list().iter().map(|m| (m.name, m.as_u64())).collect()
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

    #[test]
    fn every_balloon_metric_is_a_counter() {
        let m = BalloonMetrics::default();
        assert!(m
            .list()
            .iter()
            .all(|m| m.kind() == memory::MetricKind::Counter));
    }
}
