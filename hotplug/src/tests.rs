//! Device tests: the guest's side of the queue is played with virtio-queue's mock; memslots and
//! discards go to fakes that record what they were asked.

use std::io;
use std::sync::{Arc, Mutex};

use devices::virtio::fake::FakeInterrupt;
use devices::virtio::{Activation, InterruptKind, VirtioDevice, VIRTIO_F_VERSION_1};
use memory::test_utils::FakeDiscard;
use memory::{GuestRam, RamRange};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::*;
use crate::wire::*;

const MIB: u64 = 1 << 20;
const REGION: u64 = 4 << 30;
const REGION_SIZE: u64 = 512 * MIB;
const BLOCK: u64 = 2 * MIB;
const SLOT: u64 = 128 * MIB;
const MEM_SIZE: u64 = 16 * MIB;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotOp {
    Add,
    Remove,
}

#[derive(Debug, Default)]
struct FakeMemslotsState {
    calls: Vec<(SlotOp, Memslot)>,
    present: Vec<u32>,
    fail_add: bool,
    fail_remove: bool,
}

/// Records memslot calls and which slots are mapped; can be told to fail.
#[derive(Clone, Debug, Default)]
struct FakeMemslots(Arc<Mutex<FakeMemslotsState>>);

impl FakeMemslots {
    fn state(&self) -> std::sync::MutexGuard<'_, FakeMemslotsState> {
        self.0.lock().expect("fake memslots lock")
    }
    fn present(&self) -> Vec<u32> {
        let mut p = self.state().present.clone();
        p.sort_unstable();
        p
    }
    fn calls(&self) -> Vec<(SlotOp, u32)> {
        self.state()
            .calls
            .iter()
            .map(|(op, s)| (*op, s.index))
            .collect()
    }
}

impl MemslotControl for FakeMemslots {
    fn add(&mut self, slot: &Memslot) -> io::Result<()> {
        let mut s = self.state();
        if s.fail_add {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        assert!(
            !s.present.contains(&slot.index),
            "slot {} added twice",
            slot.index
        );
        s.calls.push((SlotOp::Add, *slot));
        s.present.push(slot.index);
        Ok(())
    }
    fn remove(&mut self, slot: &Memslot) -> io::Result<()> {
        let mut s = self.state();
        if s.fail_remove {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let at = s.present.iter().position(|i| *i == slot.index);
        let at = at.unwrap_or_else(|| panic!("slot {} removed but not present", slot.index));
        s.present.remove(at);
        s.calls.push((SlotOp::Remove, *slot));
        Ok(())
    }
}

fn config() -> VirtioMemConfig {
    VirtioMemConfig {
        region_addr: Some(REGION),
        ..VirtioMemConfig::new(REGION_SIZE)
    }
}

/// The memory of the region `c` describes, mapped as the VMM maps it.
fn region_of(c: &VirtioMemConfig) -> GuestRam {
    let addr = c.region_addr.expect("placed");
    GuestRam::new(&[RamRange::new(addr, c.region_size.bytes())]).expect("region memory")
}

fn device(memslots: FakeMemslots) -> VirtioMem {
    VirtioMem::new(config(), region_of(&config()), Box::new(memslots)).expect("device")
}

struct Harness {
    mem: &'static GuestMemoryMmap,
    mock: MockSplitQueue<'static, GuestMemoryMmap>,
    next_desc: u16,
    next_buf: u64,
    dev: VirtioMem,
    memslots: FakeMemslots,
    discard: Arc<FakeDiscard>,
    interrupt: Arc<FakeInterrupt>,
}

impl Harness {
    fn new() -> Self {
        Self::with_features(u64::MAX)
    }

    fn with_features(features: u64) -> Self {
        // Leaked so that the mock can borrow it for the whole test; an unbacked mapping.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("mem"),
        ));
        let memslots = FakeMemslots::default();
        let discard = Arc::new(FakeDiscard::default());
        let interrupt = Arc::new(FakeInterrupt::new());
        let mut dev = device(memslots.clone()).with_discard(discard.clone());
        dev.set_acked_features(features);
        let mock = MockSplitQueue::create(mem, GuestAddress(0x1_0000), QUEUE_SIZE);
        dev.activate(Activation {
            mem: mem.clone(),
            queues: vec![mock.create_queue::<Queue>().expect("queue")],
            queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")],
            interrupt: interrupt.clone(),
        })
        .expect("activate");
        Harness {
            mem,
            mock,
            next_desc: 0,
            next_buf: 0x10_0000,
            dev,
            memslots,
            discard,
            interrupt,
        }
    }

    fn buffer(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.next_buf;
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write buffer");
        self.next_buf += 0x1000;
        addr
    }

    /// Makes one chain of `descs` (addr, len, flags) available.
    fn add_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let first = self.next_desc;
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
        self.mock.add_desc_chains(&raw, first).expect("add chain");
        self.next_desc = first + descs.len() as u16;
    }

    fn used_idx(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// The used length of the latest used element.
    fn last_used_len(&self) -> u32 {
        let idx = self.used_idx();
        assert!(idx > 0, "nothing used");
        let slot = (idx - 1) % QUEUE_SIZE;
        self.mock
            .used()
            .ring()
            .ref_at(slot as usize)
            .expect("used elem")
            .load()
            .len()
    }

    /// Sends one well-formed request and returns the response (type, state).
    fn send(&mut self, request: Request) -> (u16, u16) {
        let req = self.buffer(&encode_request(request));
        let resp = self.buffer(&[0xee; RESPONSE_SIZE]);
        self.add_chain(&[
            (req, REQUEST_SIZE as u32, 0),
            (resp, RESPONSE_SIZE as u32, F_WRITE),
        ]);
        let before = self.used_idx();
        self.dev.handle_queue().expect("handle queue");
        assert_eq!(self.used_idx(), before + 1, "the chain is returned");
        assert_eq!(self.last_used_len(), RESPONSE_SIZE as u32);
        self.read_response(resp)
    }

    fn read_response(&self, addr: u64) -> (u16, u16) {
        let mut b = [0u8; RESPONSE_SIZE];
        self.mem
            .read_slice(&mut b, GuestAddress(addr))
            .expect("read response");
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[8], b[9]]),
        )
    }

    fn plug(&mut self, addr: u64, nb_blocks: u16) -> u16 {
        self.send(Request::Plug { addr, nb_blocks }).0
    }

    fn unplug(&mut self, addr: u64, nb_blocks: u16) -> u16 {
        self.send(Request::Unplug { addr, nb_blocks }).0
    }

    fn state(&mut self, addr: u64, nb_blocks: u16) -> (u16, u16) {
        self.send(Request::State { addr, nb_blocks })
    }

    fn metric(&self, name: &str) -> u64 {
        self.dev
            .metrics()
            .values()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .expect("known metric")
    }

    fn request(&mut self, bytes: u64) {
        self.dev.set_requested_size(bytes).expect("requested size");
    }
}

fn block(i: u64) -> u64 {
    REGION + i * BLOCK
}

// --- PLUG ---

#[test]
fn plug_is_acked_maps_the_slot_and_updates_plugged_size() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(1), 2), RESP_ACK);
    assert_eq!(h.dev.plugged_size(), 4 * MIB);
    assert_eq!(h.dev.config_space().plugged_size, 4 * MIB);
    let calls = h.memslots.state().calls.clone();
    assert_eq!(calls.len(), 1);
    let (op, slot) = calls[0];
    assert_eq!(op, SlotOp::Add);
    assert_eq!(slot.index, 0);
    assert_eq!(slot.guest_addr, REGION);
    assert_eq!(slot.size, SLOT);
    assert_eq!(
        slot.host_addr,
        h.dev.ram().host_ranges()[0].1 as u64,
        "the slot is backed by the device's own mapping"
    );
    assert!(h.discard.ranges().is_empty());
    assert_eq!(
        h.interrupt.raised(),
        vec![InterruptKind::Config, InterruptKind::Queue(0)]
    );
    assert_eq!(h.metric("plugs_total"), 1);
    assert_eq!(h.metric("plugged_bytes_total"), 4 * MIB);
}

#[test]
fn plug_beyond_requested_size_is_nacked() {
    let mut h = Harness::new();
    h.request(4 * MIB);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    assert_eq!(h.plug(block(1), 2), RESP_NACK);
    assert_eq!(
        h.plug(block(1), 1),
        RESP_ACK,
        "up to the requested size is fine"
    );
    assert_eq!(h.plug(block(2), 1), RESP_NACK);
    assert_eq!(h.dev.plugged_size(), 4 * MIB);
    assert_eq!(h.metric("nacks_total"), 2);
    assert_eq!(h.metric("errors_total"), 0);
}

#[test]
fn plug_with_nothing_requested_is_nacked() {
    let mut h = Harness::new();
    assert_eq!(h.plug(block(0), 1), RESP_NACK);
    assert!(h.memslots.calls().is_empty());
}

#[test]
fn plug_of_unaligned_address_is_an_error() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(1) + 4096, 1), RESP_ERROR);
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.metric("errors_total"), 1);
}

#[test]
fn plug_of_zero_blocks_is_an_error() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 0), RESP_ERROR);
}

#[test]
fn plug_outside_the_region_is_an_error() {
    let mut h = Harness::new();
    h.request(REGION_SIZE);
    assert_eq!(h.plug(REGION - BLOCK, 1), RESP_ERROR, "below the region");
    assert_eq!(h.plug(REGION + REGION_SIZE, 1), RESP_ERROR, "above it");
    assert_eq!(
        h.plug(REGION + REGION_SIZE - BLOCK, 2),
        RESP_ERROR,
        "straddling its end"
    );
    assert_eq!(h.plug(0, 1), RESP_ERROR, "in boot RAM");
    assert_eq!(h.plug(u64::MAX - BLOCK + 1, 2), RESP_ERROR, "wrapping");
    assert_eq!(h.dev.plugged_size(), 0);
    assert!(h.memslots.calls().is_empty());
    assert_eq!(h.metric("errors_total"), 5);
}

#[test]
fn plug_of_an_already_plugged_block_is_an_error() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(2), 1), RESP_ACK);
    assert_eq!(h.plug(block(2), 1), RESP_ERROR);
    assert_eq!(h.plug(block(0), 3), RESP_ERROR, "partly plugged");
    assert_eq!(h.dev.plugged_size(), 2 * MIB);
}

#[test]
fn plug_of_a_plugged_block_beyond_requested_size_is_an_error_not_a_nack() {
    let mut h = Harness::new();
    h.request(2 * MIB);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    assert_eq!(h.plug(block(0), 1), RESP_ERROR);
}

#[test]
fn plug_across_a_slot_boundary_adds_both_slots() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    let last_of_slot_0 = SLOT / BLOCK - 1;
    assert_eq!(h.plug(block(last_of_slot_0), 2), RESP_ACK);
    assert_eq!(h.memslots.present(), vec![0, 1]);
    assert_eq!(h.plug(block(last_of_slot_0 + 2), 1), RESP_ACK);
    assert_eq!(h.memslots.calls().len(), 2, "slot 1 is already mapped");
    assert_eq!(h.unplug(block(last_of_slot_0), 1), RESP_ACK);
    assert_eq!(h.memslots.present(), vec![1], "slot 0 had no other block");
    assert_eq!(h.unplug(block(last_of_slot_0 + 1), 1), RESP_ACK);
    assert_eq!(h.memslots.present(), vec![1], "slot 1 still has a block");
    assert_eq!(h.unplug(block(last_of_slot_0 + 2), 1), RESP_ACK);
    assert!(h.memslots.present().is_empty());
    assert_eq!(h.metric("memslot_adds_total"), 2);
    assert_eq!(h.metric("memslot_removes_total"), 2);
}

#[test]
fn last_slot_of_a_region_not_a_multiple_of_the_slot_size_is_shorter() {
    let memslots = FakeMemslots::default();
    let cfg = VirtioMemConfig {
        region_addr: Some(REGION),
        ..VirtioMemConfig::new(SLOT + 8 * MIB)
    };
    let mut h = Harness::new();
    h.dev = VirtioMem::new(cfg, region_of(&cfg), Box::new(memslots.clone()))
        .expect("device")
        .with_discard(h.discard.clone());
    h.dev.set_acked_features(u64::MAX);
    h.dev
        .activate(Activation {
            mem: h.mem.clone(),
            queues: vec![h.mock.create_queue::<Queue>().expect("queue")],
            queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")],
            interrupt: h.interrupt.clone(),
        })
        .expect("activate");
    h.request(SLOT + 8 * MIB);
    assert_eq!(h.plug(REGION + SLOT + 6 * MIB, 1), RESP_ACK);
    let slot = memslots.state().calls[0].1;
    assert_eq!(
        (slot.index, slot.guest_addr, slot.size),
        (1, REGION + SLOT, 8 * MIB)
    );
}

// --- UNPLUG ---

#[test]
fn unplug_discards_the_blocks_and_removes_the_emptied_slot() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 4), RESP_ACK);
    assert_eq!(h.unplug(block(1), 2), RESP_ACK);
    assert_eq!(h.discard.ranges(), vec![(block(1), 4 * MIB)]);
    assert_eq!(h.memslots.present(), vec![0], "blocks 0 and 3 keep slot 0");
    assert_eq!(h.dev.plugged_size(), 4 * MIB);
    assert_eq!(h.unplug(block(0), 1), RESP_ACK);
    assert_eq!(h.unplug(block(3), 1), RESP_ACK);
    assert!(h.memslots.present().is_empty());
    assert_eq!(
        h.memslots.calls(),
        vec![(SlotOp::Add, 0), (SlotOp::Remove, 0)]
    );
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.metric("unplugs_total"), 3);
    assert_eq!(h.metric("unplugged_bytes_total"), 8 * MIB);
}

#[test]
fn unplug_of_an_unplugged_block_is_an_error() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.unplug(block(0), 1), RESP_ERROR);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    assert_eq!(h.unplug(block(0), 2), RESP_ERROR, "partly unplugged");
    assert_eq!(h.dev.plugged_size(), 2 * MIB);
    assert!(h.discard.ranges().is_empty(), "nothing discarded");
    assert_eq!(h.metric("errors_total"), 2);
}

#[test]
fn unplug_of_unaligned_or_outside_range_is_an_error() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    assert_eq!(h.unplug(block(0) + 4096, 1), RESP_ERROR);
    assert_eq!(h.unplug(block(0), 0), RESP_ERROR);
    assert_eq!(h.unplug(REGION - BLOCK, 2), RESP_ERROR);
    assert_eq!(h.dev.plugged_size(), 2 * MIB);
}

#[test]
fn unplug_is_allowed_above_the_requested_size_and_below_it() {
    let mut h = Harness::new();
    h.request(4 * MIB);
    assert_eq!(h.plug(block(0), 2), RESP_ACK);
    h.request(64 * MIB);
    assert_eq!(h.unplug(block(0), 1), RESP_ACK, "below the requested size");
    h.request(0);
    assert_eq!(h.unplug(block(1), 1), RESP_ACK);
}

// --- UNPLUG_ALL ---

#[test]
fn unplug_all_discards_every_run_and_removes_every_slot() {
    let mut h = Harness::new();
    h.request(REGION_SIZE);
    assert_eq!(h.plug(block(0), 2), RESP_ACK);
    assert_eq!(h.plug(block(5), 1), RESP_ACK);
    assert_eq!(h.plug(block(200), 3), RESP_ACK);
    assert_eq!(h.memslots.present(), vec![0, 3]);
    assert_eq!(h.send(Request::UnplugAll).0, RESP_ACK);
    assert_eq!(
        h.discard.ranges(),
        vec![
            (block(0), 4 * MIB),
            (block(5), 2 * MIB),
            (block(200), 6 * MIB)
        ]
    );
    assert!(h.memslots.present().is_empty());
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.state(REGION, 256).1, STATE_UNPLUGGED);
    assert_eq!(h.metric("unplug_alls_total"), 1);
    assert_eq!(h.metric("unplugged_bytes_total"), 12 * MIB);
}

#[test]
fn unplug_all_with_nothing_plugged_is_acked() {
    let mut h = Harness::new();
    assert_eq!(h.send(Request::UnplugAll).0, RESP_ACK);
    assert!(h.discard.ranges().is_empty());
    assert!(h.memslots.calls().is_empty());
}

// --- STATE ---

#[test]
fn state_reports_plugged_unplugged_and_mixed() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(2), 2), RESP_ACK);
    assert_eq!(h.state(block(2), 2), (RESP_ACK, STATE_PLUGGED));
    assert_eq!(h.state(block(0), 2), (RESP_ACK, STATE_UNPLUGGED));
    assert_eq!(h.state(block(1), 2), (RESP_ACK, STATE_MIXED));
    assert_eq!(
        h.state(REGION, (REGION_SIZE / BLOCK) as u16),
        (RESP_ACK, STATE_MIXED)
    );
    assert_eq!(h.metric("state_requests_total"), 4);
}

#[test]
fn state_of_a_bad_range_is_an_error() {
    let mut h = Harness::new();
    assert_eq!(h.state(block(0) + 512, 1).0, RESP_ERROR);
    assert_eq!(h.state(block(0), 0).0, RESP_ERROR);
    assert_eq!(h.state(REGION + REGION_SIZE - BLOCK, 2).0, RESP_ERROR);
}

// --- Malformed requests and chains ---

#[test]
fn unknown_request_type_is_an_error() {
    let mut h = Harness::new();
    let mut bytes = encode_request(Request::UnplugAll);
    bytes[0] = 7;
    let req = h.buffer(&bytes);
    let resp = h.buffer(&[0xee; RESPONSE_SIZE]);
    h.add_chain(&[(req, 24, 0), (resp, 10, F_WRITE)]);
    h.dev.handle_queue().expect("handle");
    assert_eq!(h.read_response(resp).0, RESP_ERROR);
    assert_eq!(h.metric("errors_total"), 1);
}

#[test]
fn request_and_response_split_across_descriptors_are_handled() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    let bytes = encode_request(Request::Plug {
        addr: block(3),
        nb_blocks: 1,
    });
    let a = h.buffer(&bytes[..8]);
    let b = h.buffer(&bytes[8..]);
    let r1 = h.buffer(&[0xee; 4]);
    let r2 = h.buffer(&[0xee; 6]);
    h.add_chain(&[(a, 8, 0), (b, 16, 0), (r1, 4, F_WRITE), (r2, 6, F_WRITE)]);
    h.dev.handle_queue().expect("handle");
    assert_eq!(h.last_used_len(), 10);
    assert_eq!(h.read_response(r1).0, RESP_ACK);
    assert_eq!(h.dev.plugged_size(), 2 * MIB);
}

/// Sends a malformed chain, checks it is returned empty and counted, and that the device then
/// still answers a good request.
fn malformed_chain_is_counted_and_device_keeps_working(descs: &[(u64, u32, u16)]) {
    let mut h = Harness::new();
    h.request(64 * MIB);
    h.add_chain(descs);
    h.dev
        .handle_queue()
        .expect("a bad chain is not a device error");
    assert_eq!(h.used_idx(), 1, "the chain is given back");
    assert_eq!(h.last_used_len(), 0, "nothing written");
    assert_eq!(h.metric("bad_descriptors_total"), 1);
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
}

#[test]
fn request_shorter_than_24_bytes_is_counted_and_skipped() {
    malformed_chain_is_counted_and_device_keeps_working(&[
        (0x20_0000, 16, 0),
        (0x20_1000, 10, F_WRITE),
    ]);
}

#[test]
fn chain_without_room_for_the_response_is_counted_and_skipped() {
    malformed_chain_is_counted_and_device_keeps_working(&[
        (0x20_0000, 24, 0),
        (0x20_1000, 4, F_WRITE),
    ]);
}

#[test]
fn chain_with_only_a_response_buffer_is_counted_and_skipped() {
    malformed_chain_is_counted_and_device_keeps_working(&[(0x20_1000, 10, F_WRITE)]);
}

#[test]
fn readable_descriptor_after_a_writable_one_is_counted_and_skipped() {
    malformed_chain_is_counted_and_device_keeps_working(&[
        (0x20_1000, 10, F_WRITE),
        (0x20_0000, 24, 0),
    ]);
}

#[test]
fn descriptor_outside_guest_memory_is_counted_and_skipped() {
    malformed_chain_is_counted_and_device_keeps_working(&[
        (MEM_SIZE - 8, 24, 0),
        (0x20_1000, 10, F_WRITE),
    ]);
    malformed_chain_is_counted_and_device_keeps_working(&[
        (0x20_0000, 24, 0),
        (REGION, 10, F_WRITE),
    ]);
}

// --- Host failures: BUSY, nothing changed ---

#[test]
fn memslot_add_failure_answers_busy_and_changes_nothing() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    h.memslots.state().fail_add = true;
    assert_eq!(h.plug(block(0), 1), RESP_BUSY);
    assert_eq!(h.dev.plugged_size(), 0);
    assert!(h.memslots.present().is_empty());
    assert_eq!(h.metric("busy_total"), 1);
    assert_eq!(h.metric("memslot_failures_total"), 1);
    h.memslots.state().fail_add = false;
    assert_eq!(h.plug(block(0), 1), RESP_ACK, "the guest's retry works");
}

#[test]
fn memslot_add_failure_on_the_second_slot_removes_the_first_again() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    struct FailSecond(FakeMemslots, usize);
    impl MemslotControl for FailSecond {
        fn add(&mut self, slot: &Memslot) -> io::Result<()> {
            self.1 += 1;
            if self.1 == 2 {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
            self.0.add(slot)
        }
        fn remove(&mut self, slot: &Memslot) -> io::Result<()> {
            self.0.remove(slot)
        }
    }
    let fake = FakeMemslots::default();
    h.dev = VirtioMem::new(
        config(),
        region_of(&config()),
        Box::new(FailSecond(fake.clone(), 0)),
    )
    .expect("device")
    .with_discard(h.discard.clone());
    h.dev.set_acked_features(u64::MAX);
    h.dev
        .activate(Activation {
            mem: h.mem.clone(),
            queues: vec![h.mock.create_queue::<Queue>().expect("queue")],
            queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")],
            interrupt: h.interrupt.clone(),
        })
        .expect("activate");
    h.request(64 * MIB);
    assert_eq!(h.plug(block(SLOT / BLOCK - 1), 2), RESP_BUSY);
    assert!(fake.present().is_empty(), "slot 0 was removed again");
    assert_eq!(h.dev.plugged_size(), 0);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    assert_eq!(fake.present(), vec![0]);
}

#[test]
fn memslot_remove_failure_answers_busy_and_keeps_the_blocks_plugged() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    h.memslots.state().fail_remove = true;
    assert_eq!(h.unplug(block(0), 1), RESP_BUSY);
    assert_eq!(h.dev.plugged_size(), 2 * MIB);
    assert_eq!(h.memslots.present(), vec![0]);
    assert_eq!(h.state(block(0), 1).1, STATE_PLUGGED);
    h.memslots.state().fail_remove = false;
    assert_eq!(h.unplug(block(0), 1), RESP_ACK);
}

#[test]
fn discard_failure_answers_busy_and_keeps_the_blocks_plugged() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 2), RESP_ACK);
    h.discard.set_failing(true);
    assert_eq!(h.unplug(block(0), 1), RESP_BUSY);
    assert_eq!(h.send(Request::UnplugAll).0, RESP_BUSY);
    assert_eq!(h.dev.plugged_size(), 4 * MIB);
    assert_eq!(h.memslots.present(), vec![0]);
    assert_eq!(h.metric("discard_failures_total"), 2);
    assert_eq!(h.metric("busy_total"), 2);
}

// --- VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE ---

#[test]
fn unplugged_inaccessible_is_offered() {
    let d = device(FakeMemslots::default());
    assert_eq!(
        d.avail_features(),
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    );
    assert_eq!(d.queue_max_sizes(), &[QUEUE_SIZE]);
    assert_eq!(d.device_type(), 24);
}

#[test]
fn unplugged_memory_has_no_memslot_until_plugged() {
    let mut h = Harness::new();
    h.request(REGION_SIZE);
    assert!(
        h.memslots.present().is_empty(),
        "nothing mapped at activation"
    );
    assert_eq!(h.plug(block(64), 1), RESP_ACK);
    assert_eq!(
        h.memslots.present(),
        vec![1],
        "only the slot of the plugged block"
    );
}

#[test]
fn driver_without_unplugged_inaccessible_cannot_plug() {
    let mut h = Harness::with_features(1 << VIRTIO_F_VERSION_1);
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 1), RESP_ERROR);
    assert!(h.memslots.calls().is_empty());
    assert_eq!(
        h.state(block(0), 1),
        (RESP_ACK, STATE_UNPLUGGED),
        "STATE works"
    );
    assert_eq!(h.send(Request::UnplugAll).0, RESP_ACK, "UNPLUG_ALL works");
}

// --- Host memory ---

#[test]
fn unplug_frees_the_blocks_host_memory() {
    let memslots = FakeMemslots::default();
    let mut h = Harness::new();
    // The real region memory this time, not the fake discard.
    h.dev = device(memslots.clone());
    h.dev.set_acked_features(u64::MAX);
    h.dev
        .activate(Activation {
            mem: h.mem.clone(),
            queues: vec![h.mock.create_queue::<Queue>().expect("queue")],
            queue_evts: vec![EventFd::new(libc::EFD_NONBLOCK).expect("eventfd")],
            interrupt: h.interrupt.clone(),
        })
        .expect("activate");
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 4), RESP_ACK);
    assert_eq!(
        h.dev.ram().resident_bytes().expect("mincore"),
        0,
        "plugging touches nothing"
    );
    // The guest uses the plugged memory (through the memslot; here through the mapping).
    let data = vec![0x5au8; (4 * BLOCK) as usize];
    h.dev
        .memory()
        .write_slice(&data, GuestAddress(block(0)))
        .expect("write plugged memory");
    assert_eq!(h.dev.ram().resident_bytes().expect("mincore"), 4 * BLOCK);
    assert_eq!(h.unplug(block(1), 2), RESP_ACK);
    assert_eq!(h.dev.ram().resident_bytes().expect("mincore"), 2 * BLOCK);
    assert_eq!(h.send(Request::UnplugAll).0, RESP_ACK);
    assert_eq!(h.dev.ram().resident_bytes().expect("mincore"), 0);
}

// --- Requested size ---

#[test]
fn set_requested_size_raises_a_config_interrupt() {
    let mut h = Harness::new();
    let generation = h.dev.config_generation();
    h.request(256 * MIB);
    assert_eq!(h.interrupt.raised(), vec![InterruptKind::Config]);
    assert_ne!(h.dev.config_generation(), generation);
    assert_eq!(h.dev.config_space().requested_size, 256 * MIB);
    assert_eq!(h.dev.status().requested_mib, 256);
}

#[test]
fn set_requested_size_before_activation_raises_no_interrupt() {
    let mut d = device(FakeMemslots::default());
    d.set_requested_mib(128).expect("requested");
    assert_eq!(d.requested_size(), 128 * MIB);
}

#[test]
fn requested_size_above_the_region_is_refused() {
    let mut h = Harness::new();
    let e = h
        .dev
        .set_requested_size(REGION_SIZE + BLOCK)
        .expect_err("too large");
    assert!(matches!(e, VirtioMemError::RequestedSizeTooLarge { .. }));
    assert!(e.is_bad_request());
    let e = h.dev.set_requested_mib(u64::MAX).expect_err("overflow");
    assert!(e.is_bad_request());
    assert_eq!(h.dev.requested_size(), 0);
    assert!(h.interrupt.raised().is_empty());
}

#[test]
fn requested_size_not_a_multiple_of_the_block_size_is_refused() {
    let mut h = Harness::new();
    let e = h.dev.set_requested_size(3 * MIB).expect_err("unaligned");
    assert!(matches!(e, VirtioMemError::RequestedSizeUnaligned { .. }));
    assert!(e.is_bad_request());
    assert_eq!(h.dev.requested_size(), 0);
}

#[test]
fn plugging_changes_the_config_generation() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    let g = h.dev.config_generation();
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    assert_ne!(h.dev.config_generation(), g);
    let g = h.dev.config_generation();
    assert_eq!(h.state(block(0), 1).0, RESP_ACK);
    assert_eq!(h.dev.config_generation(), g, "STATE changes nothing");
}

// --- Reset ---

#[test]
fn device_reset_keeps_plugged_blocks_and_memslots() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 2), RESP_ACK);
    h.dev.reset();
    assert!(!h.dev.is_activated());
    assert_eq!(h.dev.plugged_size(), 4 * MIB);
    assert_eq!(h.dev.requested_size(), 64 * MIB);
    assert_eq!(h.memslots.present(), vec![0]);
    assert!(h.discard.ranges().is_empty());
}

#[test]
fn system_reset_unplugs_everything() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 2), RESP_ACK);
    h.dev.system_reset().expect("system reset");
    assert_eq!(h.dev.plugged_size(), 0);
    assert!(h.memslots.present().is_empty());
    assert_eq!(h.discard.ranges(), vec![(block(0), 4 * MIB)]);
    assert_eq!(h.dev.requested_size(), 64 * MIB);
}

// --- Configuration space, status, config ---

#[test]
fn config_space_is_the_spec_layout_little_endian() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    let mut b = [0u8; 64];
    h.dev.read_config(0, &mut b);
    let le64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    assert_eq!(le64(0), BLOCK, "block_size");
    assert_eq!(&b[8..16], &[0; 8], "node_id and padding");
    assert_eq!(le64(16), REGION, "addr");
    assert_eq!(le64(24), REGION_SIZE, "region_size");
    assert_eq!(le64(32), REGION_SIZE, "usable_region_size");
    assert_eq!(le64(40), BLOCK, "plugged_size");
    assert_eq!(le64(48), 64 * MIB, "requested_size");
    assert_eq!(&b[56..], &[0; 8], "past the end reads zero");
    let mut part = [0u8; 4];
    h.dev.read_config(20, &mut part);
    assert_eq!(u32::from_le_bytes(part), (REGION >> 32) as u32);
    h.dev.write_config(48, &[0xff; 8]);
    assert_eq!(h.dev.requested_size(), 64 * MIB, "read-only");
}

#[test]
fn status_reports_region_block_size_and_sizes_in_mib() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 3), RESP_ACK);
    let s = h.dev.status();
    assert_eq!(
        s,
        VirtioMemStatus {
            region_addr: REGION,
            region_size_mib: 512,
            block_size_bytes: BLOCK,
            plugged_mib: 6,
            requested_mib: 64,
            driver_active: true,
        }
    );
    let json = serde_json::to_value(s).expect("json");
    assert_eq!(json["plugged_mib"], 6);
    assert_eq!(json["requested_mib"], 64);
}

#[test]
fn plug_and_unplug_latency_is_recorded() {
    let mut h = Harness::new();
    h.request(64 * MIB);
    assert_eq!(h.plug(block(0), 1), RESP_ACK);
    assert_eq!(h.unplug(block(0), 1), RESP_ACK);
    assert!(h.metric("plug_latency_ns_total") > 0);
    assert!(h.metric("plug_latency_ns_max") > 0);
    assert!(h.metric("unplug_latency_ns_total") > 0);
}

#[test]
fn config_parses_sizes_defaults_and_rejects_unknown_fields() {
    let c: VirtioMemConfig = serde_json::from_str(r#"{"region_size": "1G"}"#).expect("parse");
    assert_eq!(c, VirtioMemConfig::new(1 << 30));
    assert_eq!(c.block_size.bytes(), 2 * MIB);
    assert_eq!(c.slot_size.bytes(), 128 * MIB);
    let c: VirtioMemConfig = serde_json::from_str(
        r#"{"region_size": 268435456, "block_size": "4M", "region_addr": 4294967296}"#,
    )
    .expect("parse");
    assert_eq!(c.block_size.bytes(), 4 * MIB);
    assert_eq!(c.region_addr, Some(4 << 30));
    assert!(
        serde_json::from_str::<VirtioMemConfig>(r#"{"region_size": "1G", "size": 1}"#).is_err()
    );
    assert!(serde_json::from_str::<VirtioMemConfig>(r#"{"block_size": "2M"}"#).is_err());
}

#[test]
fn bad_configurations_are_refused() {
    // Each configuration is refused before the memory is looked at.
    let new = |c: VirtioMemConfig| {
        VirtioMem::new(c, region_of(&config()), Box::new(FakeMemslots::default()))
    };
    assert!(matches!(
        new(VirtioMemConfig::new(REGION_SIZE)),
        Err(VirtioMemError::RegionNotPlaced)
    ));
    let base = config();
    let bad_block = VirtioMemConfig {
        block_size: memory::ByteSize(3 * MIB),
        ..base
    };
    assert!(matches!(
        new(bad_block),
        Err(VirtioMemError::BadBlockSize { .. })
    ));
    let tiny_block = VirtioMemConfig {
        block_size: memory::ByteSize(2048),
        ..base
    };
    assert!(matches!(
        new(tiny_block),
        Err(VirtioMemError::BadBlockSize { .. })
    ));
    let unaligned = VirtioMemConfig {
        region_addr: Some(REGION + MIB),
        ..base
    };
    assert!(matches!(
        new(unaligned),
        Err(VirtioMemError::RegionUnaligned { .. })
    ));
    let odd_size = VirtioMemConfig {
        region_size: memory::ByteSize(REGION_SIZE + MIB),
        ..base
    };
    assert!(matches!(
        new(odd_size),
        Err(VirtioMemError::RegionUnaligned { .. })
    ));
    let bad_slot = VirtioMemConfig {
        slot_size: memory::ByteSize(3 * MIB),
        ..base
    };
    assert!(matches!(
        new(bad_slot),
        Err(VirtioMemError::BadSlotSize { .. })
    ));
    let empty = VirtioMemConfig {
        region_size: memory::ByteSize(0),
        ..base
    };
    assert!(matches!(new(empty), Err(VirtioMemError::EmptyRegion)));
}

#[test]
fn memory_that_is_not_exactly_the_region_is_refused() {
    let new =
        |region: GuestRam| VirtioMem::new(config(), region, Box::new(FakeMemslots::default()));
    let short = GuestRam::new(&[RamRange::new(REGION, REGION_SIZE - BLOCK)]).expect("map");
    let elsewhere = GuestRam::new(&[RamRange::new(REGION + SLOT, REGION_SIZE)]).expect("map");
    let split = GuestRam::new(&[
        RamRange::new(REGION, SLOT),
        RamRange::new(REGION + SLOT, REGION_SIZE - SLOT),
    ])
    .expect("map");
    for region in [short, elsewhere, split] {
        assert!(matches!(
            new(region),
            Err(VirtioMemError::RegionMismatch {
                addr: REGION,
                size: REGION_SIZE
            })
        ));
    }
}

devices::virtio_device_conformance_tests!(device(FakeMemslots::default()));

mod event_loop {
    use super::*;
    use devices::virtio::conformance::{queue_layout, test_memory, GuestDriver};
    use devices::virtio::mmio::{reg, INT_CONFIG, INT_VRING};
    use devices::virtio::MmioTransport;
    use event_manager::{EventManager, SubscriberOps};

    /// The whole path a guest takes: transport registers, the event loop picking up the
    /// activation and the queue notification, a PLUG answered in guest memory, and the config
    /// interrupt of a new requested size.
    #[test]
    fn plug_through_the_transport_and_the_event_loop() {
        let mem = test_memory();
        let memslots = FakeMemslots::default();
        let dev = Arc::new(Mutex::new(device(memslots.clone())));
        let mut em = EventManager::<Arc<Mutex<VirtioMem>>>::new().expect("event manager");
        em.add_subscriber(dev.clone());
        let as_device: Arc<Mutex<dyn VirtioDevice>> = dev.clone();
        let mut transport = MmioTransport::new(mem.clone(), as_device).expect("transport");
        let mut g = GuestDriver(&mut transport);
        assert_eq!(g.read(reg::DEVICE_ID), 24);
        let features = g.device_features();
        assert_ne!(features & 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, 0);
        let status = g.init();
        assert_ne!(status & devices::virtio::status::DRIVER_OK, 0);
        em.run_with_timeout(100).expect("activation event");

        dev.lock()
            .expect("lock")
            .set_requested_mib(4)
            .expect("request");
        assert_ne!(g.read(reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
        let requested = g.read_config(48, 8);
        assert_eq!(
            u64::from_le_bytes(requested.try_into().expect("8")),
            4 * MIB
        );

        // The guest's side of queue 0, as GuestDriver laid it out.
        let (desc, avail, used) = queue_layout(0);
        let req_addr = 0x80_0000;
        let resp_addr = 0x80_1000;
        mem.write_slice(
            &encode_request(Request::Plug {
                addr: REGION,
                nb_blocks: 2,
            }),
            GuestAddress(req_addr),
        )
        .expect("request");
        let d0 = SplitDescriptor::new(req_addr, 24, F_NEXT, 1);
        let d1 = SplitDescriptor::new(resp_addr, 10, F_WRITE, 0);
        mem.write_obj(RawDescriptor::from(d0), GuestAddress(desc))
            .expect("desc 0");
        mem.write_obj(RawDescriptor::from(d1), GuestAddress(desc + 16))
            .expect("desc 1");
        mem.write_obj(0u16, GuestAddress(avail + 4))
            .expect("ring[0]");
        mem.write_obj(1u16, GuestAddress(avail + 2))
            .expect("avail idx");
        g.write(reg::QUEUE_NOTIFY, 0);
        em.run_with_timeout(100).expect("queue event");

        let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
        assert_eq!(used_idx, 1);
        let resp_type: u16 = mem.read_obj(GuestAddress(resp_addr)).expect("resp");
        assert_eq!(resp_type, RESP_ACK);
        assert_ne!(g.read(reg::INTERRUPT_STATUS) & INT_VRING, 0);
        assert_eq!(dev.lock().expect("lock").status().plugged_mib, 4);
        assert_eq!(memslots.present(), vec![0]);
    }
}

#[test]
fn region_memory_asks_for_transparent_huge_pages() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let d = device(FakeMemslots::default());
    let start = d.ram().host_ranges()[0].1 as u64;
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut lines = smaps.lines();
    let header = format!("{start:x}-");
    lines
        .by_ref()
        .find(|l| l.starts_with(&header))
        .expect("the region's mapping");
    let vm_flags = lines
        .find(|l| l.starts_with("VmFlags:"))
        .expect("VmFlags line");
    if thp.contains("[never]") {
        return;
    }
    assert!(
        vm_flags.split_whitespace().any(|f| f == "hg"),
        "MADV_HUGEPAGE set on the region: {vm_flags}"
    );
}
