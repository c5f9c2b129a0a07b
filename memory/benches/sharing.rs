//! Page-sharing benchmark: how fast [`SharingSampler`] samples, what it costs in CPU, and how
//! long KSM takes to merge two identical 64 MiB regions at the scan rate memvisor sets
//! ([`DEFAULT_PAGES_TO_SCAN`] pages every [`DEFAULT_SLEEP_MS`] ms) and at the kernel's default
//! (100 pages every 20 ms).
//!
//! Needs root (pagemap PFNs, `/proc/kpagecount`, KSM settings). Run with `bench/sharing`.
//! KSM settings are put back as they were, also if the benchmark panics.

use std::fs;
use std::time::{Duration, Instant};

use memory::ksm::{Ksm, DEFAULT_PAGES_TO_SCAN, DEFAULT_SLEEP_MS};
use memory::sharing::{SharingConfig, SharingReport, SharingSampler, DEFAULT_SAMPLE_PAGES};
use memory::{GuestRam, RamRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

/// User plus system CPU time of this process.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage; RUSAGE_SELF is always accepted.
    let ret = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(ret, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// CPU time ksmd has used so far, if it can be found.
fn ksmd_cpu_time() -> Option<Duration> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        match fs::read_to_string(path.join("comm")) {
            Ok(comm) if comm.trim() == "ksmd" => {}
            _ => continue,
        }
        let stat = fs::read_to_string(path.join("stat")).ok()?;
        // Fields after the ")" that closes the command name: state is field 3, utime 14,
        // stime 15.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        return Some(Duration::from_secs_f64(
            (utime + stime) as f64 / ticks as f64,
        ));
    }
    None
}

/// Makes every page of `ram` resident with content that depends on `seed` and the page number
/// only: no two pages of one RAM are equal, two RAMs filled with one seed are equal page by
/// page.
fn fill(ram: &GuestRam, seed: u64) {
    let pages = ram.size_bytes() / PAGE_SIZE;
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    for page in 0..pages {
        let mut x = seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_ne_bytes());
        }
        ram.memory()
            .write_slice(&buf, GuestAddress(page * PAGE_SIZE))
            .expect("fill guest RAM");
    }
}

fn new_ram(mib: u64) -> GuestRam {
    GuestRam::new(&[RamRange::new(0, mib << 20)]).expect("map guest RAM")
}

/// Samples `ram` `reports` times and prints the rate and the CPU cost.
fn bench_sampling(label: &str, ram: &GuestRam, config: SharingConfig, reports: usize) {
    let mut sampler = SharingSampler::new(config);
    for _ in 0..3 {
        sampler.sample(ram).expect("warm-up sample");
    }
    let mut pages = 0u64;
    let cpu0 = cpu_time();
    let wall0 = Instant::now();
    for _ in 0..reports {
        match sampler.sample(ram).expect("sample") {
            SharingReport::Measured(s) => {
                assert_eq!(s.pages_resident, s.pages_sampled, "every page is resident");
                pages += s.pages_sampled;
            }
            SharingReport::Unavailable { reason } => panic!("sharing counts unavailable: {reason}"),
        }
    }
    let wall = wall0.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    println!(
        "{label:<44} {:>9.0} pages/s  {:>7.1} us CPU per 1,000 samples  {:>8.2} ms per report",
        pages as f64 / wall,
        cpu * 1e6 / (pages as f64 / 1000.0),
        wall * 1e3 / reports as f64,
    );
}

/// Time until KSM has merged two identical `mib` MiB regions at the given rate. Returns the
/// regions, unmerged: the caller keeps them mapped so that the next run's regions get new
/// addresses. (ksmd keeps per-address state, the smart-scan skip counters among it, until it
/// rescans an address; regions remapped at the same addresses inherited it, and some identical
/// pairs then did not merge within minutes.)
fn bench_merge(
    ksm: &Ksm,
    mib: u64,
    pages_to_scan: u64,
    sleep_ms: u64,
    label: &str,
) -> (GuestRam, GuestRam) {
    let pages = (mib << 20) / PAGE_SIZE;
    let a = new_ram(mib);
    let b = new_ram(mib);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos() as u64
        ^ (pages_to_scan << 20);
    fill(&a, seed);
    fill(&b, seed);
    let mut sampler = SharingSampler::new(SharingConfig {
        sample_pages: usize::MAX,
        max_pages_per_s: None,
        seed: 1,
    });
    let shared_pages = |sampler: &mut SharingSampler| {
        sampler
            .sample(&a)
            .expect("sample")
            .stats()
            .expect("sharing counts need root")
            .pages_shared
    };
    assert_eq!(
        shared_pages(&mut sampler),
        0,
        "nothing shared before KSM runs"
    );
    let base = ksm.counters().expect("KSM counters");
    let ksmd0 = ksmd_cpu_time();
    let guard = ksm
        .enable_scoped(pages_to_scan, sleep_ms)
        .expect("enable KSM");
    a.set_mergeable(true).expect("madvise");
    b.set_mergeable(true).expect("madvise");
    let start = Instant::now();
    let mut half = None;
    let deadline = start + Duration::from_secs(120);
    // Every page of `a` has a twin in `b` and no other equal page, so "count >= 2 for every page
    // of a" means every pair is merged. (KSM's own counters are no good here: ksmd only drops
    // the entries of unmapped or unmerged memory when it rescans.) A whole-region sample costs
    // about 25 ms of CPU; it runs every 50 ms.
    let (merged_after, merged) = loop {
        let merged = shared_pages(&mut sampler);
        if half.is_none() && merged >= pages / 2 {
            half = Some(start.elapsed());
        }
        if merged >= pages {
            break (Some(start.elapsed()), merged);
        }
        if Instant::now() > deadline {
            break (None, merged);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let scans = ksm.counters().expect("KSM counters").full_scans - base.full_scans;
    let ksmd_cpu = ksmd0.zip(ksmd_cpu_time()).map(|(a, b)| b - a);
    drop(guard);
    match merged_after {
        Some(t) => println!(
            "{label:<44} {:>7.2} s to merge all {pages} page pairs ({:.2} s to half), \
             {scans} full scans, ksmd CPU {:.2} s",
            t.as_secs_f64(),
            half.map_or(f64::NAN, |h| h.as_secs_f64()),
            ksmd_cpu.map_or(f64::NAN, |d| d.as_secs_f64()),
        ),
        None => println!(
            "{label:<44} not merged within 120 s: {merged} of {pages} pairs, {scans} full scans"
        ),
    }
    // Unmerge before unmapping, so that no merged state of this run is left for the next.
    a.set_mergeable(false).expect("unmerge");
    b.set_mergeable(false).expect("unmerge");
    (a, b)
}

fn main() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("bench sharing: needs root (pagemap PFNs, /proc/kpagecount, KSM settings)");
        std::process::exit(2);
    }
    // `bench/sharing sampler` or `bench/sharing ksm` runs one part; cargo adds `--bench`.
    let parts: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |part: &str| parts.is_empty() || parts.iter().any(|p| p == part);
    if run("sampler") {
        bench_sampler();
    }
    if run("ksm") {
        bench_ksm();
    }
}

fn bench_sampler() {
    println!(
        "== page-sharing sampler, 256 MiB resident guest RAM (load average {}) ==",
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?")
    );
    let ram = new_ram(256);
    fill(&ram, 1);
    let unbounded = |sample_pages| SharingConfig {
        sample_pages,
        max_pages_per_s: None,
        seed: 42,
    };
    bench_sampling(
        "4,096-page samples, no budget",
        &ram,
        unbounded(DEFAULT_SAMPLE_PAGES),
        300,
    );
    bench_sampling(
        "16,384-page samples, no budget",
        &ram,
        unbounded(16_384),
        100,
    );
    bench_sampling(
        "whole VM (65,536 pages), no budget",
        &ram,
        unbounded(usize::MAX),
        20,
    );
    bench_sampling(
        "4,096-page samples, default budget",
        &ram,
        SharingConfig {
            seed: 42,
            ..SharingConfig::default()
        },
        25,
    );
}

fn bench_ksm() {
    println!("== KSM merge of two identical 64 MiB regions ==");
    let ksm = Ksm::open().expect("KSM");
    let before = ksm.settings().expect("KSM settings");
    let _first = bench_merge(
        &ksm,
        64,
        DEFAULT_PAGES_TO_SCAN,
        DEFAULT_SLEEP_MS,
        &format!("memvisor rate ({DEFAULT_PAGES_TO_SCAN} pages / {DEFAULT_SLEEP_MS} ms)"),
    );
    let _second = bench_merge(&ksm, 64, 100, 20, "kernel default rate (100 pages / 20 ms)");
    assert_eq!(
        ksm.settings().expect("KSM settings"),
        before,
        "KSM settings restored"
    );
}
