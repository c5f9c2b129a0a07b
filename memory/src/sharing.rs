//! Page-sharing counts and a per-VM sharing metric.
//!
//! How much host memory would reclaiming from a VM really free? A guest page whose host frame is
//! mapped only by this VM frees one frame when it goes; a frame that KSM merged with pages of
//! other VMs frees nothing until every sharer drops it. [`SharingSampler`] answers the question
//! by sampling: it draws a uniform random sample of a VM's guest pages (default
//! [`DEFAULT_SAMPLE_PAGES`]), resolves each page to its host frame through `/proc/self/pagemap`
//! and each frame to its map count through `/proc/kpagecount`, and summarises the counts in a
//! [`SharingReport`].
//!
//! Reads are batched (sampled pages are sorted and neighbouring entries read with one `pread`)
//! and paced by a pages-per-second budget ([`SharingConfig::max_pages_per_s`]), so the cost of
//! sampling is bounded whatever the caller does. Reading PFNs needs `CAP_SYS_ADMIN` and
//! `/proc/kpagecount` needs root; without them the report says `"status": "unavailable"` and
//! why, instead of failing.
//!
//! The module has two halves: pure metric functions over a list of map counts (property
//! tested), then the sampler that reads the kernel's files.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::clock::{Clock, MonotonicClock};
use crate::ram::{GuestRam, PAGE_SIZE};

// ------------------------------------------------------------------------------------------------
// Pure metrics over map counts.
// ------------------------------------------------------------------------------------------------

/// Arithmetic mean of `counts`; `None` if empty.
pub fn arithmetic_mean(counts: &[u64]) -> Option<f64> {
    if counts.is_empty() {
        return None;
    }
    let sum: f64 = counts.iter().map(|&c| c as f64).sum();
    Some(sum / counts.len() as f64)
}

/// Geometric mean of `counts`; `None` if empty or if a count is 0 (the mean is only defined for
/// positive values, and a mapped frame has a count of at least 1).
pub fn geometric_mean(counts: &[u64]) -> Option<f64> {
    if counts.is_empty() || counts.contains(&0) {
        return None;
    }
    let log_sum: f64 = counts.iter().map(|&c| (c as f64).ln()).sum();
    Some((log_sum / counts.len() as f64).exp())
}

/// Harmonic mean of `counts`; `None` if empty or if a count is 0.
///
/// It is the mean that matters for memory: the VM's proportional share of the frames behind `r`
/// resident pages is `Σ 1/c = r / harmonic_mean`.
pub fn harmonic_mean(counts: &[u64]) -> Option<f64> {
    if counts.is_empty() || counts.contains(&0) {
        return None;
    }
    let inverse_sum: f64 = counts.iter().map(|&c| 1.0 / c as f64).sum();
    Some(counts.len() as f64 / inverse_sum)
}

/// Median of `counts` (the mean of the two middle values for an even number); `None` if empty.
pub fn median(counts: &[u64]) -> Option<f64> {
    if counts.is_empty() {
        return None;
    }
    let mut sorted = counts.to_vec();
    sorted.sort_unstable();
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        Some(sorted[mid] as f64)
    } else {
        Some((sorted[mid - 1] as f64 + sorted[mid] as f64) / 2.0)
    }
}

/// Arithmetic, geometric and harmonic means and the median of a set of map counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CountSummary {
    /// Arithmetic mean.
    pub arithmetic_mean: Option<f64>,
    /// Geometric mean.
    pub geometric_mean: Option<f64>,
    /// Harmonic mean.
    pub harmonic_mean: Option<f64>,
    /// Median.
    pub median: Option<f64>,
}

impl CountSummary {
    /// The summary of `counts` (all `None` when empty).
    pub fn of(counts: &[u64]) -> Self {
        CountSummary {
            arithmetic_mean: arithmetic_mean(counts),
            geometric_mean: geometric_mean(counts),
            harmonic_mean: harmonic_mean(counts),
            median: median(counts),
        }
    }
}

/// An estimate scaled from a sample to a whole VM, with its standard error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Estimate {
    /// The estimate, in bytes.
    pub bytes: u64,
    /// Its standard error, in bytes (sampling error only).
    pub stderr_bytes: u64,
}

/// Host bytes that reclaiming a VM of `guest_pages` pages would free, estimated from a uniform
/// sample without replacement of `sampled` pages of which `exclusive` were resident with a map
/// count of exactly 1.
///
/// The estimator is `guest_pages × (exclusive / sampled) × PAGE_SIZE`: the proportion of
/// exclusively mapped pages in the sample, scaled to the VM's size. It is unbiased for the
/// number of the VM's pages that sit alone in a host frame, and those are exactly the pages whose
/// reclaim (balloon, virtio-mem unplug, swap-out, `MADV_DONTNEED`) gives a frame back to the
/// host. What it leaves out, on purpose:
///
/// - A frame with map count `n ≥ 2` is freed only when all `n` mappings drop it. If the other
///   sharers are other VMs (or other processes), reclaiming this VM frees nothing of it. If some
///   sharers are other pages of this same VM (KSM also merges identical pages inside one VM),
///   tearing down the whole VM would free it, but reclaiming part of the VM frees it only if all
///   its in-VM copies are among the reclaimed pages. Counts alone cannot tell these apart, so
///   such frames count as 0: for a whole-VM teardown the estimate is a lower bound, for a partial
///   reclaim of pages chosen independently of sharing it is the expected yield per page.
/// - Pages not resident (never touched, already discarded or swapped out) free nothing.
/// - Pages mapped to the shared zero page (count 0) free nothing.
///
/// The standard error is that of a proportion sampled without replacement:
/// `guest_pages × PAGE_SIZE × sqrt(p(1-p)/sampled × (guest_pages-sampled)/(guest_pages-1))`;
/// it is 0 when every page was sampled.
pub fn estimate_reclaimable(guest_pages: u64, sampled: u64, exclusive: u64) -> Estimate {
    scale_proportion(guest_pages, sampled, exclusive as f64)
}

/// The VM's proportional share of host memory (like a process's PSS): every resident page
/// counts `1/c` of a frame for a map count `c`, scaled from the sample to the VM's size.
/// `inverse_count_sum` is `Σ 1/c` over the sampled resident pages with `c ≥ 1`.
///
/// This is what the VM costs the host when shared frames are charged fairly; the difference to
/// [`estimate_reclaimable`] is memory that sharing already saves and reclaim would not free.
pub fn estimate_proportional(guest_pages: u64, sampled: u64, inverse_count_sum: f64) -> Estimate {
    // For the error, treat each page's share as a value in [0, 1]; the variance of such a value
    // is at most p(1-p) for its mean p, so this bound is conservative.
    scale_proportion(guest_pages, sampled, inverse_count_sum)
}

fn scale_proportion(guest_pages: u64, sampled: u64, hits: f64) -> Estimate {
    if sampled == 0 || guest_pages == 0 {
        return Estimate::default();
    }
    let n = sampled as f64;
    let total = guest_pages as f64;
    let p = (hits / n).clamp(0.0, 1.0);
    let bytes = total * p * PAGE_SIZE as f64;
    let fpc = if guest_pages > 1 && sampled < guest_pages {
        (total - n) / (total - 1.0)
    } else {
        0.0
    };
    let stderr = total * PAGE_SIZE as f64 * (p * (1.0 - p) / n * fpc).sqrt();
    Estimate {
        bytes: bytes.round() as u64,
        stderr_bytes: stderr.round() as u64,
    }
}

// ------------------------------------------------------------------------------------------------
// Sampling.
// ------------------------------------------------------------------------------------------------

/// Pages sampled per VM by default.
pub const DEFAULT_SAMPLE_PAGES: usize = 4096;

/// Default cost bound: at most this many sampled pages per second, per sampler.
pub const DEFAULT_MAX_PAGES_PER_S: u64 = 100_000;

/// Where the kernel exposes the calling process's page table.
pub const PAGEMAP_PATH: &str = "/proc/self/pagemap";

/// Where the kernel exposes the map count of every frame.
pub const KPAGECOUNT_PATH: &str = "/proc/kpagecount";

/// Sampled pages handled per step; the pacer's burst.
const CHUNK_PAGES: usize = 512;

/// Two sampled pages at most this many pages apart share one pagemap read (8 bytes a page).
/// The kernel walks every page table entry in a read (about 50 ns each here, `perf`) and a
/// `pread` costs a few hundred ns, so short gaps only are worth bridging.
const PAGEMAP_MAX_GAP_PAGES: u64 = 8;

/// Two frames at most this many apart share one kpagecount read (each entry costs the kernel a
/// frame lookup, so this stays small too).
const KPAGECOUNT_MAX_GAP: u64 = 2;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// Errors from sampling that are not "the host does not let us" (those give
/// [`SharingReport::Unavailable`]).
#[derive(Debug, thiserror::Error)]
pub enum SharingError {
    /// A host range is not page aligned.
    #[error("host range {addr:#x}+{len:#x} is not page aligned")]
    BadRange {
        /// Host virtual start address.
        addr: usize,
        /// Length in bytes.
        len: u64,
    },
    /// Reading pagemap or kpagecount failed unexpectedly.
    #[error("cannot read {} at offset {offset}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The offset in bytes.
        offset: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// How a sampler samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharingConfig {
    /// Pages drawn per report (without replacement; a VM with fewer pages is read whole).
    pub sample_pages: usize,
    /// Cost bound: sampled pages per second, across all reports of one sampler. `None`: no
    /// bound (benchmarks).
    pub max_pages_per_s: Option<u64>,
    /// Seed of the sampler's PRNG. The PRNG advances across reports, so successive reports draw
    /// different pages; a fixed seed makes a sequence of reports reproducible.
    pub seed: u64,
}

impl Default for SharingConfig {
    /// 4,096 pages, at most 100,000 pages per second, seeded from the clock and the process id.
    fn default() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        SharingConfig {
            sample_pages: DEFAULT_SAMPLE_PAGES,
            max_pages_per_s: Some(DEFAULT_MAX_PAGES_PER_S),
            seed: nanos ^ (u64::from(std::process::id()) << 32),
        }
    }
}

/// A range of host virtual memory to sample. Only its addresses are used (to index pagemap);
/// the memory is never dereferenced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRange {
    /// Host virtual start address (page aligned).
    pub addr: usize,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

impl HostRange {
    /// The host ranges behind `ram`.
    pub fn of_ram(ram: &GuestRam) -> Vec<HostRange> {
        ram.host_ranges()
            .into_iter()
            .map(|(range, ptr)| HostRange {
                addr: ptr as usize,
                len: range.size,
            })
            .collect()
    }
}

/// Per-VM sharing figures from one sample.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SharingStats {
    /// Pages of guest RAM in the VM (the population sampled from).
    pub guest_pages: u64,
    /// Pages sampled.
    pub pages_sampled: u64,
    /// Sampled pages resident in host RAM (pagemap bit 63), including `pages_zero_page`.
    pub pages_resident: u64,
    /// Sampled pages swapped out by the host (pagemap bit 62).
    pub pages_swapped: u64,
    /// Resident sampled pages mapped to the shared zero page (map count 0): read but never
    /// written, they cost nothing and free nothing. Left out of the means.
    pub pages_zero_page: u64,
    /// Resident sampled pages whose frame has map count 1: reclaiming them frees a frame.
    pub pages_exclusive: u64,
    /// Resident sampled pages whose frame has map count 2 or more.
    pub pages_shared: u64,
    /// Means and median of the map counts of resident pages with a count of at least 1.
    pub counts: CountSummary,
    /// Largest map count seen.
    pub max_count: u64,
    /// Host bytes reclaiming this VM would free; see [`estimate_reclaimable`].
    pub reclaimable: Estimate,
    /// The VM's proportional share of host memory; see [`estimate_proportional`].
    pub proportional: Estimate,
    /// Wall time the sample took, pacing included, in microseconds.
    pub sample_time_us: u64,
}

/// What [`SharingSampler`] reports for one VM. Serialises with a `"status"` field: `"ok"` with
/// the figures of [`SharingStats`] inline, or `"unavailable"` with a `"reason"`.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SharingReport {
    /// The figures.
    #[serde(rename = "ok")]
    Measured(SharingStats),
    /// The host does not let this process read sharing counts.
    Unavailable {
        /// Why, in one sentence.
        reason: String,
    },
}

impl SharingReport {
    /// The figures, if there are any.
    pub fn stats(&self) -> Option<&SharingStats> {
        match self {
            SharingReport::Measured(stats) => Some(stats),
            SharingReport::Unavailable { .. } => None,
        }
    }
}

/// SplitMix64: a small, fast, well-mixed PRNG (Steele, Lea and Flood, 2014). Good enough to
/// choose pages; not for anything secret.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), without modulo bias (Lemire's method).
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(bound);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// `k` distinct indices drawn uniformly from `0..n`, sorted (Floyd's algorithm; all of `0..n`
/// when `k >= n`).
fn sample_indices(rng: &mut SplitMix64, n: u64, k: usize) -> Vec<u64> {
    if k as u64 >= n {
        return (0..n).collect();
    }
    let mut chosen = HashSet::with_capacity(k);
    for j in (n - k as u64)..n {
        let t = rng.below(j + 1);
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut out: Vec<u64> = chosen.into_iter().collect();
    out.sort_unstable();
    out
}

/// A token bucket that keeps the long-run rate of sampled pages at or below a budget, with a
/// burst of one chunk.
#[derive(Debug)]
struct Pacer {
    pages_per_s: Option<f64>,
    tokens: f64,
    last: Instant,
}

impl Pacer {
    fn new(max_pages_per_s: Option<u64>, clock: &dyn Clock) -> Self {
        Pacer {
            pages_per_s: max_pages_per_s.filter(|&r| r > 0).map(|r| r as f64),
            tokens: CHUNK_PAGES as f64,
            last: clock.now(),
        }
    }

    /// Blocks (on `clock`) until `pages` pages may be sampled.
    fn acquire(&mut self, pages: usize, clock: &dyn Clock) {
        let Some(rate) = self.pages_per_s else {
            return;
        };
        let pages = pages as f64;
        loop {
            let now = clock.now();
            let refill = now.duration_since(self.last).as_secs_f64() * rate;
            self.tokens = (self.tokens + refill).min((CHUNK_PAGES as f64).max(pages));
            self.last = now;
            if self.tokens >= pages {
                self.tokens -= pages;
                return;
            }
            clock.sleep(Duration::from_secs_f64((pages - self.tokens) / rate));
        }
    }
}

/// The state of one sampled page, from its pagemap entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageState {
    NotPresent,
    Swapped,
    Present { pfn: u64 },
}

fn decode_pagemap(entry: u64) -> PageState {
    if entry & PM_PRESENT != 0 {
        PageState::Present {
            pfn: entry & PM_PFN_MASK,
        }
    } else if entry & PM_SWAPPED != 0 {
        PageState::Swapped
    } else {
        PageState::NotPresent
    }
}

/// Groups sorted `keys` into runs whose neighbours are at most `max_gap` apart and whose span
/// is at most `max_span`; returns `(first, last)` index pairs into `keys`.
fn runs(keys: &[u64], max_gap: u64, max_span: u64) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=keys.len() {
        let split =
            i == keys.len() || keys[i] - keys[i - 1] > max_gap || keys[i] - keys[start] >= max_span;
        if split {
            if start < keys.len() {
                out.push((start, i - 1));
            }
            start = i;
        }
    }
    out
}

#[derive(Debug)]
struct Files {
    pagemap: File,
    pagemap_path: PathBuf,
    kpagecount: File,
    kpagecount_path: PathBuf,
}

/// Reads `count` u64 entries starting at entry `first` of `file` into `out`.
fn read_entries(
    file: &File,
    path: &Path,
    first: u64,
    count: usize,
    bytes: &mut Vec<u8>,
    out: &mut Vec<u64>,
) -> Result<(), SharingError> {
    let offset = first * 8;
    bytes.resize(count * 8, 0);
    file.read_exact_at(bytes, offset)
        .map_err(|source| SharingError::Read {
            path: path.to_path_buf(),
            offset,
            source,
        })?;
    out.clear();
    out.extend(
        bytes
            .chunks_exact(8)
            .map(|b| u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])),
    );
    Ok(())
}

/// Why a read error means "unavailable" rather than a failure.
fn unavailable_reason(err: &SharingError) -> Option<String> {
    let SharingError::Read { path, source, .. } = err else {
        return None;
    };
    matches!(
        source.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound
    )
    .then(|| {
        format!(
            "cannot read {}: {source}; page-sharing counts need root",
            path.display()
        )
    })
}

/// Totals of one sample, before they become [`SharingStats`].
#[derive(Debug, Default)]
struct Tally {
    sampled: u64,
    resident: u64,
    swapped: u64,
    zero_page: u64,
    hidden_pfn: u64,
    counts: Vec<u64>,
}

/// Samples guest pages and reports how widely their host frames are shared. Keeps
/// `/proc/self/pagemap` and `/proc/kpagecount` open between reports; one sampler can serve every
/// VM of a process, and its page budget then bounds them all together.
#[derive(Debug)]
pub struct SharingSampler {
    config: SharingConfig,
    files: Result<Files, String>,
    rng: SplitMix64,
    clock: Arc<dyn Clock>,
    pacer: Pacer,
    bytes: Vec<u8>,
    entries: Vec<u64>,
}

impl SharingSampler {
    /// A sampler reading the kernel's files. Never fails: if they cannot be opened (not root, no
    /// `/proc/kpagecount`), every report says why.
    pub fn new(config: SharingConfig) -> Self {
        Self::with_paths(config, Path::new(PAGEMAP_PATH), Path::new(KPAGECOUNT_PATH))
    }

    /// A sampler reading `pagemap` and `kpagecount` instead of the kernel's files (tests).
    pub fn with_paths(config: SharingConfig, pagemap: &Path, kpagecount: &Path) -> Self {
        let open = |path: &Path| {
            File::open(path).map_err(|e| {
                format!(
                    "cannot open {}: {e}; page-sharing counts need root",
                    path.display()
                )
            })
        };
        let files = open(pagemap).and_then(|pm| {
            Ok(Files {
                pagemap: pm,
                pagemap_path: pagemap.to_path_buf(),
                kpagecount: open(kpagecount)?,
                kpagecount_path: kpagecount.to_path_buf(),
            })
        });
        if let Err(reason) = &files {
            tracing::info!("page-sharing counts unavailable: {reason}");
        }
        SharingSampler {
            config,
            files,
            rng: SplitMix64(config.seed),
            pacer: Pacer::new(config.max_pages_per_s, &MonotonicClock),
            clock: Arc::new(MonotonicClock),
            bytes: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// The same sampler timing itself and waiting for its page budget on `clock` instead of
    /// the host's monotonic clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.pacer = Pacer::new(self.config.max_pages_per_s, &*clock);
        self.clock = clock;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &SharingConfig {
        &self.config
    }

    /// Why reports will say "unavailable", if the files could not even be opened.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.files.as_ref().err().map(String::as_str)
    }

    /// Samples the guest RAM of one VM. `ram` must be mapped in this process.
    pub fn sample(&mut self, ram: &GuestRam) -> Result<SharingReport, SharingError> {
        self.sample_host_ranges(&HostRange::of_ram(ram))
    }

    /// Samples the pages of `ranges` of this process's memory, taken together as one VM.
    pub fn sample_host_ranges(
        &mut self,
        ranges: &[HostRange],
    ) -> Result<SharingReport, SharingError> {
        let started = self.clock.now();
        if let Err(reason) = &self.files {
            return Ok(SharingReport::Unavailable {
                reason: reason.clone(),
            });
        }
        let mut guest_pages = 0u64;
        for r in ranges {
            // PAGE_SIZE is a power of two.
            if (r.addr as u64 | r.len) & (PAGE_SIZE - 1) != 0 {
                return Err(SharingError::BadRange {
                    addr: r.addr,
                    len: r.len,
                });
            }
            guest_pages += r.len / PAGE_SIZE;
        }
        let indices = sample_indices(&mut self.rng, guest_pages, self.config.sample_pages);
        let mut vpns = Vec::with_capacity(indices.len());
        let mut range_iter = ranges.iter();
        let mut current = range_iter.next();
        let mut range_first = 0u64;
        for index in indices {
            while let Some(r) = current {
                if index < range_first + r.len / PAGE_SIZE {
                    break;
                }
                range_first += r.len / PAGE_SIZE;
                current = range_iter.next();
            }
            let r = current.expect("sampled indices lie within the ranges");
            vpns.push(r.addr as u64 / PAGE_SIZE + (index - range_first));
        }
        // Ranges need not be in host address order.
        vpns.sort_unstable();

        let mut tally = Tally::default();
        for chunk in vpns.chunks(CHUNK_PAGES) {
            self.pacer.acquire(chunk.len(), &*self.clock);
            match self.sample_chunk(chunk, &mut tally) {
                Ok(()) => {}
                Err(e) => {
                    return match unavailable_reason(&e) {
                        Some(reason) => Ok(SharingReport::Unavailable { reason }),
                        None => Err(e),
                    };
                }
            }
        }
        let counted = tally.resident - tally.zero_page;
        if counted > 0 && tally.hidden_pfn == counted {
            return Ok(SharingReport::Unavailable {
                reason: "pagemap hides frame numbers (reading them needs CAP_SYS_ADMIN)".into(),
            });
        }
        Ok(SharingReport::Measured(
            tally.into_stats(guest_pages, self.clock.now() - started),
        ))
    }

    /// Reads pagemap for the sorted pages `vpns`, then kpagecount for their frames.
    fn sample_chunk(&mut self, vpns: &[u64], tally: &mut Tally) -> Result<(), SharingError> {
        let files = self.files.as_ref().expect("checked by the caller");
        let mut pfns = Vec::with_capacity(vpns.len());
        for (first, last) in runs(vpns, PAGEMAP_MAX_GAP_PAGES, CHUNK_PAGES as u64 * 64) {
            let base = vpns[first];
            let span = (vpns[last] - base + 1) as usize;
            read_entries(
                &files.pagemap,
                &files.pagemap_path,
                base,
                span,
                &mut self.bytes,
                &mut self.entries,
            )?;
            for &vpn in &vpns[first..=last] {
                tally.sampled += 1;
                match decode_pagemap(self.entries[(vpn - base) as usize]) {
                    PageState::NotPresent => {}
                    PageState::Swapped => tally.swapped += 1,
                    PageState::Present { pfn } => {
                        tally.resident += 1;
                        if pfn == 0 {
                            // Without CAP_SYS_ADMIN the kernel reports PFN 0 for every page.
                            tally.hidden_pfn += 1;
                        } else {
                            pfns.push(pfn);
                        }
                    }
                }
            }
        }
        pfns.sort_unstable();
        for (first, last) in runs(&pfns, KPAGECOUNT_MAX_GAP, 4096) {
            let base = pfns[first];
            let span = (pfns[last] - base + 1) as usize;
            read_entries(
                &files.kpagecount,
                &files.kpagecount_path,
                base,
                span,
                &mut self.bytes,
                &mut self.entries,
            )?;
            for &pfn in &pfns[first..=last] {
                match self.entries[(pfn - base) as usize] {
                    0 => tally.zero_page += 1,
                    count => tally.counts.push(count),
                }
            }
        }
        Ok(())
    }
}

impl Tally {
    fn into_stats(self, guest_pages: u64, elapsed: Duration) -> SharingStats {
        let exclusive = self.counts.iter().filter(|&&c| c == 1).count() as u64;
        let inverse_sum: f64 = self.counts.iter().map(|&c| 1.0 / c as f64).sum();
        SharingStats {
            guest_pages,
            pages_sampled: self.sampled,
            pages_resident: self.resident,
            pages_swapped: self.swapped,
            pages_zero_page: self.zero_page,
            pages_exclusive: exclusive,
            pages_shared: self.counts.len() as u64 - exclusive,
            counts: CountSummary::of(&self.counts),
            max_count: self.counts.iter().copied().max().unwrap_or(0),
            reclaimable: estimate_reclaimable(guest_pages, self.sampled, exclusive),
            proportional: estimate_proportional(guest_pages, self.sampled, inverse_sum),
            sample_time_us: elapsed.as_micros() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::ksm::Ksm;
    use crate::ram::RamRange;
    use crate::test_utils::FakeClock;

    /// Held by every test that changes host KSM settings, so that no two of them overlap.
    static KSM_SETTINGS: Mutex<()> = Mutex::new(());

    const EPS: f64 = 1e-9;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= EPS * a.abs().max(b.abs()).max(1.0)
    }

    fn exact_config() -> SharingConfig {
        SharingConfig {
            sample_pages: usize::MAX,
            max_pages_per_s: None,
            seed: 7,
        }
    }

    // -- metrics --------------------------------------------------------------------------------

    proptest! {
        #[test]
        fn sharing_means_are_ordered_harmonic_geometric_arithmetic(
            counts in prop::collection::vec(1u64..=512, 1..200)
        ) {
            let h = harmonic_mean(&counts).expect("non-empty");
            let g = geometric_mean(&counts).expect("non-empty");
            let a = arithmetic_mean(&counts).expect("non-empty");
            prop_assert!(h <= g * (1.0 + EPS), "harmonic {h} > geometric {g}");
            prop_assert!(g <= a * (1.0 + EPS), "geometric {g} > arithmetic {a}");
        }

        #[test]
        fn sharing_means_and_median_lie_between_min_and_max(
            counts in prop::collection::vec(1u64..=10_000, 1..200)
        ) {
            let min = *counts.iter().min().expect("non-empty") as f64;
            let max = *counts.iter().max().expect("non-empty") as f64;
            let s = CountSummary::of(&counts);
            for v in [s.arithmetic_mean, s.geometric_mean, s.harmonic_mean, s.median] {
                let v = v.expect("non-empty");
                prop_assert!(v >= min * (1.0 - EPS) && v <= max * (1.0 + EPS), "{v} not in [{min}, {max}]");
            }
        }

        #[test]
        fn sharing_constant_counts_give_that_value_for_every_mean(
            count in 1u64..=1000, len in 1usize..100
        ) {
            let counts = vec![count; len];
            let s = CountSummary::of(&counts);
            for v in [s.arithmetic_mean, s.geometric_mean, s.harmonic_mean, s.median] {
                prop_assert!(close(v.expect("non-empty"), count as f64));
            }
        }

        #[test]
        fn sharing_median_does_not_depend_on_order(
            mut counts in prop::collection::vec(0u64..100, 1..100), seed in any::<u64>()
        ) {
            let before = median(&counts);
            let mut rng = SplitMix64(seed);
            for i in (1..counts.len()).rev() {
                counts.swap(i, rng.below(i as u64 + 1) as usize);
            }
            prop_assert_eq!(before, median(&counts));
        }

        #[test]
        fn sharing_estimates_stay_within_the_vm(
            guest_pages in 1u64..1_000_000, sampled_frac in 0.0f64..=1.0, hit_frac in 0.0f64..=1.0
        ) {
            let sampled = ((guest_pages as f64 * sampled_frac) as u64).max(1);
            let exclusive = (sampled as f64 * hit_frac) as u64;
            let e = estimate_reclaimable(guest_pages, sampled, exclusive);
            prop_assert!(e.bytes <= guest_pages * PAGE_SIZE);
            prop_assert!(e.stderr_bytes <= guest_pages * PAGE_SIZE / 2 + 1);
        }

        #[test]
        fn sharing_sample_indices_are_distinct_sorted_and_in_range(
            n in 1u64..100_000, k in 0usize..5000, seed in any::<u64>()
        ) {
            let mut rng = SplitMix64(seed);
            let s = sample_indices(&mut rng, n, k);
            prop_assert_eq!(s.len() as u64, (k as u64).min(n));
            prop_assert!(s.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(s.iter().all(|&i| i < n));
        }

        #[test]
        fn sharing_read_runs_cover_every_key_once_within_limits(
            mut keys in prop::collection::vec(0u64..10_000, 0..300),
            gap in 0u64..50, span in 1u64..200
        ) {
            keys.sort_unstable();
            let r = runs(&keys, gap, span);
            let mut next = 0;
            for &(first, last) in &r {
                prop_assert_eq!(first, next);
                prop_assert!(first <= last);
                prop_assert!(keys[last] - keys[first] < span || first == last);
                prop_assert!(keys[first..=last].windows(2).all(|w| w[1] - w[0] <= gap));
                next = last + 1;
            }
            prop_assert_eq!(next, keys.len());
        }
    }

    #[test]
    fn sharing_known_distribution_1_2_4() {
        let s = CountSummary::of(&[4, 1, 2]);
        assert!(close(s.arithmetic_mean.expect("mean"), 7.0 / 3.0));
        assert!(close(s.geometric_mean.expect("mean"), 2.0));
        assert!(close(s.harmonic_mean.expect("mean"), 12.0 / 7.0));
        assert_eq!(s.median, Some(2.0));
    }

    #[test]
    fn sharing_known_distribution_half_exclusive_half_pairs() {
        let s = CountSummary::of(&[1, 1, 2, 2]);
        assert!(close(s.arithmetic_mean.expect("mean"), 1.5));
        assert!(close(s.geometric_mean.expect("mean"), 2f64.sqrt()));
        assert!(close(s.harmonic_mean.expect("mean"), 4.0 / 3.0));
        assert_eq!(s.median, Some(1.5));
    }

    #[test]
    fn sharing_median_of_odd_and_even_counts() {
        assert_eq!(median(&[5]), Some(5.0));
        assert_eq!(median(&[9, 1, 3]), Some(3.0));
        assert_eq!(median(&[1, 2, 3, 10]), Some(2.5));
        assert_eq!(median(&[2, 1]), Some(1.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn sharing_empty_or_zero_counts_have_no_mean() {
        assert_eq!(CountSummary::of(&[]), CountSummary::default());
        assert_eq!(geometric_mean(&[1, 0]), None);
        assert_eq!(harmonic_mean(&[0]), None);
        assert_eq!(arithmetic_mean(&[0, 2]), Some(1.0));
    }

    #[test]
    fn sharing_estimate_scales_the_exclusive_fraction() {
        // 1,000 of 4,000 sampled pages exclusive in a VM of 40,000 pages: a quarter of it.
        let e = estimate_reclaimable(40_000, 4_000, 1_000);
        assert_eq!(e.bytes, 10_000 * PAGE_SIZE);
        // sqrt(0.25 * 0.75 / 4000 * 36000/39999) * 40000 pages.
        let expected = 40_000.0 * (0.1875f64 / 4000.0 * 36_000.0 / 39_999.0).sqrt();
        assert!((e.stderr_bytes as f64 / PAGE_SIZE as f64 - expected).abs() < 1.0);
        // A whole-VM sample is exact.
        assert_eq!(
            estimate_reclaimable(100, 100, 30),
            Estimate {
                bytes: 30 * PAGE_SIZE,
                stderr_bytes: 0
            }
        );
        // Pairs count half a frame each in the proportional share, nothing in the reclaimable.
        assert_eq!(
            estimate_proportional(100, 100, 50.0 * 0.5).bytes,
            25 * PAGE_SIZE
        );
        assert_eq!(estimate_reclaimable(100, 0, 0), Estimate::default());
    }

    #[test]
    fn sharing_pagemap_entries_decode() {
        assert_eq!(decode_pagemap(0), PageState::NotPresent);
        assert_eq!(decode_pagemap(PM_SWAPPED | 0x1234), PageState::Swapped);
        assert_eq!(
            decode_pagemap(PM_PRESENT | (1 << 56) | 0x1dfbdf),
            PageState::Present { pfn: 0x1dfbdf }
        );
    }

    #[test]
    fn sharing_sample_indices_are_uniform() {
        // 20,000 draws of 64 out of 1,024: each index is expected 1,250 times.
        let mut rng = SplitMix64(42);
        let mut hits = vec![0u32; 1024];
        for _ in 0..20_000 {
            for i in sample_indices(&mut rng, 1024, 64) {
                hits[i as usize] += 1;
            }
        }
        let expected = 20_000.0 * 64.0 / 1024.0;
        let chi2: f64 = hits
            .iter()
            .map(|&h| (h as f64 - expected).powi(2) / expected)
            .sum();
        // 1,023 degrees of freedom: mean 1,023, standard deviation about 45.
        assert!(chi2 < 1023.0 + 6.0 * 45.0, "chi2 = {chi2}");
        assert!(hits.iter().all(|&h| h > 1000 && h < 1500), "{hits:?}");
    }

    // -- the sampler against the host ----------------------------------------------------------

    #[test]
    fn sharing_missing_pagemap_reports_unavailable() {
        let mut sampler = SharingSampler::with_paths(
            exact_config(),
            Path::new("/nonexistent/pagemap"),
            Path::new(KPAGECOUNT_PATH),
        );
        assert!(sampler.unavailable_reason().is_some());
        let ram = GuestRam::new(&[RamRange::new(0, 1 << 20)]).expect("map");
        let report = sampler.sample(&ram).expect("unavailable is not an error");
        let SharingReport::Unavailable { reason } = &report else {
            panic!("expected unavailable, got {report:?}");
        };
        assert!(reason.contains("/nonexistent/pagemap"), "{reason}");
        let json = serde_json::to_value(&report).expect("serialise");
        assert_eq!(json["status"], "unavailable");
        assert_eq!(json["reason"], reason.as_str());
    }

    #[test]
    fn sharing_missing_kpagecount_reports_unavailable() {
        let mut sampler = SharingSampler::with_paths(
            exact_config(),
            Path::new(PAGEMAP_PATH),
            Path::new("/nonexistent/kpagecount"),
        );
        let ram = GuestRam::new(&[RamRange::new(0, 1 << 20)]).expect("map");
        let report = sampler.sample(&ram).expect("unavailable is not an error");
        assert!(
            matches!(&report, SharingReport::Unavailable { reason } if reason.contains("kpagecount")),
            "{report:?}"
        );
    }

    #[test]
    fn sharing_hidden_pfns_report_unavailable() {
        // A pagemap as an unprivileged process sees it: pages present, frame numbers zeroed.
        let ram = GuestRam::new(&[RamRange::new(0, 1 << 20)]).expect("map");
        let path = std::env::temp_dir().join(format!("memvisor-pagemap-{}", std::process::id()));
        let file = File::create(&path).expect("create fake pagemap");
        for r in HostRange::of_ram(&ram) {
            let first = r.addr as u64 / PAGE_SIZE;
            let entries: Vec<u8> = (0..r.len / PAGE_SIZE)
                .flat_map(|_| PM_PRESENT.to_ne_bytes())
                .collect();
            file.write_all_at(&entries, first * 8)
                .expect("write sparse fake pagemap");
        }
        let mut sampler = SharingSampler::with_paths(exact_config(), &path, Path::new("/dev/zero"));
        let report = sampler.sample(&ram).expect("unavailable is not an error");
        std::fs::remove_file(&path).expect("cleanup");
        assert!(
            matches!(&report, SharingReport::Unavailable { reason } if reason.contains("CAP_SYS_ADMIN")),
            "{report:?}"
        );
    }

    #[test]
    fn sharing_private_pages_have_count_one() {
        crate::require!(Root);
        let mut sampler = SharingSampler::new(exact_config());
        // 1,024 pages: 512 written, 256 only read (the shared zero page), 256 untouched.
        let ram = GuestRam::new(&[RamRange::new(0, 2 << 20), RamRange::new(8 << 20, 2 << 20)])
            .expect("map");
        for page in 0..512u64 {
            ram.memory()
                .write_obj(page + 1, GuestAddress(page * PAGE_SIZE))
                .expect("write");
        }
        for page in 0..256u64 {
            let _: u64 = ram
                .memory()
                .read_obj(GuestAddress((8 << 20) + page * PAGE_SIZE))
                .expect("read");
        }
        let report = sampler.sample(&ram).expect("sample");
        let s = report.stats().expect("root can read counts");
        assert_eq!(s.guest_pages, 1024);
        assert_eq!(s.pages_sampled, 1024);
        assert_eq!(s.pages_resident, 768);
        assert_eq!(s.pages_zero_page, 256);
        assert_eq!(s.pages_exclusive, 512);
        assert_eq!(s.pages_shared, 0);
        assert_eq!(s.max_count, 1);
        assert_eq!(s.counts.median, Some(1.0));
        assert_eq!(s.counts.harmonic_mean, Some(1.0));
        assert_eq!(
            s.reclaimable,
            Estimate {
                bytes: 512 * PAGE_SIZE,
                stderr_bytes: 0
            }
        );
        assert_eq!(s.proportional.bytes, 512 * PAGE_SIZE);
        let json = serde_json::to_value(&report).expect("serialise");
        assert_eq!(json["status"], "ok");
        assert_eq!(json["pages_exclusive"], 512);
        assert_eq!(json["counts"]["arithmetic_mean"], 1.0);
    }

    #[test]
    fn sharing_partial_sample_estimates_the_whole_vm() {
        crate::require!(Root);
        let mut sampler = SharingSampler::new(SharingConfig {
            sample_pages: 2048,
            max_pages_per_s: None,
            seed: 99,
        });
        // 32 MiB, the first quarter written: a 2,048-page sample should say about 8 MiB.
        let ram = GuestRam::new(&[RamRange::new(0, 32 << 20)]).expect("map");
        for page in 0..2048u64 {
            ram.memory()
                .write_obj(page, GuestAddress(page * PAGE_SIZE))
                .expect("write");
        }
        let report = sampler.sample(&ram).expect("sample");
        let s = report.stats().expect("root can read counts");
        assert_eq!(s.pages_sampled, 2048);
        assert_eq!(s.pages_resident, s.pages_exclusive);
        let truth = (8u64 << 20) as f64;
        let off = (s.reclaimable.bytes as f64 - truth).abs();
        // sqrt(.25 * .75 / 2048 * 6144/8191) * 32 MiB ≈ 0.27 MiB; allow 5 standard errors.
        assert!(s.reclaimable.stderr_bytes > 200 << 10 && s.reclaimable.stderr_bytes < 350 << 10);
        assert!(off < 5.0 * s.reclaimable.stderr_bytes as f64, "{s:?}");
    }

    /// Seconds a [`FakeClock`] slept, within a microsecond of `want` (the pacer's float
    /// arithmetic may round a wait down by a nanosecond and top it up with another).
    fn assert_slept(clock: &FakeClock, want_s: f64) {
        let slept = clock.slept().as_secs_f64();
        assert!(
            (slept - want_s).abs() < 1e-6,
            "slept {slept} s, want {want_s} s"
        );
    }

    #[test]
    fn sharing_pacer_waits_exactly_for_the_pages_over_budget() {
        let clock = FakeClock::new();
        let mut pacer = Pacer::new(Some(20_000), &clock);
        for _ in 0..16 {
            pacer.acquire(CHUNK_PAGES, &clock);
        }
        // The first chunk is the burst; each of the other 15 waits 512 / 20,000 s.
        assert_slept(&clock, 15.0 * CHUNK_PAGES as f64 / 20_000.0);
    }

    #[test]
    fn sharing_pacer_does_not_wait_when_time_has_refilled_the_budget() {
        let clock = FakeClock::new();
        let mut pacer = Pacer::new(Some(1_000), &clock);
        pacer.acquire(CHUNK_PAGES, &clock);
        clock.advance(Duration::from_secs(1));
        pacer.acquire(CHUNK_PAGES, &clock);
        assert_slept(&clock, 0.0);
        // The budget does not bank more than one burst: after 10 s idle, two chunks still wait.
        clock.advance(Duration::from_secs(10));
        pacer.acquire(CHUNK_PAGES, &clock);
        pacer.acquire(CHUNK_PAGES, &clock);
        assert_slept(&clock, CHUNK_PAGES as f64 / 1_000.0);
    }

    #[test]
    fn sharing_pacer_without_a_budget_never_waits() {
        let clock = FakeClock::new();
        let mut pacer = Pacer::new(None, &clock);
        for _ in 0..100 {
            pacer.acquire(CHUNK_PAGES, &clock);
        }
        assert_eq!(clock.slept(), Duration::ZERO);
    }

    #[test]
    fn sharing_page_budget_bounds_the_sampling_rate() {
        crate::require!(Root);
        let ram = GuestRam::new(&[RamRange::new(0, 16 << 20)]).expect("map");
        let clock = Arc::new(FakeClock::new());
        let mut sampler = SharingSampler::new(SharingConfig {
            sample_pages: 4096,
            max_pages_per_s: Some(20_000),
            seed: 1,
        })
        .with_clock(clock.clone());
        let first = sampler.sample(&ram).expect("sample");
        let second = sampler.sample(&ram).expect("sample");
        // 8,192 pages at 20,000 a second, less the one-chunk burst: 384 ms of waiting, all of
        // it inside the reports' sample times (the fake clock moves only when the pacer waits).
        assert_slept(&clock, (8192 - CHUNK_PAGES) as f64 / 20_000.0);
        let sampled_us: u64 = [first, second]
            .iter()
            .map(|r| r.stats().expect("root can read counts").sample_time_us)
            .sum();
        assert_eq!(sampled_us, clock.slept().as_micros() as u64);
    }

    /// Fills page `i` of `ram` with a pattern that depends on `seed` and `i` only, so that two
    /// RAMs filled with the same seed are page-by-page identical while no two pages of one RAM
    /// are.
    fn fill_pattern(ram: &GuestRam, seed: u64) {
        let pages = ram.size_bytes() / PAGE_SIZE;
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for page in 0..pages {
            let mut rng = SplitMix64(seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for word in buf.chunks_exact_mut(8) {
                word.copy_from_slice(&rng.next_u64().to_ne_bytes());
            }
            ram.memory()
                .write_slice(&buf, GuestAddress(page * PAGE_SIZE))
                .expect("fill");
        }
    }

    #[test]
    fn sharing_ksm_merges_identical_regions_to_count_two() {
        crate::require!(Root);
        let _lock = KSM_SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
        let mut sampler = SharingSampler::new(SharingConfig {
            sample_pages: 1024,
            max_pages_per_s: None,
            seed: 3,
        });
        let size = 16u64 << 20;
        let a = GuestRam::new(&[RamRange::new(0, size)]).expect("map a");
        let b = GuestRam::new(&[RamRange::new(0, size)]).expect("map b");
        let ksm = Ksm::open().expect("KSM is available on the test hosts (ENVIRONMENT.md)");
        let settings_before = ksm.settings().expect("read KSM settings");
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        fill_pattern(&a, seed);
        fill_pattern(&b, seed);

        let before = sampler.sample(&a).expect("sample");
        let before = before.stats().expect("root can read counts");
        assert_eq!(before.pages_resident, 1024);
        assert_eq!(before.pages_shared, 0);
        assert_eq!(before.counts.median, Some(1.0));
        assert!(before.reclaimable.bytes > size * 9 / 10, "{before:?}");

        a.set_mergeable(true).expect("madvise a");
        b.set_mergeable(true).expect("madvise b");
        let merged = {
            let _ksm_on = ksm.enable_scoped(2000, 10).expect("enable KSM");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let report = sampler.sample(&a).expect("sample");
                let s = *report.stats().expect("root can read counts");
                if s.pages_shared == s.pages_sampled || Instant::now() > deadline {
                    break s;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        };
        assert_eq!(
            ksm.settings().expect("read KSM settings"),
            settings_before,
            "KSM settings restored"
        );
        assert_eq!(
            merged.pages_shared, merged.pages_sampled,
            "KSM merged every sampled page within 60 s: {merged:?}"
        );
        assert_eq!(merged.max_count, 2);
        assert_eq!(merged.counts.median, Some(2.0));
        for mean in [
            merged.counts.arithmetic_mean,
            merged.counts.geometric_mean,
            merged.counts.harmonic_mean,
        ] {
            assert!(close(mean.expect("mean"), 2.0), "{merged:?}");
        }
        assert_eq!(merged.reclaimable.bytes, 0, "a shared page frees nothing");
        assert!(
            merged.proportional.bytes.abs_diff(size / 2) < size / 20,
            "{merged:?}"
        );
        let b_report = sampler.sample(&b).expect("sample");
        assert_eq!(
            b_report.stats().expect("counts").pages_shared,
            1024,
            "the twin pages of b are shared too"
        );

        // Unmerging gives every page its own frame again.
        a.set_mergeable(false).expect("unmerge a");
        let after = sampler.sample(&a).expect("sample");
        let after = after.stats().expect("root can read counts");
        assert_eq!(after.pages_shared, 0, "{after:?}");
        assert_eq!(after.pages_exclusive, 1024);
    }
}
