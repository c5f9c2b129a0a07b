//! Host-side cost of processing a 1 GiB balloon inflate (262,144 PFNs) against real guest RAM.
//!
//! The PFNs arrive as Linux's balloon driver sends them: one chain of one 256-PFN descriptor per
//! notification (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`), the driver waiting for each to be used. Each
//! run touches the 1 GiB first so that the discards really free memory, then times only the
//! device's queue processing (`handle_page_queue`), including the discards. Three variants run
//! in the same process on the same memory:
//!
//! - coalesced: the device's path, one `madvise(MADV_DONTNEED)` per coalesced range;
//! - per-page baseline: the same path with every range discarded one page at a time;
//! - no discard: queue processing alone, to show what the syscalls cost on top.
//!
//! Run with `cargo bench -p balloon --bench inflate` (or `bench/balloon`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balloon::{Balloon, BalloonConfig, QueueRole};
use devices::virtio::fake::FakeInterrupt;
use devices::virtio::{Activation, VirtioDevice};
use memory::{DiscardRam, GuestRam, RamError, RamRange, PAGE_SIZE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const INFLATE_BYTES: u64 = 1 << 30;
const PFNS: usize = (INFLATE_BYTES / PAGE_SIZE) as usize;
const PFNS_PER_DESC: usize = 256;
const CHAINS: usize = PFNS / PFNS_PER_DESC;
/// Queues and PFN arrays live below this; the inflated gigabyte starts here.
const BALLOON_BASE: u64 = 64 << 20;
const QUEUE_SIZE: u16 = 256;
const PFN_ARRAYS: u64 = 1 << 20;
const REPETITIONS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Coalesced,
    PerPage,
    NoDiscard,
}

/// Discards through real guest RAM, counting the madvise calls.
struct CountingDiscard {
    ram: GuestRam,
    mode: Mode,
    calls: AtomicU64,
}

impl DiscardRam for CountingDiscard {
    fn discard_range(&self, addr: GuestAddress, len: u64) -> Result<(), RamError> {
        match self.mode {
            Mode::Coalesced => {
                self.calls.fetch_add(1, Ordering::Relaxed);
                self.ram.discard(addr, len)
            }
            Mode::PerPage => {
                for page in (0..len).step_by(PAGE_SIZE as usize) {
                    self.calls.fetch_add(1, Ordering::Relaxed);
                    self.ram.discard(GuestAddress(addr.0 + page), PAGE_SIZE)?;
                }
                Ok(())
            }
            Mode::NoDiscard => Ok(()),
        }
    }
}

struct RunResult {
    elapsed: Duration,
    syscalls: u64,
    freed_bytes: u64,
}

fn touch(ram: &GuestRam) {
    let mem = ram.memory();
    for page in 0..PFNS as u64 {
        mem.write_obj(1u8, GuestAddress(BALLOON_BASE + page * PAGE_SIZE))
            .expect("touch a page of guest RAM");
    }
}

fn run(ram: &GuestRam, mode: Mode) -> RunResult {
    let mem = ram.memory();
    touch(ram);

    let discard = Arc::new(CountingDiscard {
        ram: ram.clone(),
        mode,
        calls: AtomicU64::new(0),
    });
    let mut balloon = Balloon::new(BalloonConfig::default(), discard.clone()).expect("balloon");
    balloon.set_acked_features(balloon.avail_features());
    let inflate = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QUEUE_SIZE);
    let deflate = MockSplitQueue::create(mem, GuestAddress(0x2_0000), QUEUE_SIZE);
    balloon
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![
                inflate.create_queue::<Queue>().expect("queue"),
                deflate.create_queue::<Queue>().expect("queue"),
            ],
            queue_evts: (0..2)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
                .collect(),
            interrupt: Arc::new(FakeInterrupt::new()),
        })
        .expect("activate");

    // The guest's PFN arrays: descending within each array, as the buddy allocator tends to
    // hand pages out, highest arrays first.
    for chain in 0..CHAINS {
        let first = BALLOON_BASE / PAGE_SIZE + ((CHAINS - 1 - chain) * PFNS_PER_DESC) as u64;
        let bytes: Vec<u8> = (0..PFNS_PER_DESC as u64)
            .rev()
            .flat_map(|i| ((first + i) as u32).to_le_bytes())
            .collect();
        mem.write_slice(&bytes, GuestAddress(PFN_ARRAYS + chain as u64 * 1024))
            .expect("write PFNs");
    }

    let resident_before = ram.resident_bytes().expect("mincore");
    let avail = inflate.avail_addr().0;
    let mut elapsed = Duration::ZERO;
    for chain in 0..CHAINS {
        // The guest: one descriptor, made available, then a notification.
        let index = (chain % usize::from(QUEUE_SIZE)) as u16;
        let desc = Descriptor::new(
            PFN_ARRAYS + chain as u64 * 1024,
            (PFNS_PER_DESC * 4) as u32,
            0,
            0,
        );
        inflate
            .desc_table()
            .store(index, RawDescriptor::from(desc))
            .expect("descriptor");
        mem.write_obj(
            index.to_le(),
            GuestAddress(avail + 4 + 2 * u64::from(index)),
        )
        .expect("avail ring");
        mem.write_obj(((chain + 1) as u16).to_le(), GuestAddress(avail + 2))
            .expect("avail idx");

        let start = Instant::now();
        balloon
            .handle_page_queue(QueueRole::Inflate)
            .expect("inflate");
        elapsed += start.elapsed();
    }
    let used = inflate.used().idx().load();
    assert_eq!(usize::from(used), CHAINS % 65536, "every chain was used");
    let metrics = balloon.metrics().values();
    let inflated = metrics
        .iter()
        .find(|(n, _)| *n == "inflated_pages_total")
        .map(|(_, v)| *v);
    assert_eq!(inflated, Some(PFNS as u64));

    let resident_after = ram.resident_bytes().expect("mincore");
    RunResult {
        elapsed,
        syscalls: discard.calls.load(Ordering::Relaxed),
        freed_bytes: resident_before.saturating_sub(resident_after),
    }
}

fn gib_per_s(d: Duration) -> f64 {
    (INFLATE_BYTES as f64 / (1u64 << 30) as f64) / d.as_secs_f64()
}

fn main() {
    let ram = GuestRam::new(&[RamRange::new(0, BALLOON_BASE + INFLATE_BYTES)])
        .expect("map 1 GiB + 64 MiB of guest RAM");
    println!(
        "balloon inflate: {} MiB = {PFNS} PFNs in {CHAINS} chains of {PFNS_PER_DESC} PFNs, \
         real guest RAM ({} MiB), best of {REPETITIONS}",
        INFLATE_BYTES >> 20,
        ram.size_bytes() >> 20
    );
    let mut best = Vec::new();
    for (mode, label) in [
        (Mode::Coalesced, "coalesced (one madvise per range)"),
        (Mode::PerPage, "per-page baseline (one madvise per page)"),
        (Mode::NoDiscard, "queue processing only (no discard)"),
    ] {
        let runs: Vec<RunResult> = (0..REPETITIONS).map(|_| run(&ram, mode)).collect();
        let times: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.1}", r.elapsed.as_secs_f64() * 1e3))
            .collect();
        let b = runs
            .into_iter()
            .min_by_key(|r| r.elapsed)
            .expect("at least one run");
        println!(
            "  {label:<42} {:>8.1} ms {:>7.2} GiB/s {:>7} madvise  freed {:>5} MiB  (runs: {} ms)",
            b.elapsed.as_secs_f64() * 1e3,
            gib_per_s(b.elapsed),
            b.syscalls,
            b.freed_bytes >> 20,
            times.join(", ")
        );
        best.push((mode, b));
    }
    let time = |m: Mode| {
        best.iter()
            .find(|(mode, _)| *mode == m)
            .map(|(_, r)| r.elapsed.as_secs_f64())
            .expect("mode ran")
    };
    let ratio = time(Mode::PerPage) / time(Mode::Coalesced);
    let ok = ratio >= 3.0;
    println!(
        "  speed-up coalesced vs per-page: {ratio:.1}x (goal >= 3x: {})",
        if ok { "met" } else { "NOT met" }
    );
    if !ok {
        std::process::exit(1);
    }
}
