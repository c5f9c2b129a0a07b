//! Device tests: the guest's side of each queue is played with virtio-queue's mock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::virtio::fake::FakeInterrupt;
use devices::virtio::{Activation, InterruptKind, VirtioDevice, VIRTIO_F_VERSION_1};
use memory::test_utils::{FakeClock, FakeDiscard};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::*;

const MEM_SIZE: u64 = 64 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn all_features() -> BalloonConfig {
    BalloonConfig {
        deflate_on_oom: true,
        free_page_reporting: true,
        stats_interval_s: 5,
    }
}

struct Harness {
    mem: &'static GuestMemoryMmap,
    mocks: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    next_desc: Vec<u16>,
    balloon: Balloon,
    discard: Arc<FakeDiscard>,
    interrupt: Arc<FakeInterrupt>,
    clock: Arc<FakeClock>,
    next_buf: u64,
}

impl Harness {
    fn new(config: BalloonConfig) -> Self {
        Self::with_features(config, u64::MAX)
    }

    fn with_features(config: BalloonConfig, features: u64) -> Self {
        // Leaked so that the mocks can borrow it for the whole test; an unbacked mapping.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("mem"),
        ));
        let discard = Arc::new(FakeDiscard::default());
        let interrupt = Arc::new(FakeInterrupt::new());
        let clock = Arc::new(FakeClock::new());
        let mut balloon = Balloon::new(config, discard.clone())
            .expect("balloon")
            .with_clock(clock.clone());
        balloon.set_acked_features(features);
        let n = balloon.queue_max_sizes().len();
        let mocks: Vec<_> = (0..n)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * (i as u64 + 1)), 256))
            .collect();
        let queues = mocks
            .iter()
            .map(|m| m.create_queue::<Queue>().expect("queue"))
            .collect();
        let queue_evts = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect();
        balloon
            .activate(Activation {
                mem: mem.clone(),
                queues,
                queue_evts,
                interrupt: interrupt.clone(),
            })
            .expect("activate");
        Harness {
            mem,
            next_desc: vec![0; n],
            mocks,
            balloon,
            discard,
            interrupt,
            clock,
            next_buf: 0x10_0000,
        }
    }

    /// A buffer in guest memory holding `bytes`.
    fn buffer(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.next_buf;
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write buffer");
        self.next_buf += (bytes.len() as u64).div_ceil(4096).max(1) * 4096;
        addr
    }

    fn pfn_buffer(&mut self, pfns: &[u32]) -> (u64, u32) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        (self.buffer(&bytes), bytes.len() as u32)
    }

    /// Makes one chain of `descs` (addr, len, flags) available on queue `q`.
    fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
        let first = self.next_desc[q];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i == descs.len() - 1;
                let flags = if last { flags } else { flags | F_NEXT };
                let next = if last { 0 } else { first + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mocks[q]
            .add_desc_chains(&raw, first)
            .expect("add chain");
        self.next_desc[q] = first + descs.len() as u16;
    }

    fn inflate(&mut self, pfns: &[u32]) {
        let (addr, len) = self.pfn_buffer(pfns);
        self.add_chain(0, &[(addr, len, 0)]);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mocks[q].used().idx().load()
    }

    fn metric(&self, name: &str) -> u64 {
        self.balloon
            .metrics()
            .values()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .expect("known metric")
    }
}

fn stat_bytes(stats: &[(u16, u64)]) -> Vec<u8> {
    stats
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

#[test]
fn inflate_discards_coalesced_ranges_before_returning_the_chain() {
    let mut h = Harness::new(BalloonConfig::default());
    let mut pfns: Vec<u32> = (0x1000..0x1010).rev().collect();
    pfns.extend([0x2001, 0x2000]);
    h.inflate(&pfns);
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    assert_eq!(
        h.discard.ranges(),
        vec![(0x100_0000, 16 * 4096), (0x200_0000, 2 * 4096)]
    );
    assert_eq!(h.used_idx(0), 1);
    assert_eq!(h.interrupt.raised(), vec![InterruptKind::Queue(0)]);
    assert_eq!(h.metric("inflated_pages_total"), 18);
    assert_eq!(h.metric("discard_calls_total"), 2);
}

#[test]
fn inflate_of_many_chains_in_one_notification_is_coalesced_across_chains() {
    let mut h = Harness::new(BalloonConfig::default());
    for chunk in 0..4u32 {
        let pfns: Vec<u32> = (0..256).map(|i| 0x1000 + chunk * 256 + i).collect();
        h.inflate(&pfns);
    }
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    assert_eq!(h.discard.ranges(), vec![(0x100_0000, 1024 * 4096)]);
    assert_eq!(h.used_idx(0), 4);
    assert_eq!(h.interrupt.count(InterruptKind::Queue(0)), 1);
}

#[test]
fn inflate_with_pfn_beyond_ram_is_counted_and_skipped() {
    let mut h = Harness::new(BalloonConfig::default());
    let beyond = (MEM_SIZE >> 12) as u32;
    h.inflate(&[0x1000, beyond, u32::MAX, 0x1001]);
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    assert_eq!(h.discard.ranges(), vec![(0x100_0000, 2 * 4096)]);
    assert_eq!(h.metric("bad_pfns_total"), 2);
    assert_eq!(h.metric("inflated_pages_total"), 2);
    assert_eq!(h.used_idx(0), 1, "the chain is still returned");
}

#[test]
fn inflate_descriptor_outside_memory_is_counted_and_the_device_keeps_working() {
    let mut h = Harness::new(BalloonConfig::default());
    h.add_chain(0, &[(MEM_SIZE - 2, 8, 0)]);
    h.add_chain(0, &[(1 << 40, 8, 0)]);
    h.inflate(&[0x1000]);
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    assert_eq!(h.metric("bad_descriptors_total"), 2);
    assert_eq!(h.discard.ranges(), vec![(0x100_0000, 4096)]);
    assert_eq!(h.used_idx(0), 3);
}

#[test]
fn inflate_write_only_descriptor_is_counted_and_skipped() {
    let mut h = Harness::new(BalloonConfig::default());
    let (addr, len) = h.pfn_buffer(&[0x1000]);
    h.add_chain(0, &[(addr, len, F_WRITE)]);
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    assert_eq!(h.metric("bad_descriptors_total"), 1);
    assert!(h.discard.ranges().is_empty());
    assert_eq!(h.used_idx(0), 1);
}

#[test]
fn inflate_descriptor_with_partial_pfn_is_counted_and_skipped() {
    let mut h = Harness::new(BalloonConfig::default());
    let (addr, _) = h.pfn_buffer(&[0x1000, 0x1001]);
    h.add_chain(0, &[(addr, 6, 0)]);
    h.add_chain(0, &[(addr, 0, 0)]);
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    assert_eq!(h.metric("bad_descriptors_total"), 2);
    assert!(h.discard.ranges().is_empty());
}

#[test]
fn inflate_chain_with_broken_next_index_is_counted_and_skipped() {
    let mut h = Harness::new(BalloonConfig::default());
    let (addr, len) = h.pfn_buffer(&[0x1000]);
    // NEXT points past the end of the 256-entry table.
    let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, F_NEXT, 999));
    h.mocks[0].add_desc_chains(&[raw], 0).expect("add");
    h.next_desc[0] = 1;
    h.inflate(&[0x2000]);
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    // The first descriptor is still read; the broken link ends the chain.
    assert_eq!(
        h.discard.ranges(),
        vec![(0x100_0000, 4096), (0x200_0000, 4096)]
    );
    assert_eq!(h.used_idx(0), 2);
}

#[test]
fn failed_discard_is_counted_not_hidden() {
    let mut h = Harness::new(BalloonConfig::default());
    h.discard.set_failing(true);
    h.inflate(&[0x1000, 0x3000]);
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    assert_eq!(h.metric("discard_failures_total"), 2);
    assert_eq!(h.used_idx(0), 1);
}

#[test]
fn deflate_counts_pages_and_discards_nothing() {
    let mut h = Harness::new(BalloonConfig::default());
    let (addr, len) = h.pfn_buffer(&[0x1000, 0x1001, 0x9_0000]);
    h.add_chain(1, &[(addr, len, 0)]);
    h.balloon
        .handle_page_queue(QueueRole::Deflate)
        .expect("deflate");
    assert!(h.discard.ranges().is_empty());
    assert_eq!(h.metric("deflated_pages_total"), 2);
    assert_eq!(h.metric("bad_pfns_total"), 1);
    assert_eq!(h.used_idx(1), 1);
    assert_eq!(h.interrupt.raised(), vec![InterruptKind::Queue(1)]);
}

#[test]
fn stats_buffer_is_recorded_and_held_until_the_next_request() {
    let mut h = Harness::new(all_features());
    let bytes = stat_bytes(&[(4, 100 << 20), (6, 80 << 20), (10, 3), (15, 4096), (99, 7)]);
    let addr = h.buffer(&bytes);
    h.add_chain(2, &[(addr, bytes.len() as u32, 0)]);
    h.balloon.handle_stats_queue().expect("stats");
    let (stats, age) = h.balloon.latest_stats().expect("stats recorded");
    assert_eq!(stats.free_memory_bytes, Some(100 << 20));
    assert_eq!(stats.available_memory_bytes, Some(80 << 20));
    assert_eq!(stats.oom_kills, Some(3));
    assert_eq!(stats.direct_reclaim_bytes, Some(4096));
    assert_eq!(stats.unknown.get(&99), Some(&7));
    assert_eq!(
        age,
        Duration::ZERO,
        "no time has passed on the test's clock"
    );
    assert_eq!(h.used_idx(2), 0, "the buffer is held");
    assert_eq!(h.metric("stats_updates_total"), 1);

    h.balloon.request_stats().expect("request");
    assert_eq!(
        h.used_idx(2),
        1,
        "giving the buffer back asks for fresh stats"
    );
    assert_eq!(h.interrupt.raised(), vec![InterruptKind::Queue(2)]);
}

#[test]
fn guest_that_never_answers_stats_is_counted_and_nothing_breaks() {
    let mut h = Harness::new(all_features());
    let bytes = stat_bytes(&[(4, 1)]);
    let addr = h.buffer(&bytes);
    h.add_chain(2, &[(addr, bytes.len() as u32, 0)]);
    h.balloon.handle_stats_queue().expect("stats");
    h.balloon.request_stats().expect("first request");
    h.balloon.request_stats().expect("second request");
    h.balloon.request_stats().expect("third request");
    assert_eq!(h.metric("stats_requests_missed_total"), 2);
    assert_eq!(h.used_idx(2), 1, "nothing returned twice");
    h.clock.advance(Duration::from_secs(20));
    let (_, age) = h.balloon.latest_stats().expect("old stats are kept");
    assert_eq!(age, Duration::from_secs(20), "the age says they are stale");
    // The inflate queue still works.
    h.inflate(&[0x1000]);
    h.balloon
        .handle_page_queue(QueueRole::Inflate)
        .expect("inflate");
    assert_eq!(h.used_idx(0), 1);
}

#[test]
fn stats_buffer_with_partial_entry_is_counted_and_still_held() {
    let mut h = Harness::new(all_features());
    let addr = h.buffer(&[1, 2, 3]);
    h.add_chain(2, &[(addr, 3, 0)]);
    h.balloon.handle_stats_queue().expect("stats");
    assert!(h.balloon.latest_stats().is_none());
    assert_eq!(h.metric("bad_descriptors_total"), 1);
    h.balloon.request_stats().expect("request");
    assert_eq!(h.used_idx(2), 1);
}

#[test]
fn second_stats_buffer_returns_the_first() {
    let mut h = Harness::new(all_features());
    let bytes = stat_bytes(&[(4, 1)]);
    let addr = h.buffer(&bytes);
    h.add_chain(2, &[(addr, bytes.len() as u32, 0)]);
    h.add_chain(2, &[(addr, bytes.len() as u32, 0)]);
    h.balloon.handle_stats_queue().expect("stats");
    assert_eq!(h.used_idx(2), 1);
    assert_eq!(h.metric("stats_updates_total"), 2);
}

#[test]
fn free_page_reporting_discards_reported_ranges_coalesced() {
    let mut h = Harness::new(all_features());
    h.add_chain(
        3,
        &[
            (0x200_0000, 2 << 20, F_WRITE),
            (0x220_0000, 2 << 20, F_WRITE),
            (0x300_0000, 4096, F_WRITE),
        ],
    );
    h.balloon.handle_reporting_queue().expect("report");
    assert_eq!(
        h.discard.ranges(),
        vec![(0x200_0000, 4 << 20), (0x300_0000, 4096)]
    );
    assert_eq!(h.metric("reported_pages_total"), 1025);
    assert_eq!(h.used_idx(3), 1);
    assert_eq!(h.interrupt.raised(), vec![InterruptKind::Queue(3)]);
}

#[test]
fn reported_range_that_is_read_only_unaligned_or_outside_memory_is_skipped() {
    let mut h = Harness::new(all_features());
    h.add_chain(
        3,
        &[
            (0x200_0000, 4096, 0),
            (0x200_0800, 4096, F_WRITE),
            (MEM_SIZE - 4096, 8192, F_WRITE),
            (0x300_0000, 4096, F_WRITE),
        ],
    );
    h.balloon.handle_reporting_queue().expect("report");
    assert_eq!(h.metric("bad_descriptors_total"), 3);
    assert_eq!(h.discard.ranges(), vec![(0x300_0000, 4096)]);
    assert_eq!(h.used_idx(3), 1);
}

#[test]
fn reporting_queue_follows_inflate_and_deflate_when_stats_are_not_acked() {
    let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_FREE_PAGE_REPORTING;
    let mut h = Harness::with_features(all_features(), features);
    h.add_chain(2, &[(0x200_0000, 4096, F_WRITE)]);
    h.balloon.handle_reporting_queue().expect("report");
    assert_eq!(h.discard.ranges(), vec![(0x200_0000, 4096)]);
    assert_eq!(h.interrupt.raised(), vec![InterruptKind::Queue(2)]);
    h.balloon
        .handle_stats_queue()
        .expect("no stats queue: nothing to do");
}

#[test]
fn set_target_updates_config_and_raises_a_config_interrupt() {
    let mut h = Harness::new(BalloonConfig::default());
    h.balloon.set_target_mib(64).expect("target");
    let mut b = [0u8; 4];
    h.balloon.read_config(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 64 * 256);
    assert_eq!(h.balloon.target_mib(), 64);
    assert_eq!(h.interrupt.raised(), vec![InterruptKind::Config]);
    assert_ne!(h.balloon.config_generation(), 0);
}

#[test]
fn set_target_before_activation_raises_no_interrupt() {
    let mut b =
        Balloon::new(BalloonConfig::default(), Arc::new(FakeDiscard::default())).expect("balloon");
    b.set_target_mib(1).expect("target");
    assert_eq!(b.target_mib(), 1);
}

#[test]
fn target_that_overflows_the_page_count_is_refused() {
    let mut h = Harness::new(BalloonConfig::default());
    assert!(matches!(
        h.balloon.set_target_mib(16 << 20),
        Err(BalloonError::TargetTooLarge { .. })
    ));
    assert_eq!(h.balloon.target_mib(), 0);
}

#[test]
fn actual_written_by_the_guest_is_reported_in_mib() {
    let mut h = Harness::new(BalloonConfig::default());
    h.balloon.write_config(4, &(64u32 * 256 + 10).to_le_bytes());
    h.balloon.write_config(0, &[0xff; 4]);
    assert_eq!(h.balloon.actual_mib(), 64);
    assert_eq!(h.balloon.target_mib(), 0, "num_pages is read-only");
}

#[test]
fn features_and_queues_follow_the_config() {
    let d = Arc::new(FakeDiscard::default());
    let plain = Balloon::new(BalloonConfig::default(), d.clone()).expect("balloon");
    assert_eq!(
        plain.avail_features(),
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST
    );
    assert_eq!(plain.queue_max_sizes(), &[256, 256]);
    let full = Balloon::new(all_features(), d).expect("balloon");
    assert_eq!(
        full.avail_features(),
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST
            | 1 << VIRTIO_BALLOON_F_STATS_VQ
            | 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
            | 1 << VIRTIO_BALLOON_F_FREE_PAGE_REPORTING
    );
    assert_eq!(full.queue_max_sizes().len(), 4);
}

#[test]
fn activation_with_a_needed_queue_not_ready_is_refused() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
    let mut b =
        Balloon::new(BalloonConfig::default(), Arc::new(FakeDiscard::default())).expect("balloon");
    b.set_acked_features(u64::MAX);
    let queues = vec![
        Queue::new(256).expect("queue"),
        Queue::new(256).expect("queue"),
    ];
    let queue_evts = (0..2)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
        .collect();
    let result = b.activate(Activation {
        mem,
        queues,
        queue_evts,
        interrupt: Arc::new(FakeInterrupt::new()),
    });
    assert!(result.is_err());
    assert!(!b.is_activated());
}

#[test]
fn config_rejects_unknown_fields_and_defaults_the_rest() {
    let c: BalloonConfig = serde_json::from_str(r#"{"stats_interval_s": 2}"#).expect("parse");
    assert_eq!(
        c,
        BalloonConfig {
            stats_interval_s: 2,
            ..BalloonConfig::default()
        }
    );
    assert!(serde_json::from_str::<BalloonConfig>(r#"{"deflate_on_oom": true, "x": 1}"#).is_err());
}

devices::virtio_device_conformance_tests!(Balloon::new(
    all_features(),
    Arc::new(FakeDiscard::default())
)
.expect("balloon"));

mod plain_config {
    use super::*;
    devices::virtio_device_conformance_tests!(Balloon::new(
        BalloonConfig::default(),
        Arc::new(FakeDiscard::default())
    )
    .expect("balloon"));
}

mod event_loop {
    use super::*;
    use devices::virtio::conformance::GuestDriver;
    use devices::virtio::mmio::{reg, INT_VRING};
    use devices::virtio::{status, MmioTransport};
    use event_manager::{EventManager, SubscriberOps};

    struct Setup {
        mem: GuestMemoryMmap,
        discard: Arc<FakeDiscard>,
        em: EventManager<Arc<Mutex<Balloon>>>,
        transport: MmioTransport,
    }

    fn setup(config: BalloonConfig) -> Setup {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
        let discard = Arc::new(FakeDiscard::default());
        let balloon = Arc::new(Mutex::new(
            Balloon::new(config, discard.clone()).expect("balloon"),
        ));
        let mut em = EventManager::new().expect("event manager");
        em.add_subscriber(balloon.clone());
        let device: Arc<Mutex<dyn VirtioDevice>> = balloon;
        let transport = MmioTransport::new(mem.clone(), device).expect("transport");
        Setup {
            mem,
            discard,
            em,
            transport,
        }
    }

    fn driver_init(g: &mut GuestDriver<'_>, mocks: &[&MockSplitQueue<'_, GuestMemoryMmap>]) -> u32 {
        let features = g.device_features();
        assert!(g.negotiate(features));
        for (i, m) in mocks.iter().enumerate() {
            g.setup_queue(
                i as u32,
                256,
                m.desc_table_addr().0,
                m.avail_addr().0,
                m.used_addr().0,
            );
        }
        g.driver_ok()
    }

    #[test]
    fn queue_eventfds_are_added_at_activation_and_removed_at_reset() {
        let mut s = setup(BalloonConfig::default());
        let mem = s.mem.clone();
        let m0 = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 256);
        let m1 = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 256);
        let mut g = GuestDriver(&mut s.transport);
        assert_ne!(driver_init(&mut g, &[&m0, &m1]) & status::DRIVER_OK, 0);
        assert_eq!(
            s.em.run_with_timeout(100).expect("loop"),
            1,
            "activate event"
        );

        let pfns: Vec<u8> = [0x100u32, 0x101]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        mem.write_slice(&pfns, GuestAddress(0x10_0000))
            .expect("write");
        let desc = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 8, 0, 0));
        m0.add_desc_chains(&[desc], 0).expect("chain");
        g.write(reg::QUEUE_NOTIFY, 0);
        assert_eq!(s.em.run_with_timeout(100).expect("loop"), 1, "queue event");
        assert_eq!(s.discard.ranges(), vec![(0x10_0000, 8192)]);
        assert_eq!(m0.used().idx().load(), 1);
        assert_ne!(g.read(reg::INTERRUPT_STATUS) & INT_VRING, 0);

        g.reset();
        assert_eq!(s.em.run_with_timeout(100).expect("loop"), 1, "reset event");
        g.0.queue_evts()[0].write(1).expect("notify");
        assert_eq!(
            s.em.run_with_timeout(50).expect("loop"),
            0,
            "old queue eventfds are gone from the loop"
        );

        // A fresh initialisation registers the queues again.
        let m0 = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 256);
        let m1 = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 256);
        let mut g = GuestDriver(&mut s.transport);
        assert_ne!(driver_init(&mut g, &[&m0, &m1]) & status::DRIVER_OK, 0);
        m0.add_desc_chains(&[desc], 0).expect("chain");
        // The notify written while reset is still pending on the eventfd.
        let handled =
            s.em.run_with_timeout(100).expect("loop") + s.em.run_with_timeout(100).expect("loop");
        assert_eq!(handled, 2, "activate, then the pending queue event");
        assert_eq!(m0.used().idx().load(), 1);
    }

    #[test]
    fn stats_timer_gives_the_buffer_back_each_interval() {
        let mut s = setup(BalloonConfig {
            stats_interval_s: 1,
            ..BalloonConfig::default()
        });
        let mem = s.mem.clone();
        let mocks: Vec<_> = (0..3)
            .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x1_0000 * (i + 1)), 256))
            .collect();
        let mut g = GuestDriver(&mut s.transport);
        let refs: Vec<_> = mocks.iter().collect();
        assert_ne!(driver_init(&mut g, &refs) & status::DRIVER_OK, 0);
        s.em.run_with_timeout(100).expect("loop");
        let bytes = stat_bytes(&[(4, 1 << 20)]);
        mem.write_slice(&bytes, GuestAddress(0x10_0000))
            .expect("write");
        let desc = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 10, 0, 0));
        mocks[2].add_desc_chains(&[desc], 0).expect("chain");
        g.write(reg::QUEUE_NOTIFY, 2);
        s.em.run_with_timeout(100).expect("loop");
        assert_eq!(mocks[2].used().idx().load(), 0, "held");
        s.em.run_with_timeout(1500).expect("loop");
        assert_eq!(mocks[2].used().idx().load(), 1, "returned by the timer");
    }
}
