//! Swapper tests: host threads stand in for the guest on userfaultfd-registered memory. Every
//! test that registers memory starts with `require!(UffdWriteProtect)` (see `test_utils`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::{GuestRam, MetricKind, RamRange};

const PAGE: usize = PAGE_SIZE as usize;

fn ram(ranges: &[(u64, u64)]) -> GuestRam {
    let r: Vec<RamRange> = ranges.iter().map(|(a, s)| RamRange::new(*a, *s)).collect();
    GuestRam::new(&r).expect("map guest RAM")
}

fn swapper(ram: &GuestRam) -> Swapper {
    Swapper::new(ram, &std::env::temp_dir(), SwapOptions::default()).expect("swapper")
}

/// Small deterministic PRNG (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn pattern_page(page: u64, seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (page as usize * 131 + i * 7 + seed as usize) as u8 | 1)
        .collect()
}

/// All guest pages in address order as (guest address, page index across ranges).
fn pages_of(ram: &GuestRam) -> Vec<GuestAddress> {
    ram.ranges()
        .iter()
        .flat_map(|r| (0..r.size / PAGE_SIZE).map(move |p| GuestAddress(r.start.0 + p * PAGE_SIZE)))
        .collect()
}

fn write_pattern(ram: &GuestRam, seed: u8) {
    for (i, addr) in pages_of(ram).into_iter().enumerate() {
        ram.memory()
            .write_slice(&pattern_page(i as u64, seed), addr)
            .expect("write");
    }
}

/// Reads every page on another thread (a fault blocks that thread, as it would a vCPU) and
/// returns the pages that differ from the pattern.
fn mismatches_on_thread(ram: &GuestRam, seed: u8) -> Vec<usize> {
    let ram = ram.clone();
    std::thread::spawn(move || {
        let mut bad = Vec::new();
        let mut buf = vec![0u8; PAGE];
        for (i, addr) in pages_of(&ram).into_iter().enumerate() {
            ram.memory().read_slice(&mut buf, addr).expect("read");
            if buf != pattern_page(i as u64, seed) {
                bad.push(i);
            }
        }
        bad
    })
    .join()
    .expect("reader thread")
}

#[test]
fn pattern_survives_swap_out_and_fault_in() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 4 << 20), (8 << 20, 4 << 20)]);
    let pages = ram.size_bytes() / PAGE_SIZE;
    write_pattern(&ram, 3);
    let s = swapper(&ram);
    let before = ram.resident_bytes().expect("mincore");

    let report = s.swap_out(ram.size_bytes()).expect("swap out");

    assert_eq!(report.swapped_pages, pages);
    assert_eq!(report.pages_written, pages);
    assert_eq!(report.zero_pages, 0);
    let after = ram.resident_bytes().expect("mincore");
    assert_eq!(
        before - after,
        ram.size_bytes(),
        "every page freed on the host"
    );
    let st = s.status();
    assert_eq!(st.state, SwapState::Active);
    assert_eq!(st.file_size_bytes, ram.size_bytes());
    assert_eq!(st.bytes_written, ram.size_bytes());

    assert!(mismatches_on_thread(&ram, 3).is_empty());
    let st = s.status();
    assert_eq!(st.faults_served, pages);
    assert_eq!(st.bytes_read, ram.size_bytes());
    assert_eq!(st.swapped_pages, 0);
    assert!(st.fault_latency_p50_us <= st.fault_latency_p99_us);
}

#[test]
fn zero_pages_are_not_written_and_come_back_as_zero() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 1 << 20)]);
    // Touch all pages (resident), but only every 4th one gets data.
    for (i, addr) in pages_of(&ram).into_iter().enumerate() {
        let page = if i % 4 == 0 {
            pattern_page(i as u64, 9)
        } else {
            vec![0u8; PAGE]
        };
        ram.memory().write_slice(&page, addr).expect("write");
    }
    let s = swapper(&ram);

    let report = s.swap_out(1 << 20).expect("swap out");

    assert_eq!(report.pages_written, 64);
    assert_eq!(report.zero_pages, 192);
    assert_eq!(s.status().bytes_written, 64 * PAGE_SIZE);
    assert_eq!(
        s.status().file_size_bytes,
        64 * PAGE_SIZE,
        "dense: only data pages"
    );
    let ram2 = ram.clone();
    let ok = std::thread::spawn(move || {
        pages_of(&ram2).into_iter().enumerate().all(|(i, addr)| {
            let mut buf = vec![1u8; PAGE];
            ram2.memory().read_slice(&mut buf, addr).expect("read");
            if i % 4 == 0 {
                buf == pattern_page(i as u64, 9)
            } else {
                buf.iter().all(|b| *b == 0)
            }
        })
    })
    .join()
    .expect("reader");
    assert!(ok);
    let st = s.status();
    assert_eq!(st.faults_served, 64);
    assert_eq!(st.zero_faults, 192);
}

#[test]
fn untouched_pages_are_skipped_and_read_as_zero() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 1 << 20)]);
    ram.memory()
        .write_slice(&pattern_page(0, 1), GuestAddress(0))
        .expect("write");
    let s = swapper(&ram);

    let report = s.swap_out(1 << 20).expect("swap out");

    assert_eq!(
        report.swapped_pages, 1,
        "only the resident page costs the host memory"
    );
    let mut buf = vec![1u8; PAGE];
    let r2 = ram.clone();
    std::thread::spawn(move || {
        r2.memory()
            .read_slice(&mut buf, GuestAddress(PAGE_SIZE * 9))
    })
    .join()
    .expect("reader")
    .expect("read");
    assert_eq!(s.status().zero_faults, 1);
}

#[test]
fn swap_in_everything_returns_to_idle_and_empties_the_file() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 2 << 20)]);
    write_pattern(&ram, 5);
    let s = swapper(&ram);
    s.swap_out(2 << 20).expect("swap out");
    let low = ram.resident_bytes().expect("mincore");

    let report = s.swap_out(0).expect("swap in");

    assert_eq!(report.pages_swapped_in, 512);
    assert_eq!(report.swapped_pages, 0);
    assert_eq!(ram.resident_bytes().expect("mincore") - low, 2 << 20);
    let st = s.status();
    assert_eq!(st.state, SwapState::Idle);
    assert_eq!(st.file_size_bytes, 0);
    assert_eq!(st.faults_served, 0, "brought back without faults");
    assert!(mismatches_on_thread(&ram, 5).is_empty());
    let path = st.file_path.expect("the file's name");
    assert!(
        !path.exists(),
        "the swap file is unlinked as soon as it is open"
    );
}

#[test]
fn partial_targets_swap_out_and_in_to_the_target() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 2 << 20)]);
    write_pattern(&ram, 6);
    let s = swapper(&ram);

    assert_eq!(s.swap_out(1 << 20).expect("out").swapped_pages, 256);
    assert_eq!(s.swap_out(1536 << 10).expect("more").swapped_pages, 384);
    assert_eq!(s.swap_out(512 << 10).expect("in").swapped_pages, 128);
    let st = s.status();
    assert_eq!(st.state, Active);
    assert!(st.file_size_bytes <= 2 << 20);
    assert!(mismatches_on_thread(&ram, 6).is_empty());
    let t: Vec<(SwapState, SwapState)> = st.transitions.iter().map(|t| (t.from, t.to)).collect();
    use SwapState::{Active, Idle, SwappingIn, SwappingOut};
    assert_eq!(
        t,
        vec![
            (Idle, SwappingOut),
            (SwappingOut, Active),
            (Active, SwappingOut),
            (SwappingOut, Active),
            (Active, SwappingIn),
            (SwappingIn, Active)
        ]
    );
    assert_eq!(st.transitions[1].pages_moved, 256);
    assert_eq!(st.transitions[5].swapped_pages, 128);
}

/// Marks a fixed set of pages dirty in every interval.
struct FakeDirtyLog {
    dirty: Vec<Vec<u64>>,
}
impl DirtyLog for FakeDirtyLog {
    fn dirty_pages(&mut self, range_idx: usize) -> io::Result<Vec<u64>> {
        Ok(self.dirty[range_idx].clone())
    }
}

fn bitmap(pages: usize, set: impl Fn(usize) -> bool) -> Vec<u64> {
    let mut b = vec![0u64; pages.div_ceil(64)];
    for p in (0..pages).filter(|p| set(*p)) {
        b[p / 64] |= 1 << (p % 64);
    }
    b
}

#[test]
fn least_recently_written_pages_go_first() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 7);
    let s = swapper(&ram);
    // Pages 0..128 are written every interval; 128..256 never.
    let mut log = FakeDirtyLog {
        dirty: vec![bitmap(256, |p| p < 128)],
    };
    for _ in 0..3 {
        s.sample_ages(&mut log).expect("sample");
    }

    s.swap_out(128 * PAGE_SIZE).expect("swap out");

    let host = ram.host_ranges()[0].1 as u64;
    let mut core = Vec::new();
    uffd::mincore(host, 1 << 20, &mut core).expect("mincore");
    assert!(core[..128].iter().all(|c| c & 1 == 1), "hot pages stay");
    assert!(core[128..].iter().all(|c| c & 1 == 0), "cold pages go");
    assert_eq!(s.status().age_samples, 3);
}

#[test]
fn ten_thousand_random_pages_of_64_mib_come_back_in_random_order() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 64 << 20)]);
    let pages = (64 << 20) / PAGE;
    write_pattern(&ram, 11);
    let s = swapper(&ram);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut chosen = HashSet::new();
    while chosen.len() < 10_000 {
        chosen.insert(rng.below(pages as u64) as usize);
    }
    // The chosen pages are the cold ones.
    let mut log = FakeDirtyLog {
        dirty: vec![bitmap(pages, |p| !chosen.contains(&p))],
    };
    s.sample_ages(&mut log).expect("sample");

    let report = s.swap_out(10_000 * PAGE_SIZE).expect("swap out");

    assert_eq!(report.swapped_pages, 10_000);
    let host = ram.host_ranges()[0].1 as u64;
    let mut core = Vec::new();
    uffd::mincore(host, 64 << 20, &mut core).expect("mincore");
    for (p, c) in core.iter().enumerate() {
        assert_eq!(c & 1 == 0, chosen.contains(&p), "page {p}");
    }
    // Touch them in random order from two threads.
    let mut order: Vec<usize> = chosen.into_iter().collect();
    order.sort_unstable();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let halves: Vec<Vec<usize>> = order.chunks(5_000).map(<[usize]>::to_vec).collect();
    let handles: Vec<_> = halves
        .into_iter()
        .map(|half| {
            let ram = ram.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; PAGE];
                half.into_iter()
                    .filter(|p| {
                        ram.memory()
                            .read_slice(&mut buf, GuestAddress((*p * PAGE) as u64))
                            .expect("read");
                        buf != pattern_page(*p as u64, 11)
                    })
                    .count()
            })
        })
        .collect();
    let bad: usize = handles
        .into_iter()
        .map(|h| h.join().expect("toucher"))
        .sum();
    assert_eq!(bad, 0);
    assert_eq!(s.status().faults_served, 10_000);
    assert!(
        mismatches_on_thread(&ram, 11).is_empty(),
        "the rest is intact"
    );
}

#[test]
fn concurrent_writer_during_swap_out_loses_no_write() {
    crate::require!(UffdWriteProtect);
    concurrent_writer_loses_no_write(SwapOptions::default().batch_pages);
}

/// The same with many small batches, so that most of them are written on the writer thread
/// while the next one is write-protected and the previous one committed.
#[test]
fn concurrent_writer_during_pipelined_swap_out_loses_no_write() {
    crate::require!(UffdWriteProtect);
    concurrent_writer_loses_no_write(64);
}

fn concurrent_writer_loses_no_write(batch_pages: usize) {
    let size = 8usize << 20;
    let ram = ram(&[(0, size as u64)]);
    write_pattern(&ram, 13);
    let mut shadow: Vec<u8> = (0..size / PAGE)
        .flat_map(|p| pattern_page(p as u64, 13))
        .collect();
    let s = Swapper::new(
        &ram,
        &std::env::temp_dir(),
        SwapOptions {
            batch_pages,
            ..SwapOptions::default()
        },
    )
    .expect("swapper");
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let ram = ram.clone();
        let stop = Arc::clone(&stop);
        let writes = Arc::clone(&writes);
        std::thread::spawn(move || {
            let mut rng = Rng(0xfeed_beef);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let off = (rng.below((size / 8) as u64) * 8) as usize;
                let val = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                ram.memory()
                    .write_obj(val, GuestAddress(off as u64))
                    .expect("write");
                shadow[off..off + 8].copy_from_slice(&val.to_ne_bytes());
                writes.fetch_add(1, Ordering::Relaxed);
            }
            shadow
        })
    };

    for round in 0..6 {
        s.swap_out(size as u64).expect("swap out");
        if round % 2 == 1 {
            s.swap_out(0).expect("swap in");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let shadow_final = writer.join().expect("writer");
    shadow = shadow_final;

    let ram2 = ram.clone();
    let now = std::thread::spawn(move || {
        let mut v = vec![0u8; size];
        ram2.memory()
            .read_slice(&mut v, GuestAddress(0))
            .expect("read");
        v
    })
    .join()
    .expect("reader");
    let bad_pages: Vec<usize> = (0..size / PAGE)
        .filter(|p| now[p * PAGE..(p + 1) * PAGE] != shadow[p * PAGE..(p + 1) * PAGE])
        .collect();
    assert!(
        bad_pages.is_empty(),
        "pages differ: {:?}",
        &bad_pages[..bad_pages.len().min(10)]
    );
    assert!(writes.load(Ordering::Relaxed) > 1000);
    let st = s.status();
    assert!(st.wp_faults > 0, "the writer raced at least one swap-out");
    assert!(st.faults_served > 0);
}

#[test]
fn forget_gives_up_the_slot_and_reads_zero() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 17);
    let s = swapper(&ram);
    s.swap_out(1 << 20).expect("swap out");

    s.forget(GuestAddress(64 * PAGE_SIZE), 64 * PAGE_SIZE)
        .expect("forget");

    let st = s.status();
    assert_eq!(st.swapped_pages, 192);
    let r2 = ram.clone();
    let (forgotten_zero, rest_ok) = std::thread::spawn(move || {
        let mut buf = vec![1u8; PAGE];
        let mut zero = true;
        let mut ok = true;
        for p in 0..256u64 {
            r2.memory()
                .read_slice(&mut buf, GuestAddress(p * PAGE_SIZE))
                .expect("read");
            if (64..128).contains(&p) {
                zero &= buf.iter().all(|b| *b == 0);
            } else {
                ok &= buf == pattern_page(p, 17);
            }
        }
        (zero, ok)
    })
    .join()
    .expect("reader");
    assert!(forgotten_zero);
    assert!(rest_ok);
    let st = s.status();
    assert_eq!(st.faults_served, 192);
    assert_eq!(st.zero_faults, 64);
    // Resident pages that are forgotten are dropped too (the balloon's discard).
    let before = ram.resident_bytes().expect("mincore");
    s.discard_range(GuestAddress(0), 16 * PAGE_SIZE)
        .expect("discard");
    assert_eq!(
        before - ram.resident_bytes().expect("mincore"),
        16 * PAGE_SIZE
    );
    assert!(matches!(
        s.forget(GuestAddress(1 << 20), PAGE_SIZE),
        Err(SwapError::BadRange { .. })
    ));
    assert!(matches!(
        s.forget(GuestAddress(100), PAGE_SIZE),
        Err(SwapError::BadRange { .. })
    ));
}

/// A swap file whose writes or reads can be made to fail (or panic).
#[derive(Debug)]
struct Faulty {
    inner: SwapFile,
    writes_left: AtomicU64,
    fail_reads: AtomicBool,
    panic_reads: AtomicBool,
}

impl Faulty {
    fn new(writes_left: u64) -> Arc<Self> {
        Arc::new(Faulty {
            inner: SwapFile::create(&std::env::temp_dir()).expect("file"),
            writes_left: AtomicU64::new(writes_left),
            fail_reads: AtomicBool::new(false),
            panic_reads: AtomicBool::new(false),
        })
    }
}

impl SwapBacking for Arc<Faulty> {
    fn write_pages_at(&self, pages: &GuestPieces, offset: u64) -> io::Result<()> {
        let left = self.writes_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.writes_left.store(left - 1, Ordering::SeqCst);
        self.inner.write_pages_at(pages, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.panic_reads.load(Ordering::SeqCst) {
            panic!("injected panic in the fault handler");
        }
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.read_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
}

/// A swap file that records the size of every write.
#[derive(Debug)]
struct Recording {
    inner: SwapFile,
    writes: Mutex<Vec<u64>>,
}

impl SwapBacking for Arc<Recording> {
    fn write_pages_at(&self, pages: &GuestPieces, offset: u64) -> io::Result<()> {
        lock(&self.writes).push(pages.len_bytes());
        self.inner.write_pages_at(pages, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
}

#[test]
fn a_pipelined_swap_out_writes_at_most_a_mebibyte_at_a_time_and_loses_nothing() {
    crate::require!(UffdWriteProtect);
    // Two ranges, every 5th page zero: batches of 1024 pages (the default) cross the range
    // boundary, and slot runs are shorter than page runs.
    let ram = ram(&[(0, 12 << 20), (16 << 20, 8 << 20)]);
    write_pattern(&ram, 23);
    for (i, addr) in pages_of(&ram).into_iter().enumerate() {
        if i % 5 == 0 {
            ram.memory().write_slice(&[0u8; PAGE], addr).expect("zero");
        }
    }
    let pages = ram.size_bytes() / PAGE_SIZE;
    let zero = pages.div_ceil(5);
    let backing = Arc::new(Recording {
        inner: SwapFile::create(&std::env::temp_dir()).expect("file"),
        writes: Mutex::new(Vec::new()),
    });
    let s = Swapper::with_backing(&ram, Box::new(Arc::clone(&backing)), SwapOptions::default())
        .expect("swapper");

    let report = s.swap_out(ram.size_bytes()).expect("swap out");

    assert_eq!(report.swapped_pages, pages);
    assert_eq!(report.zero_pages, zero);
    assert_eq!(report.pages_written, pages - zero);
    let writes = lock(&backing.writes).clone();
    assert!(writes.iter().all(|w| *w <= 1 << 20), "{writes:?}");
    assert_eq!(writes.iter().sum::<u64>(), (pages - zero) * PAGE_SIZE);
    assert_eq!(s.status().file_size_bytes, (pages - zero) * PAGE_SIZE);
    let bad: Vec<usize> = mismatches_on_thread(&ram, 23)
        .into_iter()
        .filter(|p| p % 5 != 0)
        .collect();
    assert!(bad.is_empty(), "pages differ: {bad:?}");
    let st = s.status();
    assert_eq!(st.faults_served, pages - zero);
    assert_eq!(st.zero_faults, zero);
    assert_eq!(st.swapped_pages, 0);
    let r2 = ram.clone();
    let zeros_ok = std::thread::spawn(move || {
        let mut buf = vec![1u8; PAGE];
        pages_of(&r2).into_iter().step_by(5).all(|addr| {
            r2.memory().read_slice(&mut buf, addr).expect("read");
            buf.iter().all(|b| *b == 0)
        })
    })
    .join()
    .expect("reader");
    assert!(zeros_ok);
}

#[test]
fn a_full_disk_leaves_pages_in_ram_and_counts_the_error() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 2 << 20)]);
    write_pattern(&ram, 19);
    let backing = Faulty::new(1);
    let s = Swapper::with_backing(
        &ram,
        Box::new(Arc::clone(&backing)),
        SwapOptions {
            batch_pages: 128,
            ..SwapOptions::default()
        },
    )
    .expect("swapper");
    let before = ram.resident_bytes().expect("mincore");

    let report = s.swap_out(2 << 20).expect("a write error is not fatal");

    assert_eq!(report.swapped_pages, 128, "the first batch made it");
    assert_eq!(report.write_errors, 1);
    assert_eq!(
        before - ram.resident_bytes().expect("mincore"),
        128 * PAGE_SIZE
    );
    let st = s.status();
    assert_eq!(st.write_errors, 1);
    assert_eq!(st.errors, 1);
    assert_eq!(st.state, SwapState::Active);
    assert_eq!(
        st.file_size_bytes,
        128 * PAGE_SIZE,
        "failed slots given back"
    );
    // Nothing lost, and the kept pages are writable again (not left write-protected).
    assert!(mismatches_on_thread(&ram, 19).is_empty());
    let r2 = ram.clone();
    std::thread::spawn(move || {
        r2.memory()
            .write_obj(0xabu64, GuestAddress(1 << 20))
            .expect("write")
    })
    .join()
    .expect("writer");
    assert_eq!(s.status().wp_faults, 0);
    // When the disk has room again, the rest goes.
    backing.writes_left.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(s.swap_out(2 << 20).expect("retry").swapped_pages, 512);
}

fn failing_swapper(
    ram: &GuestRam,
    backing: &Arc<Faulty>,
) -> (Swapper, mpsc::Receiver<SwapFailure>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let s = Swapper::with_backing(
        ram,
        Box::new(Arc::clone(backing)),
        SwapOptions {
            on_failure: Some(Arc::new(move |f: &SwapFailure| {
                let _ = lock(&tx).send(f.clone());
            })),
            ..SwapOptions::default()
        },
    )
    .expect("swapper");
    (s, rx)
}

/// A thread that reads guest page 0 (a vCPU touching a swapped page); it blocks until the
/// fault is served or the swapper lets go of guest RAM.
fn read_first_page_on_thread(ram: &GuestRam) -> JoinHandle<()> {
    let r2 = ram.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; PAGE];
        r2.memory()
            .read_slice(&mut buf, GuestAddress(0))
            .expect("read");
    })
}

#[test]
fn an_unreadable_swap_file_fails_the_swapper_loudly() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 23);
    let backing = Faulty::new(u64::MAX);
    let (s, rx) = failing_swapper(&ram, &backing);
    s.swap_out(1 << 20).expect("swap out");
    backing.fail_reads.store(true, Ordering::SeqCst);

    let blocked = read_first_page_on_thread(&ram);

    let failure = rx.recv_timeout(Duration::from_secs(10)).expect("told");
    assert!(
        failure.reason.contains("cannot read swap slot"),
        "{}",
        failure.reason
    );
    assert!(rx.try_recv().is_err(), "told once");
    let st = s.status();
    assert_eq!(st.state, SwapState::Failed);
    assert_eq!(st.read_errors, 3, "retried before giving up");
    assert!(matches!(s.swap_out(0), Err(SwapError::Failed(_))));
    // Dropping the swapper (the VMM stopping the VM) releases the blocked thread.
    drop(s);
    blocked.join().expect("released");
}

#[test]
fn a_dead_fault_thread_is_detected_and_reported() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 29);
    let backing = Faulty::new(u64::MAX);
    let (s, rx) = failing_swapper(&ram, &backing);
    s.swap_out(1 << 20).expect("swap out");
    backing.panic_reads.store(true, Ordering::SeqCst);

    let blocked = read_first_page_on_thread(&ram);

    let failure = rx.recv_timeout(Duration::from_secs(10)).expect("told");
    assert!(failure.reason.contains("panicked"), "{}", failure.reason);
    assert_eq!(s.status().state, SwapState::Failed);
    assert!(s.status().failure.is_some());
    drop(s);
    blocked.join().expect("released");
}

#[test]
fn status_serializes_and_metrics_have_stable_names() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 31);
    let s = swapper(&ram);
    s.swap_out(1 << 19).expect("swap out");

    let json = serde_json::to_value(s.status()).expect("serialize");

    assert_eq!(json["state"], "active");
    assert_eq!(json["swapped_pages"], 128);
    assert!(json["fault_latency_p99_us"].is_u64());
    assert_eq!(json["transitions"][0]["to"], "swapping_out");
    let m = s.metrics();
    let get = |n: &str| m.iter().find(|m| m.name == n).copied();
    let kind = |n: &str| get(n).map(|m| m.kind());
    assert_eq!(get("swap_swapped_pages").map(|m| m.as_u64()), Some(128));
    assert_eq!(
        get("swap_state").map(|m| m.as_u64()),
        Some(SwapState::Active.code())
    );
    assert_eq!(
        get("swap_bytes_written").map(|m| m.as_u64()),
        Some(128 * PAGE_SIZE)
    );
    assert!(m.iter().all(|m| m.name.starts_with("swap_")));
    // Levels are gauges, counts are counters: the swapper says which.
    for level in [
        "swap_state",
        "swap_swapped_pages",
        "swap_fault_latency_p99_us",
    ] {
        assert_eq!(kind(level), Some(MetricKind::Gauge), "{level}");
    }
    for count in ["swap_faults_served", "swap_bytes_written", "swap_errors"] {
        assert_eq!(kind(count), Some(MetricKind::Counter), "{count}");
    }
}

#[test]
fn runs_never_cross_a_range_boundary() {
    assert_eq!(
        runs_within(&[0, 1, 2, 4, 5, 6, 7], &[0, 6]),
        vec![(0, 3), (4, 2), (6, 2)]
    );
    assert!(runs_within(&[], &[0]).is_empty());
}

#[test]
fn swap_cancel_stops_moving_pages_but_faults_are_still_served() {
    crate::require!(UffdWriteProtect);
    let ram = ram(&[(0, 4 << 20)]);
    write_pattern(&ram, 9);
    let s = swapper(&ram);
    let report = s.swap_out(2 << 20).expect("swap out half");
    assert_eq!(report.swapped_pages, 512);

    s.cancel();
    let more = s.swap_out(4 << 20).expect("cancelled swap-out");
    assert_eq!((more.pages_written, more.swapped_pages), (0, 512));
    let back = s.swap_out(0).expect("cancelled swap-in");
    assert_eq!((back.pages_swapped_in, back.swapped_pages), (0, 512));
    assert_eq!(s.status().state, SwapState::Active);
    // The pages in swap still come back, with their bytes, when touched.
    assert!(mismatches_on_thread(&ram, 9).is_empty());
    assert_eq!(s.status().swapped_pages, 0);
}

/// Pages of `file` in the host page cache (mapped and checked with `mincore`).
fn cached_pages(file: &std::fs::File) -> usize {
    use std::os::fd::AsRawFd;
    let len = file.metadata().expect("stat").len() as usize;
    assert!(len > 0);
    // SAFETY: maps `len` bytes of an open file read-only, shared; the mapping is only passed to
    // mincore and unmapped below, never dereferenced.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap the swap file");
    let mut v = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `p` maps `len` bytes and `v` has one byte per page of them.
    let ret = unsafe { libc::mincore(p, len, v.as_mut_ptr()) };
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(p, len) };
    assert_eq!(ret, 0, "mincore");
    v.iter().filter(|b| **b & 1 != 0).count()
}

/// Whether `dir` is on tmpfs (`TMPFS_MAGIC`), where a file's pages are its storage.
fn is_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).expect("path");
    // SAFETY: an all-zero statfs is a valid value; statfs fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a C string and `st` a statfs, both live for the call.
    let ret = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    ret == 0 && st.f_type == 0x0102_1994
}

/// The swap file as a backing the test keeps a handle on.
#[derive(Debug)]
struct KeptFile(Arc<SwapFile>);

impl SwapBacking for KeptFile {
    fn write_pages_at(&self, pages: &GuestPieces, offset: u64) -> io::Result<()> {
        self.0.write_pages_at(pages, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn path(&self) -> Option<&Path> {
        self.0.path()
    }
}

#[test]
fn swapped_pages_do_not_stay_in_the_host_page_cache() {
    let dir = std::env::temp_dir();
    if is_tmpfs(&dir) {
        eprintln!(
            "skipped: {} is tmpfs, whose pages are its storage",
            dir.display()
        );
        return;
    }
    for mode in [WriteMode::Direct, WriteMode::Datasync] {
        let ram = ram(&[(0, 8 << 20)]);
        write_pattern(&ram, 41);
        let file = Arc::new(SwapFile::create_with(&dir, mode).expect("file"));
        let s = Swapper::with_backing(
            &ram,
            Box::new(KeptFile(Arc::clone(&file))),
            SwapOptions::default(),
        )
        .expect("swapper");

        let report = s.swap_out(8 << 20).expect("swap out");

        assert_eq!(report.pages_written, 2048);
        let cached = cached_pages(file.file());
        assert!(
            cached < 2048 / 10,
            "{mode:?}: {cached} of 2048 swapped pages still in the page cache"
        );
        assert!(mismatches_on_thread(&ram, 41).is_empty(), "{mode:?}");
    }
}

#[test]
fn a_corrupted_swap_page_stops_the_swapper_instead_of_reaching_the_guest() {
    use std::os::unix::fs::FileExt;
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 43);
    let backing = Faulty::new(u64::MAX);
    let (s, rx) = failing_swapper(&ram, &backing);
    s.swap_out(1 << 20).expect("swap out");
    // Page 0 went to slot 0: flip one bit of it on disk (a bad sector, a stray write).
    // (Whole aligned pages: the file may be open with O_DIRECT.)
    let mut page = PageBuf([0u8; PAGE]);
    let f = backing.inner.file();
    f.read_exact_at(&mut page.0, 0).expect("read the file");
    page.0[100] ^= 0x10;
    f.write_all_at(&page.0, 0).expect("corrupt the file");

    let blocked = read_first_page_on_thread(&ram);

    let failure = rx.recv_timeout(Duration::from_secs(10)).expect("told");
    assert!(failure.reason.contains("checksum"), "{}", failure.reason);
    assert!(
        failure.reason.contains("guest page 0x0"),
        "{}",
        failure.reason
    );
    let st = s.status();
    assert_eq!(st.state, SwapState::Failed);
    assert_eq!(st.checksum_errors, 1);
    // The guest never sees the bad bytes: the reader stays blocked until the VMM lets go.
    assert!(!blocked.is_finished());
    drop(s);
    blocked.join().expect("released");
}

/// A swap file whose reads take `delay` once `slow` is set.
#[derive(Debug)]
struct Slow {
    inner: SwapFile,
    slow: AtomicBool,
    reading: AtomicBool,
    delay: Duration,
}

impl SwapBacking for Arc<Slow> {
    fn write_pages_at(&self, pages: &GuestPieces, offset: u64) -> io::Result<()> {
        self.inner.write_pages_at(pages, offset)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.slow.load(Ordering::SeqCst) {
            self.reading.store(true, Ordering::SeqCst);
            std::thread::sleep(self.delay);
        }
        self.inner.read_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn path(&self) -> Option<&Path> {
        self.inner.path()
    }
}

#[test]
fn a_slow_disk_read_does_not_hold_the_page_table() {
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 47);
    let backing = Arc::new(Slow {
        inner: SwapFile::create(&std::env::temp_dir()).expect("file"),
        slow: AtomicBool::new(false),
        reading: AtomicBool::new(false),
        delay: Duration::from_secs(3),
    });
    let s = Swapper::with_backing(&ram, Box::new(Arc::clone(&backing)), SwapOptions::default())
        .expect("swapper");
    s.swap_out(1 << 20).expect("swap out");
    backing.slow.store(true, Ordering::SeqCst);

    let blocked = read_first_page_on_thread(&ram);
    while !backing.reading.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1));
    }
    // What the API asks for and what the balloon does both need the table.
    let asked = Instant::now();
    let st = s.status();
    s.forget(GuestAddress(PAGE_SIZE * 8), PAGE_SIZE)
        .expect("forget");
    let waited = asked.elapsed();

    assert!(
        waited < Duration::from_millis(500),
        "status and forget waited {waited:?} for a disk read"
    );
    assert_eq!(st.swapped_pages, 256);
    blocked
        .join()
        .expect("the fault is served after the slow read");
    assert_eq!(s.status().faults_served, 1);
}

#[test]
fn a_failed_swapper_releases_blocked_threads_even_if_nobody_tears_it_down() {
    // The thread blocked on the fault may be the one that would stop the VM (the event loop
    // emulating a device): the swapper must not wait to be dropped.
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 53);
    let backing = Faulty::new(u64::MAX);
    let (s, rx) = failing_swapper(&ram, &backing);
    s.swap_out(1 << 20).expect("swap out");
    backing.fail_reads.store(true, Ordering::SeqCst);
    let failed_at = Instant::now();

    let blocked = read_first_page_on_thread(&ram);
    rx.recv_timeout(Duration::from_secs(10)).expect("told");

    let deadline = Instant::now() + FAILED_RELEASE_GRACE + Duration::from_secs(5);
    while !blocked.is_finished() {
        assert!(
            Instant::now() < deadline,
            "a thread is still blocked on a fault nobody serves"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    blocked.join().expect("released");
    assert!(
        failed_at.elapsed() >= FAILED_RELEASE_GRACE / 2,
        "the VMM had its grace period"
    );
    assert_eq!(s.status().state, SwapState::Failed);
}

#[test]
fn a_panicking_fault_handler_releases_blocked_threads_too() {
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 59);
    let backing = Faulty::new(u64::MAX);
    let (s, rx) = failing_swapper(&ram, &backing);
    s.swap_out(1 << 20).expect("swap out");
    backing.panic_reads.store(true, Ordering::SeqCst);

    let blocked = read_first_page_on_thread(&ram);
    let failure = rx.recv_timeout(Duration::from_secs(10)).expect("told");
    assert!(failure.reason.contains("panicked"), "{}", failure.reason);

    let deadline = Instant::now() + FAILED_RELEASE_GRACE + Duration::from_secs(5);
    while !blocked.is_finished() {
        assert!(
            Instant::now() < deadline,
            "still blocked after a handler panic"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    blocked.join().expect("released");
    drop(s);
}

#[test]
fn release_faults_wakes_blocked_threads_at_once_for_a_failed_swapper_only() {
    let ram = ram(&[(0, 1 << 20)]);
    write_pattern(&ram, 61);
    let backing = Faulty::new(u64::MAX);
    let (s, rx) = failing_swapper(&ram, &backing);
    s.swap_out(1 << 20).expect("swap out");
    s.release_faults();
    assert!(
        mismatches_on_thread(&ram, 61).is_empty(),
        "a healthy swapper keeps serving faults"
    );
    backing.fail_reads.store(true, Ordering::SeqCst);
    s.swap_out(1 << 20).expect("swap out again");

    let blocked = read_first_page_on_thread(&ram);
    rx.recv_timeout(Duration::from_secs(10)).expect("told");
    let asked = Instant::now();
    s.release_faults();
    blocked.join().expect("released");
    assert!(
        asked.elapsed() < FAILED_RELEASE_GRACE / 2,
        "{:?}",
        asked.elapsed()
    );
}
