//! Host-side latency of plugging and unplugging 1 GiB through the virtio-mem device.
//!
//! The guest's side of the request queue is played in memory, as Linux's driver does it: one
//! request in flight, the driver waiting for each answer. Every request goes through the whole
//! device path (`handle_queue`: chain parsing, range checks, the block bitmap, memslots, the
//! response and the used ring). Memslots go to a stand-in that makes one real syscall per
//! add/remove on the slot's memory (`madvise(MADV_NORMAL)`, no KVM here); discards are real
//! `MADV_DONTNEED`s on the device's own region mapping. Between plugging and unplugging, the
//! whole gigabyte is written (untimed), as a guest using its new memory would, so that each
//! unplug really frees resident memory. Two request patterns:
//!
//! - one block per request (512 PLUGs, 512 UNPLUGs): the worst case;
//! - 64 blocks per request (one 128 MiB Linux memory block each): what Linux sends when it adds
//!   a whole memory block;
//! - one block per request again with the region on 4 KiB pages only (`MADV_NOHUGEPAGE`), to
//!   show what the device's `MADV_HUGEPAGE` on the region buys at unplug time.
//!
//! Goal: under 50 ms each way for 1 GiB in 2 MiB blocks. Run with
//! `cargo bench -p hotplug --bench virtio_mem` (or `bench/virtio-mem`); exits non-zero if the
//! one-block-per-request median misses the goal.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::fake::FakeInterrupt;
use devices::virtio::{Activation, VirtioDevice};
use hotplug::wire::{encode_request, RESP_ACK};
use hotplug::{Memslot, MemslotControl, Request, VirtioMem, VirtioMemConfig};
use memory::{GuestRam, RamRange};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MIB: u64 = 1 << 20;
const REGION_ADDR: u64 = 4 << 30;
const PLUG_BYTES: u64 = 1 << 30;
const BLOCK: u64 = 2 * MIB;
const QUEUE_SIZE: u16 = 128;
const QUEUE_ADDR: u64 = 0x1_0000;
const REQ_ADDR: u64 = 0x10_0000;
const RESP_ADDR: u64 = 0x10_1000;
const REPETITIONS: usize = 5;
const GOAL: Duration = Duration::from_millis(50);

/// Stands in for `KVM_SET_USER_MEMORY_REGION`: one real syscall on the slot's memory.
struct SyscallMemslots {
    calls: u64,
}

impl SyscallMemslots {
    fn touch(&mut self, slot: &Memslot) -> io::Result<()> {
        self.calls += 1;
        // SAFETY: `host_addr..host_addr + size` is part of the device's live region mapping;
        // MADV_NORMAL only resets the read-ahead hint and changes no memory.
        let ret = unsafe {
            libc::madvise(
                slot.host_addr as *mut libc::c_void,
                slot.size as usize,
                libc::MADV_NORMAL,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl MemslotControl for SyscallMemslots {
    fn add(&mut self, slot: &Memslot) -> io::Result<()> {
        self.touch(slot)
    }
    fn remove(&mut self, slot: &Memslot) -> io::Result<()> {
        self.touch(slot)
    }
}

/// The driver's side: one chain (request, response) per request, reusing two descriptors.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    avail_idx: u16,
}

impl Driver<'_> {
    fn post(&mut self, request: Request) {
        self.mem
            .write_slice(&encode_request(request), GuestAddress(REQ_ADDR))
            .expect("request");
        let table = self.mock.desc_table();
        table
            .store(0, RawDescriptor::from(Descriptor::new(REQ_ADDR, 24, 1, 1)))
            .expect("desc 0");
        table
            .store(1, RawDescriptor::from(Descriptor::new(RESP_ADDR, 10, 2, 0)))
            .expect("desc 1");
        let avail = self.mock.avail_addr().0;
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem
            .write_obj(0u16, GuestAddress(avail + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(avail + 2))
            .expect("avail idx");
    }

    fn response(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(RESP_ADDR))
            .expect("response")
    }
}

struct Run {
    plug: Duration,
    unplug: Duration,
    memslot_calls: u64,
    freed_bytes: u64,
}

/// Gives up transparent huge pages on the region (the device asks for them): the baseline.
fn small_pages_only(dev: &VirtioMem) {
    dev.ram()
        .set_hugepages(false)
        .expect("MADV_NOHUGEPAGE on the region");
}

fn run(blocks_per_request: u16, huge_pages: bool) -> Run {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (16 * MIB) as usize)])
        .expect("queue memory");
    let config = VirtioMemConfig {
        region_addr: Some(REGION_ADDR),
        ..VirtioMemConfig::new(PLUG_BYTES)
    };
    let memslots = Box::new(SyscallMemslots { calls: 0 });
    let region = GuestRam::new(&[RamRange::new(REGION_ADDR, PLUG_BYTES)]).expect("region");
    let mut dev = VirtioMem::new(config, region, memslots).expect("device");
    if !huge_pages {
        small_pages_only(&dev);
    }
    dev.set_acked_features(dev.avail_features());
    let mock = MockSplitQueue::create(&mem, GuestAddress(QUEUE_ADDR), QUEUE_SIZE);
    dev.activate(Activation {
        mem: mem.clone(),
        queues: vec![mock.create_queue::<Queue>().expect("queue")],
        queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")],
        interrupt: Arc::new(FakeInterrupt::new()),
    })
    .expect("activate");
    dev.set_requested_size(PLUG_BYTES).expect("requested size");
    let mut driver = Driver {
        mem: &mem,
        mock,
        avail_idx: 0,
    };
    let step = u64::from(blocks_per_request) * BLOCK;
    let addrs: Vec<u64> = (0..PLUG_BYTES / step)
        .map(|i| REGION_ADDR + i * step)
        .collect();

    let mut plug = Duration::ZERO;
    for &addr in &addrs {
        driver.post(Request::Plug {
            addr,
            nb_blocks: blocks_per_request,
        });
        let t = Instant::now();
        dev.handle_queue().expect("plug");
        plug += t.elapsed();
        assert_eq!(driver.response(), RESP_ACK, "plug {addr:#x} acked");
    }
    assert_eq!(dev.plugged_size(), PLUG_BYTES);

    // The guest uses its new memory: every page becomes resident (untimed).
    let region = dev.memory();
    let page = [1u8; 8];
    for offset in (0..PLUG_BYTES).step_by(4096) {
        region
            .write_slice(&page, GuestAddress(REGION_ADDR + offset))
            .expect("touch");
    }
    let resident_before = dev.ram().resident_bytes().expect("mincore");

    let mut unplug = Duration::ZERO;
    for &addr in &addrs {
        driver.post(Request::Unplug {
            addr,
            nb_blocks: blocks_per_request,
        });
        let t = Instant::now();
        dev.handle_queue().expect("unplug");
        unplug += t.elapsed();
        assert_eq!(driver.response(), RESP_ACK, "unplug {addr:#x} acked");
    }
    assert_eq!(dev.plugged_size(), 0);
    let resident_after = dev.ram().resident_bytes().expect("mincore");
    let metrics = dev.metrics().values();
    let get = |name: &str| {
        metrics
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
            .expect("metric")
    };
    Run {
        plug,
        unplug,
        memslot_calls: get("memslot_adds_total") + get("memslot_removes_total"),
        freed_bytes: resident_before - resident_after,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    println!(
        "virtio-mem host-side latency: 1 GiB in 2 MiB blocks, {REPETITIONS} runs, median (min..max)"
    );
    let mut goal_met = true;
    for (blocks, huge_pages) in [(1u16, true), (64, true), (1, false)] {
        let runs: Vec<Run> = (0..REPETITIONS).map(|_| run(blocks, huge_pages)).collect();
        let plugs: Vec<Duration> = runs.iter().map(|r| r.plug).collect();
        let unplugs: Vec<Duration> = runs.iter().map(|r| r.unplug).collect();
        let requests = PLUG_BYTES / (u64::from(blocks) * BLOCK);
        let (p, u) = (median(plugs.clone()), median(unplugs.clone()));
        let range = |v: &[Duration]| {
            let min = v.iter().min().copied().unwrap_or_default();
            let max = v.iter().max().copied().unwrap_or_default();
            format!("{:.2}..{:.2}", ms(min), ms(max))
        };
        let pages = if huge_pages {
            "2 MiB huge pages (the device's default)"
        } else {
            "4 KiB pages only (baseline, MADV_NOHUGEPAGE)"
        };
        println!(
            "  {blocks:>2} block(s)/request, {requests:>3} requests each way, {pages}:\n    \
             plug   {:>7.2} ms ({} ms), {:>8.2} us/request\n    \
             unplug {:>7.2} ms ({} ms), {:>8.2} us/request, {} MiB freed, {} memslot calls",
            ms(p),
            range(&plugs),
            p.as_secs_f64() * 1e6 / requests as f64,
            ms(u),
            range(&unplugs),
            u.as_secs_f64() * 1e6 / requests as f64,
            runs[0].freed_bytes / MIB,
            runs[0].memslot_calls,
        );
        if blocks == 1 && huge_pages && (p > GOAL || u > GOAL) {
            goal_met = false;
        }
    }
    println!(
        "goal: under {} ms each way with one block per request: {}",
        GOAL.as_millis(),
        if goal_met { "met" } else { "MISSED" }
    );
    if !goal_met {
        std::process::exit(1);
    }
}
