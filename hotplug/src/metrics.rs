//! Counters of one virtio-mem device, owned by the instance (not global), read without locking
//! the device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use memory::Metric;

/// What the device did, since it was created.
#[derive(Debug, Default)]
pub struct VirtioMemMetrics {
    /// PLUG requests acknowledged.
    pub plugs: AtomicU64,
    /// UNPLUG requests acknowledged.
    pub unplugs: AtomicU64,
    /// UNPLUG_ALL requests acknowledged.
    pub unplug_alls: AtomicU64,
    /// STATE requests acknowledged.
    pub state_requests: AtomicU64,
    /// Bytes plugged by acknowledged PLUG requests.
    pub plugged_bytes: AtomicU64,
    /// Bytes unplugged by acknowledged UNPLUG and UNPLUG_ALL requests.
    pub unplugged_bytes: AtomicU64,
    /// Requests answered NACK (plugging beyond the requested size).
    pub nacks: AtomicU64,
    /// Requests answered ERROR (unaligned, outside the region, wrong block state, unknown type).
    pub errors: AtomicU64,
    /// Requests answered BUSY (a memslot or discard failed on the host; the guest retries).
    pub busy: AtomicU64,
    /// Descriptor chains refused: request too short, no room for the response, wrong order,
    /// outside guest memory.
    pub bad_descriptors: AtomicU64,
    /// Memslots added.
    pub memslot_adds: AtomicU64,
    /// Memslots removed.
    pub memslot_removes: AtomicU64,
    /// Memslot additions or removals that failed.
    pub memslot_failures: AtomicU64,
    /// Discards (of unplugged blocks) that failed; their memory stays resident.
    pub discard_failures: AtomicU64,
    /// Sum of the host-side time of acknowledged PLUG requests, in nanoseconds.
    pub plug_latency_ns: AtomicU64,
    /// Longest host-side time of one acknowledged PLUG request, in nanoseconds.
    pub plug_latency_ns_max: AtomicU64,
    /// Sum of the host-side time of acknowledged UNPLUG and UNPLUG_ALL requests, in nanoseconds.
    pub unplug_latency_ns: AtomicU64,
    /// Longest host-side time of one acknowledged UNPLUG or UNPLUG_ALL request, in nanoseconds.
    pub unplug_latency_ns_max: AtomicU64,
    /// Interrupts that could not be raised.
    pub interrupt_failures: AtomicU64,
}

impl VirtioMemMetrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn record_latency(total: &AtomicU64, max: &AtomicU64, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        total.fetch_add(ns, Ordering::Relaxed);
        max.fetch_max(ns, Ordering::Relaxed);
    }

    /// Every metric, as the exporter shows it (names in Prometheus style, without prefix): the
    /// latency maxima are gauges, the rest counters. A flat table, one entry per metric: its
    /// length is the number of metrics, not logic.
    pub fn list(&self) -> Vec<Metric> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            Metric::counter(
                "plugs_total",
                "PLUG requests acknowledged.",
                get(&self.plugs),
            ),
            Metric::counter(
                "unplugs_total",
                "UNPLUG requests acknowledged.",
                get(&self.unplugs),
            ),
            Metric::counter(
                "unplug_alls_total",
                "UNPLUG_ALL requests acknowledged.",
                get(&self.unplug_alls),
            ),
            Metric::counter(
                "state_requests_total",
                "STATE requests acknowledged.",
                get(&self.state_requests),
            ),
            Metric::counter(
                "plugged_bytes_total",
                "Bytes plugged by acknowledged PLUG requests.",
                get(&self.plugged_bytes),
            ),
            Metric::counter(
                "unplugged_bytes_total",
                "Bytes unplugged by acknowledged UNPLUG and UNPLUG_ALL requests.",
                get(&self.unplugged_bytes),
            ),
            Metric::counter("nacks_total", "Requests answered NACK.", get(&self.nacks)),
            Metric::counter(
                "errors_total",
                "Requests answered ERROR.",
                get(&self.errors),
            ),
            Metric::counter("busy_total", "Requests answered BUSY.", get(&self.busy)),
            Metric::counter(
                "bad_descriptors_total",
                "Descriptor chains refused.",
                get(&self.bad_descriptors),
            ),
            Metric::counter(
                "memslot_adds_total",
                "Memslots added.",
                get(&self.memslot_adds),
            ),
            Metric::counter(
                "memslot_removes_total",
                "Memslots removed.",
                get(&self.memslot_removes),
            ),
            Metric::counter(
                "memslot_failures_total",
                "Memslot additions or removals that failed.",
                get(&self.memslot_failures),
            ),
            Metric::counter(
                "discard_failures_total",
                "Discards of unplugged blocks that failed.",
                get(&self.discard_failures),
            ),
            Metric::counter(
                "plug_latency_ns_total",
                "Host time of acknowledged PLUG requests, nanoseconds.",
                get(&self.plug_latency_ns),
            ),
            Metric::level(
                "plug_latency_ns_max",
                "Longest host time of one PLUG request, nanoseconds.",
                get(&self.plug_latency_ns_max),
            ),
            Metric::counter(
                "unplug_latency_ns_total",
                "Host time of acknowledged UNPLUG and UNPLUG_ALL requests, nanoseconds.",
                get(&self.unplug_latency_ns),
            ),
            Metric::level(
                "unplug_latency_ns_max",
                "Longest host time of one UNPLUG or UNPLUG_ALL request, nanoseconds.",
                get(&self.unplug_latency_ns_max),
            ),
            Metric::counter(
                "interrupt_failures_total",
                "Interrupts that could not be raised.",
                get(&self.interrupt_failures),
            ),
        ]
    }

    /// Every metric as (name, value), names as in [`VirtioMemMetrics::list`].
    pub fn values(&self) -> Vec<(&'static str, u64)> {
        self.list().iter().map(|m| (m.name, m.as_u64())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_list_every_counter_by_name() {
        let m = VirtioMemMetrics::default();
        VirtioMemMetrics::add(&m.nacks, 2);
        let values = m.values();
        assert_eq!(values.len(), 19);
        assert!(values.contains(&("nacks_total", 2)));
        assert!(values.contains(&("plugs_total", 0)));
    }

    #[test]
    fn latency_maxima_are_gauges_and_the_rest_counters() {
        let m = VirtioMemMetrics::default();
        for metric in m.list() {
            let expected = if metric.name.ends_with("_max") {
                memory::MetricKind::Gauge
            } else {
                memory::MetricKind::Counter
            };
            assert_eq!(metric.kind(), expected, "{}", metric.name);
        }
    }

    #[test]
    fn latency_keeps_sum_and_max() {
        let m = VirtioMemMetrics::default();
        for us in [5, 30, 10] {
            VirtioMemMetrics::record_latency(
                &m.plug_latency_ns,
                &m.plug_latency_ns_max,
                Duration::from_micros(us),
            );
        }
        let values = m.values();
        assert!(values.contains(&("plug_latency_ns_total", 45_000)));
        assert!(values.contains(&("plug_latency_ns_max", 30_000)));
    }
}
