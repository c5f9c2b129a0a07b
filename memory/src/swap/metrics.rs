//! Counters and the fault latency histogram, owned by one swapper (no global statics).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by the swapper and its fault-handling thread.
#[derive(Debug, Default)]
pub struct SwapMetrics {
    /// Missing faults served from the swap file.
    pub faults_served: AtomicU64,
    /// Missing faults served with the zero page (zero pages swapped out, forgotten pages, and
    /// pages never touched).
    pub zero_faults: AtomicU64,
    /// Write-protect faults (a write raced a swap-out).
    pub wp_faults: AtomicU64,
    /// Pages that a write kept in RAM during a swap-out.
    pub raced_pages: AtomicU64,
    /// Pages written to the swap file.
    pub pages_written: AtomicU64,
    /// Bytes written to the swap file.
    pub bytes_written: AtomicU64,
    /// Bytes read back from the swap file (faults and swap-in).
    pub bytes_read: AtomicU64,
    /// Pages brought back by a swap-in rather than by a fault.
    pub pages_swapped_in: AtomicU64,
    /// Failed writes to the swap file (the pages stayed in RAM).
    pub write_errors: AtomicU64,
    /// Failed reads from the swap file.
    pub read_errors: AtomicU64,
    /// Pages read back whose bytes did not match the checksum taken when they were written.
    pub checksum_errors: AtomicU64,
    /// Other errors (madvise, write-protect, mincore).
    pub other_errors: AtomicU64,
}

impl SwapMetrics {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Buckets of 1 µs up to 1 ms, then of 1 ms up to 1 s, then one overflow bucket.
const FINE: usize = 1000;
const COARSE: usize = 1000;

/// A fixed-bucket latency histogram in microseconds, lock-free to record.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        LatencyHistogram {
            buckets: (0..FINE + COARSE + 1).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn bucket(us: u64) -> usize {
        if us < FINE as u64 {
            us as usize
        } else if us < (FINE as u64) * 1000 {
            FINE + (us / 1000) as usize
        } else {
            FINE + COARSE
        }
    }

    /// Upper bound (µs) of what bucket `b` holds.
    fn bucket_value(b: usize) -> u64 {
        if b < FINE {
            b as u64
        } else if b < FINE + COARSE {
            ((b - FINE) as u64 + 1) * 1000
        } else {
            u64::MAX
        }
    }

    /// Records one sample.
    pub fn record_us(&self, us: u64) {
        self.buckets[Self::bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The `q` quantile (0..=1) in µs, with the resolution of the buckets; 0 with no samples.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::bucket_value(b);
            }
        }
        Self::bucket_value(counts.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_known_distribution() {
        let h = LatencyHistogram::new();
        assert_eq!(h.quantile_us(0.5), 0);
        for us in 1..=100 {
            h.record_us(us);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_us(0.5), 50);
        assert_eq!(h.quantile_us(0.99), 99);
        assert_eq!(h.quantile_us(1.0), 100);
    }

    #[test]
    fn slow_samples_land_in_coarse_buckets() {
        let h = LatencyHistogram::new();
        h.record_us(5);
        h.record_us(2_500);
        h.record_us(5_000_000);
        assert_eq!(h.quantile_us(0.5), 3_000);
        assert_eq!(h.quantile_us(1.0), u64::MAX);
    }
}
