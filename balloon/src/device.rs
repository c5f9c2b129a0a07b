//! The virtio-balloon device: configuration, activation and the queue logic.
//!
//! `process_*` functions decide and return a `Result` without touching metrics or the guest's
//! rings; `handle_*` methods pop chains, call them, count the outcome and answer the guest;
//! `*_event` methods in `event_handler.rs` only read an fd.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::{
    device_type, read_config_bytes, Activation, DeviceLifecycle, InterruptKind, VirtioDevice,
    VirtioDeviceState, VirtioError, VirtioInterrupt,
};
use memory::clock::{Clock, MonotonicClock};
use memory::DiscardRam;
use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::timerfd::TimerFd;

use crate::metrics::BalloonMetrics;
use crate::stats::{BalloonStats, STAT_SIZE};
use crate::util::{clip_to_memory, compact_pfns, merge_ranges, PfnRange, BALLOON_PAGE_SHIFT};

/// Size of every balloon queue.
pub const QUEUE_SIZE: u16 = 256;
/// Balloon pages (4 KiB) per MiB.
pub const PAGES_PER_MIB: u64 = 256;

/// The host must be told before the guest reuses deflated pages.
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// The stats queue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// The free page reporting queue is present.
pub const VIRTIO_BALLOON_F_FREE_PAGE_REPORTING: u32 = 5;

/// PFNs gathered from the queue before they are discarded, so that a guest cannot make the
/// host buffer an unbounded number of them.
const MAX_PENDING_PFNS: usize = 1 << 16;
/// Largest PFN descriptor accepted (Linux sends at most 256 PFNs, 1 KiB).
const MAX_PFN_DESC_BYTES: u32 = 1 << 20;
/// Largest stats buffer accepted (Linux sends 16 stats, 160 bytes).
const MAX_STATS_BYTES: usize = 4096;

/// What the user asks for (`--balloon deflate_on_oom=on,...`, the config file, the API).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalloonConfig {
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest may deflate when it is out of memory.
    pub deflate_on_oom: bool,
    /// Offer `VIRTIO_BALLOON_F_FREE_PAGE_REPORTING`: the guest reports free pages to discard.
    pub free_page_reporting: bool,
    /// Offer the stats queue and ask for fresh stats every this many seconds; 0 disables it.
    pub stats_interval_s: u32,
}

/// Errors of the balloon device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// A descriptor the device must read is device-writable.
    #[error("descriptor is write-only where the device reads")]
    WriteOnlyDescriptor,
    /// A descriptor the device treats as written (reporting) is device-readable.
    #[error("descriptor is read-only where the device expects a write-only one")]
    ReadOnlyDescriptor,
    /// A descriptor's length is not a whole number of entries, zero, or too large.
    #[error("descriptor length {len} is not a valid multiple of {unit}")]
    BadLength {
        /// The descriptor's length.
        len: u32,
        /// The entry size it must be a multiple of.
        unit: u32,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor at {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A reported range is not page aligned.
    #[error("reported range at {addr:#x}+{len:#x} is not page aligned")]
    Unaligned {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// A chain had no descriptor of the expected direction.
    #[error("descriptor chain is empty")]
    EmptyChain,
    /// The target does not fit the 32-bit page count of the configuration space.
    #[error("balloon target of {target_mib} MiB is too large")]
    TargetTooLarge {
        /// Requested target.
        target_mib: u64,
    },
    /// Reading guest memory failed.
    #[error("cannot read guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// Updating a virtqueue failed.
    #[error("cannot update the virtqueue")]
    Queue(#[source] virtio_queue::Error),
    /// Raising an interrupt failed.
    #[error("cannot raise the interrupt")]
    Interrupt(#[source] VirtioError),
    /// Creating or using an eventfd or the stats timer failed.
    #[error("cannot set up the device's event sources")]
    Event(#[source] io::Error),
}

/// What each queue is for. The guest numbers queues in this order, skipping absent ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueRole {
    /// Pages the guest gives to the host.
    Inflate = 0,
    /// Pages the guest takes back.
    Deflate = 1,
    /// Memory statistics.
    Stats = 2,
    /// Free page reporting.
    Reporting = 3,
}

impl QueueRole {
    /// Every role, in queue order.
    pub const ALL: [QueueRole; 4] = [
        QueueRole::Inflate,
        QueueRole::Deflate,
        QueueRole::Stats,
        QueueRole::Reporting,
    ];
}

/// The guest-visible configuration space (`struct virtio_balloon_config`, little endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct BalloonConfigSpace {
    /// Pages the host wants in the balloon (the target).
    pub num_pages: u32,
    /// Pages the guest has in the balloon.
    pub actual: u32,
    /// Free page hint command id (free page hinting is not offered).
    pub free_page_hint_cmd_id: u32,
    /// Poison value (page poisoning is not offered).
    pub poison_val: u32,
}

impl BalloonConfigSpace {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        b[4..8].copy_from_slice(&self.actual.to_le_bytes());
        b[8..12].copy_from_slice(&self.free_page_hint_cmd_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.poison_val.to_le_bytes());
        b
    }
}

/// What the guest gave us at activation (the queue eventfds are the lifecycle's).
pub(crate) struct ActiveState {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    /// Transport index and queue, by [`QueueRole`].
    pub(crate) queues: [Option<(u16, Queue)>; 4],
    /// The role of each transport queue index.
    pub(crate) roles: Vec<QueueRole>,
}

/// Outcome of turning a batch of PFNs into discards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagesOutcome {
    /// Distinct pages that are guest RAM.
    pub pages: u64,
    /// Pages that are not guest RAM.
    pub bad_pfns: u64,
    /// Discard calls made.
    pub discard_calls: u64,
    /// Discard calls that failed.
    pub discard_failures: u64,
}

/// The virtio-balloon device.
pub struct Balloon {
    pub(crate) config: BalloonConfig,
    virtio: VirtioDeviceState,
    config_space: BalloonConfigSpace,
    discard: Arc<dyn DiscardRam>,
    pub(crate) metrics: Arc<BalloonMetrics>,
    pub(crate) stats_timer: TimerFd,
    pub(crate) lifecycle: DeviceLifecycle<ActiveState>,
    stats_desc: Option<u16>,
    latest_stats: Option<(BalloonStats, Instant)>,
    /// Dates the stats the guest sends; tests move it by hand.
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config)
            .field("acked_features", &self.virtio.acked_features())
            .field("config_space", &self.config_space)
            .field("active", &self.lifecycle.is_activated())
            .finish_non_exhaustive()
    }
}

impl Balloon {
    /// A balloon offering what `config` asks for, giving pages back through `discard` (the VM's
    /// `memory::GuestRam`).
    pub fn new(config: BalloonConfig, discard: Arc<dyn DiscardRam>) -> Result<Self, BalloonError> {
        let mut avail_features = 1 << VIRTIO_BALLOON_F_MUST_TELL_HOST;
        let mut queues = 2;
        if config.stats_interval_s > 0 {
            avail_features |= 1 << VIRTIO_BALLOON_F_STATS_VQ;
            queues += 1;
        }
        if config.deflate_on_oom {
            avail_features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if config.free_page_reporting {
            avail_features |= 1 << VIRTIO_BALLOON_F_FREE_PAGE_REPORTING;
            queues += 1;
        }
        let stats_timer = TimerFd::new().map_err(|e| BalloonError::Event(e.into()))?;
        set_nonblocking(&stats_timer)?;
        Ok(Balloon {
            config,
            virtio: VirtioDeviceState::new(avail_features, vec![QUEUE_SIZE; queues]),
            config_space: BalloonConfigSpace::default(),
            discard,
            metrics: Arc::new(BalloonMetrics::default()),
            stats_timer,
            lifecycle: DeviceLifecycle::new("balloon").map_err(BalloonError::Event)?,
            stats_desc: None,
            latest_stats: None,
            clock: Arc::new(MonotonicClock),
        })
    }

    /// The same device dating the guest's stats on `clock` instead of the host's monotonic
    /// clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// The device's counters; the handle stays valid for the device's lifetime.
    pub fn metrics(&self) -> Arc<BalloonMetrics> {
        self.metrics.clone()
    }

    /// Asks the guest to hold `target_mib` MiB in the balloon, and tells it so with a
    /// configuration interrupt if the driver is running.
    pub fn set_target_mib(&mut self, target_mib: u64) -> Result<(), BalloonError> {
        let pages = target_mib
            .checked_mul(PAGES_PER_MIB)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or(BalloonError::TargetTooLarge { target_mib })?;
        self.config_space.num_pages = pages;
        self.virtio.config_changed();
        if let Some(active) = self.lifecycle.active() {
            active
                .interrupt
                .trigger(InterruptKind::Config)
                .map_err(BalloonError::Interrupt)?;
        }
        Ok(())
    }

    /// The target in MiB.
    pub fn target_mib(&self) -> u64 {
        u64::from(self.config_space.num_pages) / PAGES_PER_MIB
    }

    /// What the guest says it holds in the balloon, in MiB (rounded down).
    pub fn actual_mib(&self) -> u64 {
        u64::from(self.config_space.actual) / PAGES_PER_MIB
    }

    /// The latest statistics from the guest and how old they are.
    pub fn latest_stats(&self) -> Option<(BalloonStats, Duration)> {
        let now = self.clock.now();
        self.latest_stats
            .as_ref()
            .map(|(s, at)| (s.clone(), now.saturating_duration_since(*at)))
    }

    fn role_indices(&self) -> Vec<QueueRole> {
        let acked = |bit| self.virtio.has_feature(bit);
        let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
        if acked(VIRTIO_BALLOON_F_STATS_VQ) {
            roles.push(QueueRole::Stats);
        }
        if acked(VIRTIO_BALLOON_F_FREE_PAGE_REPORTING) {
            roles.push(QueueRole::Reporting);
        }
        roles
    }

    /// Processes every available chain of the inflate or deflate queue: inflated pages are
    /// discarded (coalesced into ranges) before the guest hears back; deflated pages need
    /// nothing, they read as zero when the guest touches them again.
    pub fn handle_page_queue(&mut self, role: QueueRole) -> Result<(), BalloonError> {
        let Balloon {
            lifecycle,
            metrics,
            discard,
            ..
        } = self;
        let Some(mut q) = ActiveQueue::of(lifecycle.active_mut(), role) else {
            return Ok(());
        };
        let (mem, metrics) = (q.mem, &**metrics);
        let discard = (role == QueueRole::Inflate).then_some(&**discard);
        let page_counter = match role {
            QueueRole::Inflate => &metrics.inflated_pages,
            _ => &metrics.deflated_pages,
        };
        let mut pfns = Vec::new();
        let flush = |pfns: &mut Vec<u64>| {
            let outcome = process_pages(pfns, mem, discard);
            pfns.clear();
            BalloonMetrics::add(page_counter, outcome.pages);
            record_pages_outcome(metrics, &outcome);
        };
        let heads = q.walk_descriptors(metrics, format_args!("{role:?} descriptor"), |desc| {
            let read = process_pfn_descriptor(mem, desc, &mut pfns);
            if pfns.len() >= MAX_PENDING_PFNS {
                flush(&mut pfns);
            }
            read
        });
        if !pfns.is_empty() {
            flush(&mut pfns);
        }
        q.finish(metrics, &heads)
    }

    /// Processes the free page reporting queue: every reported range is discarded.
    pub fn handle_reporting_queue(&mut self) -> Result<(), BalloonError> {
        let Balloon {
            lifecycle,
            metrics,
            discard,
            ..
        } = self;
        let Some(mut q) = ActiveQueue::of(lifecycle.active_mut(), QueueRole::Reporting) else {
            return Ok(());
        };
        let mem = q.mem;
        let mut ranges = Vec::new();
        let heads = q.walk_descriptors(metrics, format_args!("reported range"), |desc| {
            ranges.push(process_report_descriptor(mem, desc)?);
            Ok(())
        });
        let outcome = process_ranges(merge_ranges(&mut ranges), mem, Some(&**discard));
        BalloonMetrics::add(&metrics.reported_pages, outcome.pages);
        record_pages_outcome(metrics, &outcome);
        q.finish(metrics, &heads)
    }

    /// Processes the stats queue: records the stats the guest sent and keeps its buffer until
    /// the next request.
    pub fn handle_stats_queue(&mut self) -> Result<(), BalloonError> {
        let Balloon {
            lifecycle,
            metrics,
            stats_desc,
            latest_stats,
            clock,
            ..
        } = self;
        let Some(q) = ActiveQueue::of(lifecycle.active_mut(), QueueRole::Stats) else {
            return Ok(());
        };
        let mut returned = Vec::new();
        while let Some(chain) = q.queue.pop_descriptor_chain(q.mem) {
            let head = chain.head_index();
            match process_stats_chain(q.mem, chain) {
                Ok(stats) => {
                    *latest_stats = Some((stats, clock.now()));
                    BalloonMetrics::add(&metrics.stats_updates, 1);
                }
                Err(e) => {
                    tracing::debug!("balloon: stats buffer refused: {e}");
                    BalloonMetrics::add(&metrics.bad_descriptors, 1);
                }
            }
            // Keep the newest buffer for the next request (even a bad one, so a broken guest
            // is not asked again in a tight loop); an older one goes back now.
            if let Some(old) = stats_desc.replace(head) {
                returned.push(old);
            }
        }
        q.finish(metrics, &returned)
    }

    /// Asks the guest for fresh stats by giving its buffer back. If the guest has not answered
    /// the previous request there is nothing to give back: that is counted, nothing else.
    pub fn request_stats(&mut self) -> Result<(), BalloonError> {
        let Balloon {
            lifecycle,
            metrics,
            stats_desc,
            ..
        } = self;
        let Some(q) = ActiveQueue::of(lifecycle.active_mut(), QueueRole::Stats) else {
            return Ok(());
        };
        match stats_desc.take() {
            Some(head) => q.finish(metrics, &[head]),
            None => {
                BalloonMetrics::add(&metrics.stats_requests_missed, 1);
                Ok(())
            }
        }
    }
}

/// One queue of an active device and what answering on it takes.
struct ActiveQueue<'a> {
    mem: &'a GuestMemoryMmap,
    interrupt: &'a dyn VirtioInterrupt,
    /// The queue's transport index.
    index: u16,
    queue: &'a mut Queue,
}

impl<'a> ActiveQueue<'a> {
    /// The queue of `role`; `None` if the device is not active or has no such queue.
    fn of(active: Option<&'a mut ActiveState>, role: QueueRole) -> Option<Self> {
        let ActiveState {
            mem,
            interrupt,
            queues,
            ..
        } = active?;
        let (index, queue) = queues[role as usize].as_mut()?;
        Some(ActiveQueue {
            mem,
            interrupt: &**interrupt,
            index: *index,
            queue,
        })
    }

    /// Pops every available chain and hands each of its descriptors to `on_desc`. A descriptor
    /// it refuses is logged as `what`, counted in `bad_descriptors` and skipped; a chain with
    /// no descriptor is counted too. Returns the chains' heads, for [`Self::finish`].
    fn walk_descriptors(
        &mut self,
        metrics: &BalloonMetrics,
        what: std::fmt::Arguments<'_>,
        mut on_desc: impl FnMut(&Descriptor) -> Result<(), BalloonError>,
    ) -> Vec<u16> {
        let mut heads = Vec::new();
        while let Some(chain) = self.queue.pop_descriptor_chain(self.mem) {
            heads.push(chain.head_index());
            let mut descriptors = 0;
            for desc in chain {
                descriptors += 1;
                if let Err(e) = on_desc(&desc) {
                    tracing::debug!("balloon: {what} skipped: {e}");
                    BalloonMetrics::add(&metrics.bad_descriptors, 1);
                }
            }
            if descriptors == 0 {
                BalloonMetrics::add(&metrics.bad_descriptors, 1);
            }
        }
        heads
    }

    /// Returns `heads` to the guest with [`finish_chains`].
    fn finish(self, metrics: &BalloonMetrics, heads: &[u16]) -> Result<(), BalloonError> {
        finish_chains(
            self.queue,
            self.index,
            self.mem,
            self.interrupt,
            metrics,
            heads,
        )
    }
}

fn set_nonblocking(fd: &impl AsRawFd) -> Result<(), BalloonError> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor this device owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(BalloonError::Event(io::Error::last_os_error()));
    }
    Ok(())
}

fn record_pages_outcome(metrics: &BalloonMetrics, outcome: &PagesOutcome) {
    BalloonMetrics::add(&metrics.bad_pfns, outcome.bad_pfns);
    BalloonMetrics::add(&metrics.discard_calls, outcome.discard_calls);
    BalloonMetrics::add(&metrics.discard_failures, outcome.discard_failures);
}

/// Returns `heads` to the guest (nothing written) and raises the queue interrupt if it wants one.
fn finish_chains(
    queue: &mut Queue,
    index: u16,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    metrics: &BalloonMetrics,
    heads: &[u16],
) -> Result<(), BalloonError> {
    let mut used = 0;
    for &head in heads {
        match queue.add_used(mem, head, 0) {
            Ok(()) => used += 1,
            Err(e) => {
                tracing::debug!("balloon: chain {head} not returned: {e}");
                BalloonMetrics::add(&metrics.bad_descriptors, 1);
            }
        }
    }
    if used == 0 {
        return Ok(());
    }
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.trigger(InterruptKind::Queue(index)) {
            BalloonMetrics::add(&metrics.interrupt_failures, 1);
            return Err(BalloonError::Interrupt(e));
        }
    }
    Ok(())
}

/// Appends the bytes of the device-readable descriptor `desc` to `out`: the checks the
/// inflate/deflate and stats queues share, with `check_len` for what each accepts as a length.
fn read_descriptor(
    mem: &GuestMemoryMmap,
    desc: &Descriptor,
    out: &mut Vec<u8>,
    check_len: impl FnOnce(u32) -> Result<(), BalloonError>,
) -> Result<(), BalloonError> {
    if desc.is_write_only() {
        return Err(BalloonError::WriteOnlyDescriptor);
    }
    let len = desc.len();
    check_len(len)?;
    let addr = desc.addr();
    if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
        return Err(BalloonError::OutsideMemory { addr: addr.0, len });
    }
    let start = out.len();
    out.resize(start + len as usize, 0);
    mem.read_slice(&mut out[start..], addr).map_err(|e| {
        out.truncate(start);
        BalloonError::Memory(e)
    })
}

/// Reads the little-endian 32-bit PFNs of one inflate/deflate descriptor into `pfns`.
pub fn process_pfn_descriptor(
    mem: &GuestMemoryMmap,
    desc: &Descriptor,
    pfns: &mut Vec<u64>,
) -> Result<(), BalloonError> {
    let mut buf = Vec::new();
    read_descriptor(mem, desc, &mut buf, |len| {
        if len == 0 || !len.is_multiple_of(4) || len > MAX_PFN_DESC_BYTES {
            return Err(BalloonError::BadLength { len, unit: 4 });
        }
        Ok(())
    })?;
    pfns.extend(
        buf.chunks_exact(4)
            .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
    );
    Ok(())
}

/// The page range of one free page reporting descriptor.
pub fn process_report_descriptor(
    mem: &GuestMemoryMmap,
    desc: &Descriptor,
) -> Result<PfnRange, BalloonError> {
    // Linux adds reported pages as device-writable buffers (virtqueue_add_inbuf).
    if !desc.is_write_only() {
        return Err(BalloonError::ReadOnlyDescriptor);
    }
    let (addr, len) = (desc.addr().0, desc.len());
    let page_mask = (1u64 << BALLOON_PAGE_SHIFT) - 1;
    if len == 0 || addr & page_mask != 0 || u64::from(len) & page_mask != 0 {
        return Err(BalloonError::Unaligned { addr, len });
    }
    if !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
        return Err(BalloonError::OutsideMemory { addr, len });
    }
    Ok(PfnRange {
        start_pfn: addr >> BALLOON_PAGE_SHIFT,
        num_pages: u64::from(len) >> BALLOON_PAGE_SHIFT,
    })
}

/// Parses the stats buffer of one chain: its device-readable descriptors, concatenated.
pub fn process_stats_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<BalloonStats, BalloonError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut bytes = Vec::new();
    let mut descriptors = 0;
    for desc in chain {
        descriptors += 1;
        let read = bytes.len();
        read_descriptor(mem, &desc, &mut bytes, |len| {
            if read + len as usize > MAX_STATS_BYTES {
                return Err(BalloonError::BadLength {
                    len,
                    unit: STAT_SIZE as u32,
                });
            }
            Ok(())
        })?;
    }
    if descriptors == 0 {
        return Err(BalloonError::EmptyChain);
    }
    if !bytes.len().is_multiple_of(STAT_SIZE) {
        return Err(BalloonError::BadLength {
            len: bytes.len() as u32,
            unit: STAT_SIZE as u32,
        });
    }
    Ok(BalloonStats::parse(&bytes))
}

/// Coalesces `pfns` into ranges, drops the pages that are not guest RAM and, with `discard`,
/// gives each remaining range back to the host in one call.
pub fn process_pages(
    pfns: &mut [u64],
    mem: &GuestMemoryMmap,
    discard: Option<&dyn DiscardRam>,
) -> PagesOutcome {
    process_ranges(compact_pfns(pfns), mem, discard)
}

/// Like [`process_pages`] for ranges already coalesced.
pub fn process_ranges(
    ranges: Vec<PfnRange>,
    mem: &GuestMemoryMmap,
    discard: Option<&dyn DiscardRam>,
) -> PagesOutcome {
    let mut outcome = PagesOutcome::default();
    for range in ranges {
        let (parts, bad) = clip_to_memory(range, mem);
        outcome.bad_pfns += bad;
        outcome.pages += range.num_pages - bad;
        let Some(discard) = discard else { continue };
        for (addr, len) in parts {
            outcome.discard_calls += 1;
            if let Err(e) = discard.discard_range(addr, len) {
                tracing::warn!("balloon: cannot discard {:#x}+{len:#x}: {e}", addr.0);
                outcome.discard_failures += 1;
            }
        }
    }
    outcome
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn virtio_state(&self) -> &VirtioDeviceState {
        &self.virtio
    }

    fn virtio_state_mut(&mut self) -> &mut VirtioDeviceState {
        &mut self.virtio
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space.to_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is written by the driver.
        let mut actual = self.config_space.actual.to_le_bytes();
        let mut touched = false;
        for (i, b) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if (4..8).contains(&at) {
                actual[at as usize - 4] = *b;
                touched = true;
            }
        }
        if touched {
            self.config_space.actual = u32::from_le_bytes(actual);
        } else {
            tracing::debug!("balloon: write to read-only config offset {offset:#x} ignored");
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.check_activation(&activation)?;
        let Activation {
            mem,
            queues,
            queue_evts,
            interrupt,
        } = activation;
        let roles = self.role_indices();
        for (index, queue) in queues.iter().enumerate().take(roles.len()) {
            if !queue.ready() || !queue.is_valid(&mem) {
                return Err(VirtioError::QueueNotValid { index });
            }
        }
        let mut by_role: [Option<(u16, Queue)>; 4] = Default::default();
        for (index, (queue, role)) in queues.into_iter().zip(&roles).enumerate() {
            by_role[*role as usize] = Some((index as u16, queue));
        }
        if self.virtio.has_feature(VIRTIO_BALLOON_F_STATS_VQ) && self.config.stats_interval_s > 0 {
            let interval = Duration::from_secs(u64::from(self.config.stats_interval_s));
            if let Err(e) = self.stats_timer.reset(interval, Some(interval)) {
                return Err(VirtioError::EventFd(e.into()));
            }
        }
        let state = ActiveState {
            mem,
            interrupt,
            queues: by_role,
            roles,
        };
        self.lifecycle.activate(state, queue_evts)
    }

    fn is_activated(&self) -> bool {
        self.lifecycle.is_activated()
    }

    fn reset(&mut self) {
        self.lifecycle.reset();
        if let Err(e) = self.stats_timer.clear() {
            tracing::error!("balloon: cannot stop the stats timer: {e}");
        }
        self.virtio.reset();
        self.config_space.actual = 0;
        self.stats_desc = None;
    }
}
