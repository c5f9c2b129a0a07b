//! Swap benchmark: swap-out throughput against a plain sequential write of the same data to the
//! same directory (same run, same fsync policy: none for either), fault-in latency when the
//! pages are in the host page cache, and pages served per second.
//!
//! The baseline writes the same bytes as the swap-out, from a buffer as large as guest RAM that
//! was filled the same way (so, like guest RAM, mostly out of the CPU caches), in 1 MiB
//! `pwrite`s to a new file. Both sides also report the CPU time they used (the process's user +
//! system time; the swap-out may use a second thread).
//!
//! `SWAP_BENCH_DIR` (default: the temp dir), `SWAP_BENCH_MIB` (default 256) and
//! `SWAP_BENCH_MODE` (`direct`, the default, or `datasync`: how the swap file keeps its writes
//! out of the page cache, see `memory::swap::file::WriteMode`) tune it; `bench/swap` runs it.
//! The baseline stays a buffered write without fsync: what writing the data costs at best.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use memory::swap::file::WriteMode;
use memory::swap::{SwapFile, SwapOptions, Swapper};
use memory::{GuestRam, RamRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

const ROUNDS: usize = 5;
const CHUNK: usize = 1 << 20;

/// Flushes dirty data of earlier phases (untimed), so each timed write starts from the same
/// write-back state.
fn settle() {
    let _ = std::process::Command::new("sync").status();
}

/// The content of the 1 MiB chunk at byte `off` (no zero page: every word is odd).
fn pattern(chunk: &mut [u8], off: usize, seed: u64) {
    for (i, w) in chunk.chunks_exact_mut(8).enumerate() {
        let v = ((off + i * 8) as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        w.copy_from_slice(&v.to_ne_bytes());
    }
}

fn fill(ram: &GuestRam, seed: u64) {
    let size = ram.size_bytes() as usize;
    let mut chunk = vec![0u8; CHUNK];
    for off in (0..size).step_by(CHUNK) {
        pattern(&mut chunk, off, seed);
        ram.memory()
            .write_slice(&chunk, GuestAddress(off as u64))
            .expect("fill guest RAM");
    }
}

/// User + system CPU time of the whole process so far, in seconds.
fn cpu_s() -> f64 {
    // SAFETY: getrusage only writes the `rusage` we pass, which lives for the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid `who`.
    let ret = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(ret, 0, "getrusage");
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Wall-clock throughput and CPU time of one timed write.
struct Timed {
    mib_s: f64,
    cpu_ms: f64,
}

/// Sequential write of `bytes` of the same data a swap round with `seed` swaps out, from a
/// buffer of `bytes` filled beforehand (as guest RAM is), in 1 MiB writes to a new file in
/// `dir`, no fsync.
fn plain_write(dir: &Path, bytes: usize, seed: u64) -> Timed {
    let path: PathBuf = dir.join(format!("memvisor-swap-bench-{}.plain", std::process::id()));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create plain file");
    let mut buf = vec![0u8; bytes];
    for (i, chunk) in buf.chunks_mut(CHUNK).enumerate() {
        pattern(chunk, i * CHUNK, seed);
    }
    settle();
    let cpu = cpu_s();
    let start = Instant::now();
    for (i, chunk) in buf.chunks(CHUNK).enumerate() {
        file.write_all_at(chunk, (i * CHUNK) as u64)
            .expect("plain write");
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_ms = (cpu_s() - cpu) * 1e3;
    drop(file);
    std::fs::remove_file(&path).expect("remove plain file");
    Timed {
        mib_s: mib(bytes) / secs,
        cpu_ms,
    }
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
    out: Timed,
    fault_p50_us: f64,
    fault_p99_us: f64,
    served_per_s: f64,
    handler_p50_us: u64,
    handler_p99_us: u64,
}

fn swap_round(dir: &Path, mode: WriteMode, bytes: usize, seed: u64) -> Round {
    let ram = GuestRam::new(&[RamRange::new(0, bytes as u64)]).expect("guest RAM");
    fill(&ram, seed);
    let file = SwapFile::create_with(dir, mode).expect("swap file");
    assert_eq!(file.mode(), mode, "the file system takes {mode:?}");
    let swapper =
        Swapper::with_backing(&ram, Box::new(file), SwapOptions::default()).expect("swapper");
    settle();
    let cpu = cpu_s();
    let start = Instant::now();
    let report = swapper.swap_out(bytes as u64).expect("swap out");
    let secs = start.elapsed().as_secs_f64();
    let cpu_ms = (cpu_s() - cpu) * 1e3;
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
        out: Timed {
            mib_s: mib(bytes) / secs,
            cpu_ms,
        },
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
    let mode = match std::env::var("SWAP_BENCH_MODE").as_deref() {
        Ok("datasync") => WriteMode::Datasync,
        Ok("direct") | Err(_) => WriteMode::Direct,
        Ok(other) => panic!("SWAP_BENCH_MODE is direct or datasync, not {other:?}"),
    };
    let bytes = size_mib << 20;
    println!(
        "swap benchmark: {size_mib} MiB per round, {ROUNDS} rounds, dir {}, swap file {mode:?} \
         (same data for both; the baseline is buffered, no fsync; `sync` before each timed write)",
        dir.display()
    );

    // One untimed warm-up of each, so the first timed round does not pay for first-use costs.
    plain_write(&dir, bytes, 99);
    swap_round(&dir, mode, bytes, 99);
    let mut plain = Vec::new();
    let mut rounds = Vec::new();
    for r in 0..ROUNDS {
        // Interleave, alternating the order, so both see the same file-system state.
        let seed = r as u64;
        if r % 2 == 0 {
            plain.push(plain_write(&dir, bytes, seed));
            rounds.push(swap_round(&dir, mode, bytes, seed));
        } else {
            rounds.push(swap_round(&dir, mode, bytes, seed));
            plain.push(plain_write(&dir, bytes, seed));
        }
        let last = rounds.last().expect("a round");
        println!(
            "  round {r}: plain write {:7.1} MiB/s ({:4.0} ms CPU) | swap-out {:7.1} MiB/s ({:4.0} ms CPU) = {:3.0} % | fault p50 {:5.1} us p99 {:6.1} us | {:6.0} pages/s",
            plain[r].mib_s,
            plain[r].cpu_ms,
            last.out.mib_s,
            last.out.cpu_ms,
            100.0 * last.out.mib_s / plain[r].mib_s,
            last.fault_p50_us,
            last.fault_p99_us,
            last.served_per_s
        );
        std::io::stdout().flush().expect("stdout");
    }
    let ratio_m = median(
        rounds
            .iter()
            .zip(&plain)
            .map(|(s, p)| s.out.mib_s / p.mib_s)
            .collect(),
    );
    let plain_m = median(plain.iter().map(|p| p.mib_s).collect());
    let plain_cpu = median(plain.iter().map(|p| p.cpu_ms).collect());
    let out_m = median(rounds.iter().map(|r| r.out.mib_s).collect());
    let out_cpu = median(rounds.iter().map(|r| r.out.cpu_ms).collect());
    let p50 = median(rounds.iter().map(|r| r.fault_p50_us).collect());
    let p99 = median(rounds.iter().map(|r| r.fault_p99_us).collect());
    let served = median(rounds.iter().map(|r| r.served_per_s).collect());
    let h50 = median(rounds.iter().map(|r| r.handler_p50_us as f64).collect());
    let h99 = median(rounds.iter().map(|r| r.handler_p99_us as f64).collect());
    println!("median of {ROUNDS} rounds:");
    println!("  plain sequential write      {plain_m:8.1} MiB/s  ({plain_cpu:.0} ms CPU)");
    println!(
        "  swap-out                    {out_m:8.1} MiB/s  ({out_cpu:.0} ms CPU; {:.0} % of plain; goal >= 80 %)",
        100.0 * out_m / plain_m
    );
    println!(
        "  swap-out / plain, per round {:8.0} %  (median of the {ROUNDS} same-round ratios)",
        100.0 * ratio_m
    );
    println!("  fault-in latency (toucher)  p50 {p50:.1} us, p99 {p99:.1} us  (goal p50 < 20, p99 < 100)");
    println!("  fault service (handler)     p50 {h50:.0} us, p99 {h99:.0} us");
    println!("  pages served                {served:.0} pages/s");
}
