//! Metric values as their owners report them. Each owner (a device, the swapper, the sharing
//! sample, host KSM) says whether a value is a counter or a gauge; an exporter (the VMM's
//! `GET /metrics`) only adds its prefix and labels and renders them.
//!
//! The type lives in this crate because every owner depends on it (`balloon` and `hotplug`
//! do, and `memory` owns swap, sharing and KSM).

use crate::sharing::SharingStats;

/// Whether a metric only goes up or goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (or resets to zero when its owner is created again).
    Counter,
    /// Goes up and down: a level, a size, a state, a quantile, a maximum.
    Gauge,
}

/// A metric's value, of its kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetricValue {
    /// A count since the owner was created.
    Counter(u64),
    /// A level.
    Gauge(f64),
}

/// One metric as its owner reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Metric {
    /// Name in Prometheus style, without the exporter's prefix. A counter's name ends in
    /// `_total` or the exporter adds it.
    pub name: &'static str,
    /// What it measures, in one line.
    pub help: &'static str,
    /// The value, and with it the kind.
    pub value: MetricValue,
}

impl Metric {
    /// A counter.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        Metric {
            name,
            help,
            value: MetricValue::Counter(value),
        }
    }

    /// A gauge.
    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Self {
        Metric {
            name,
            help,
            value: MetricValue::Gauge(value),
        }
    }

    /// A gauge of an integer level (a size, a count of pages, a state code).
    pub fn level(name: &'static str, help: &'static str, value: u64) -> Self {
        Self::gauge(name, help, value as f64)
    }

    /// Counter or gauge.
    pub fn kind(&self) -> MetricKind {
        match self.value {
            MetricValue::Counter(_) => MetricKind::Counter,
            MetricValue::Gauge(_) => MetricKind::Gauge,
        }
    }

    /// The value as an integer (a gauge's is rounded toward zero, saturating).
    pub fn as_u64(&self) -> u64 {
        match self.value {
            MetricValue::Counter(v) => v,
            MetricValue::Gauge(v) => v as u64,
        }
    }
}

impl SharingStats {
    /// The sample's figures as gauges (names to go after an exporter's `sharing_` prefix); a
    /// mean or median with no pages to summarise is left out.
    pub fn metrics(&self) -> Vec<Metric> {
        let c = &self.counts;
        let optional = [
            (
                "count_arithmetic_mean",
                "Arithmetic mean of the map counts.",
                c.arithmetic_mean,
            ),
            (
                "count_geometric_mean",
                "Geometric mean of the map counts.",
                c.geometric_mean,
            ),
            (
                "count_harmonic_mean",
                "Harmonic mean of the map counts.",
                c.harmonic_mean,
            ),
            ("count_median", "Median of the map counts.", c.median),
        ];
        let mut out = vec![
            Metric::level(
                "pages_sampled",
                "Pages in the latest sharing sample.",
                self.pages_sampled,
            ),
            Metric::level(
                "pages_shared",
                "Sampled pages whose frame has 2+ mappings.",
                self.pages_shared,
            ),
        ];
        out.extend(
            optional
                .into_iter()
                .filter_map(|(name, help, v)| Some(Metric::gauge(name, help, v?))),
        );
        out.push(Metric::level(
            "reclaimable_bytes",
            "Host bytes reclaiming the VM would free (estimate).",
            self.reclaimable.bytes,
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharing::{CountSummary, Estimate};

    #[test]
    fn the_constructor_decides_the_kind() {
        assert_eq!(
            Metric::counter("a_total", "A.", 3).kind(),
            MetricKind::Counter
        );
        assert_eq!(Metric::gauge("b", "B.", 0.5).kind(), MetricKind::Gauge);
        assert_eq!(Metric::level("c", "C.", 7).value, MetricValue::Gauge(7.0));
        assert_eq!(Metric::level("c", "C.", 7).as_u64(), 7);
    }

    #[test]
    fn sharing_metrics_are_gauges_and_leave_out_missing_means() {
        let stats = SharingStats {
            guest_pages: 100,
            pages_sampled: 10,
            pages_resident: 8,
            pages_swapped: 0,
            pages_zero_page: 1,
            pages_exclusive: 3,
            pages_shared: 4,
            counts: CountSummary {
                arithmetic_mean: Some(1.5),
                geometric_mean: None,
                harmonic_mean: None,
                median: Some(1.0),
            },
            max_count: 3,
            reclaimable: Estimate {
                bytes: 4096,
                stderr_bytes: 0,
            },
            proportional: Estimate::default(),
            sample_time_us: 5,
        };
        let m = stats.metrics();
        let names: Vec<&str> = m.iter().map(|m| m.name).collect();
        assert_eq!(
            names,
            [
                "pages_sampled",
                "pages_shared",
                "count_arithmetic_mean",
                "count_median",
                "reclaimable_bytes"
            ]
        );
        assert!(m.iter().all(|m| m.kind() == MetricKind::Gauge));
        assert_eq!(m[2].value, MetricValue::Gauge(1.5));
        assert_eq!(m[4].as_u64(), 4096);
    }
}
