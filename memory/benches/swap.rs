//! Swap benchmark: swap-out throughput against a plain sequential write of the same amount to
//! the same directory (same run, same fsync policy: none for either), fault-in latency when the
//! pages are in the host page cache, and pages served per second.
//!
//! `SWAP_BENCH_DIR` (default: the temp dir) and `SWAP_BENCH_MIB` (default 256) tune it;
//! `bench/swap` runs it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use memory::swap::{SwapOptions, Swapper};
use memory::{GuestRam, RamRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

const ROUNDS: usize = 5;
const CHUNK: usize = 1 << 20;

/// Flushes dirty data of earlier phases (untimed), so each timed write starts from the same
/// write-back state.
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

fn fill(ram: &GuestRam, seed: u64) {
    let size = ram.size_bytes() as usize;
    let mut chunk = vec![0u8; CHUNK];
    for off in (0..size).step_by(CHUNK) {
        for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
            let v = ((off + i * 8) as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            w.copy_from_slice(&v.to_ne_bytes());
        }
        ram.memory()
            .write_slice(&chunk, GuestAddress(off as u64))
            .expect("fill guest RAM");
    }
}

/// Sequential write of `bytes` in 1 MiB writes to a new file in `dir`, no fsync.
fn plain_write_mib_s(dir: &Path, bytes: usize) -> f64 {
    let path: PathBuf = dir.join(format!("memvisor-swap-bench-{}.plain", std::process::id()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create plain file");
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i * 7) as u8 | 1).collect();
    settle();
    let start = Instant::now();
    for off in (0..bytes).step_by(CHUNK) {
        file.write_all_at(&buf, off as u64).expect("plain write");
    }
    let secs = start.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path).expect("remove plain file");
    mib(bytes) / secs
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let idx = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Round {
    out_mib_s: f64,
    fault_p50_us: f64,
    fault_p99_us: f64,
    served_per_s: f64,
    handler_p50_us: u64,
    handler_p99_us: u64,
}

fn swap_round(dir: &Path, bytes: usize, seed: u64) -> Round {
    let ram = GuestRam::new(&[RamRange::new(0, bytes as u64)]).expect("guest RAM");
    fill(&ram, seed);
    let swapper = Swapper::new(&ram, dir, SwapOptions::default()).expect("swapper");
    settle();
    let start = Instant::now();
    let report = swapper.swap_out(bytes as u64).expect("swap out");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        report.pages_written * PAGE_SIZE,
        bytes as u64,
        "every page written"
    );

    // Fault every page back from another thread (the "guest"), timing each first access.
    let ram2 = ram.clone();
    let (lat_us, total_s) = std::thread::spawn(move || {
        let pages = ram2.size_bytes() / PAGE_SIZE;
        let mut lat = Vec::with_capacity(pages as usize);
        let t0 = Instant::now();
        for p in 0..pages {
            let t = Instant::now();
            let v: u64 = ram2
                .memory()
                .read_obj(GuestAddress(p * PAGE_SIZE))
                .expect("read");
            std::hint::black_box(v);
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        }
        (lat, t0.elapsed().as_secs_f64())
    })
    .join()
    .expect("toucher");
    let mut sorted = lat_us;
    sorted.sort_by(|a, b| a.total_cmp(b));
    let st = swapper.status();
    assert_eq!(st.faults_served, (bytes as u64) / PAGE_SIZE);
    Round {
        out_mib_s: mib(bytes) / secs,
        fault_p50_us: percentile(&sorted, 0.50),
        fault_p99_us: percentile(&sorted, 0.99),
        served_per_s: sorted.len() as f64 / total_s,
        handler_p50_us: st.fault_latency_p50_us,
        handler_p99_us: st.fault_latency_p99_us,
    }
}

fn main() {
    let dir = std::env::var_os("SWAP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let size_mib: usize = std::env::var("SWAP_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let bytes = size_mib << 20;
    println!(
        "swap benchmark: {size_mib} MiB per round, {ROUNDS} rounds, dir {} (no fsync for either; \
         `sync` before each timed write)",
        dir.display()
    );

    // One untimed warm-up of each, so the first timed round does not pay for first-use costs.
    plain_write_mib_s(&dir, bytes);
    swap_round(&dir, bytes, 99);
    let mut plain = Vec::new();
    let mut rounds = Vec::new();
    for r in 0..ROUNDS {
        // Interleave, alternating the order, so both see the same file-system state.
        if r % 2 == 0 {
            plain.push(plain_write_mib_s(&dir, bytes));
            rounds.push(swap_round(&dir, bytes, r as u64));
        } else {
            rounds.push(swap_round(&dir, bytes, r as u64));
            plain.push(plain_write_mib_s(&dir, bytes));
        }
        let last = rounds.last().expect("a round");
        println!(
            "  round {r}: plain write {:8.1} MiB/s | swap-out {:8.1} MiB/s | fault p50 {:6.1} us p99 {:6.1} us | {:9.0} pages/s",
            plain[r], last.out_mib_s, last.fault_p50_us, last.fault_p99_us, last.served_per_s
        );
        std::io::stdout().flush().expect("stdout");
    }
    let plain_m = median(plain);
    let out_m = median(rounds.iter().map(|r| r.out_mib_s).collect());
    let p50 = median(rounds.iter().map(|r| r.fault_p50_us).collect());
    let p99 = median(rounds.iter().map(|r| r.fault_p99_us).collect());
    let served = median(rounds.iter().map(|r| r.served_per_s).collect());
    let h50 = median(rounds.iter().map(|r| r.handler_p50_us as f64).collect());
    let h99 = median(rounds.iter().map(|r| r.handler_p99_us as f64).collect());
    println!("median of {ROUNDS} rounds:");
    println!("  plain sequential write      {plain_m:8.1} MiB/s");
    println!(
        "  swap-out                    {out_m:8.1} MiB/s  ({:.0} % of plain; goal >= 80 %)",
        100.0 * out_m / plain_m
    );
    println!("  fault-in latency (toucher)  p50 {p50:.1} us, p99 {p99:.1} us  (goal p50 < 20, p99 < 100)");
    println!("  fault service (handler)     p50 {h50:.0} us, p99 {h99:.0} us");
    println!("  pages served                {served:.0} pages/s");
}
