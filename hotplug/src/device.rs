//! The virtio-mem device: configuration, the hotplug region and its memslots, activation and the
//! request queue.
//!
//! `process_*` functions decide and return a `Result` (the guest's answer follows from it through
//! [`VirtioMemError::response`]); `handle_*` methods pop chains, call them, count the outcome and
//! answer the guest; `*_event` methods in `event_handler.rs` only read an fd.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use devices::virtio::{
    device_type, read_config_bytes, Activation, DeviceLifecycle, InterruptKind, VirtioDevice,
    VirtioDeviceState, VirtioError, VirtioInterrupt,
};
use memory::{ByteSize, DiscardRam, GuestRam, HUGE_PAGE_SIZE, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::endian::{Le16, Le64};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::bitmap::{BlockBitmap, RangeState};
pub use crate::error::VirtioMemError;
use crate::metrics::VirtioMemMetrics;
use crate::util::{request_blocks, slots_of};
use crate::wire::{
    parse_request, Request, Response, REQUEST_SIZE, RESPONSE_SIZE, STATE_MIXED, STATE_PLUGGED,
    STATE_UNPLUGGED,
};

/// Size of the guest-request queue (Linux has one request in flight at a time).
pub const QUEUE_SIZE: u16 = 128;
/// Feature bit: `node_id` is an ACPI PXM (not offered: the guests have no ACPI).
pub const VIRTIO_MEM_F_ACPI_PXM: u32 = 0;
/// Feature bit: the driver does not access unplugged memory (offered, and needed to plug).
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// Default block size: the x86_64 transparent huge page size ([`HUGE_PAGE_SIZE`]).
pub const DEFAULT_BLOCK_SIZE: u64 = HUGE_PAGE_SIZE;
/// Default memslot size: Linux's x86_64 memory block size.
pub const DEFAULT_SLOT_SIZE: u64 = 128 << 20;

const MIB: u64 = 1 << 20;

/// What the user asks for (`--hotplug SIZE,block_size=2M`, the config file).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioMemConfig {
    /// Guest physical address of the hotplug region; `None` lets the VMM place it (memvisor
    /// puts it above RAM, 128 MiB aligned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region_addr: Option<u64>,
    /// Size of the hotplug region: the most memory the guest can ever get plugged.
    #[serde(with = "memory::size::size_serde")]
    pub region_size: ByteSize,
    /// Plug/unplug granularity; a power of two, at least 4 KiB.
    #[serde(default = "default_block_size", with = "memory::size::size_serde")]
    pub block_size: ByteSize,
    /// Size of each memslot the region is split into; a multiple of `block_size`.
    #[serde(default = "default_slot_size", with = "memory::size::size_serde")]
    pub slot_size: ByteSize,
}

fn default_block_size() -> ByteSize {
    ByteSize(DEFAULT_BLOCK_SIZE)
}
fn default_slot_size() -> ByteSize {
    ByteSize(DEFAULT_SLOT_SIZE)
}

impl VirtioMemConfig {
    /// A region of `region_size` bytes, not placed yet, with the default block and slot sizes.
    pub fn new(region_size: u64) -> Self {
        VirtioMemConfig {
            region_addr: None,
            region_size: ByteSize(region_size),
            block_size: default_block_size(),
            slot_size: default_slot_size(),
        }
    }

    /// Checks the configuration; returns the region's start address.
    pub fn validate(&self) -> Result<u64, VirtioMemError> {
        let addr = self.region_addr.ok_or(VirtioMemError::RegionNotPlaced)?;
        let (size, block, slot) = (
            self.region_size.bytes(),
            self.block_size.bytes(),
            self.slot_size.bytes(),
        );
        if !block.is_power_of_two() || block < PAGE_SIZE {
            return Err(VirtioMemError::BadBlockSize { block_size: block });
        }
        if size == 0 {
            return Err(VirtioMemError::EmptyRegion);
        }
        if !addr.is_multiple_of(block)
            || !size.is_multiple_of(block)
            || addr.checked_add(size).is_none()
        {
            return Err(VirtioMemError::RegionUnaligned {
                addr,
                size,
                block_size: block,
            });
        }
        if slot == 0 || !slot.is_multiple_of(block) || size.div_ceil(slot) > u64::from(u32::MAX) {
            return Err(VirtioMemError::BadSlotSize {
                slot_size: slot,
                block_size: block,
            });
        }
        Ok(addr)
    }
}

/// One memslot of the hotplug region, as [`MemslotControl`] is asked to add or remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memslot {
    /// Index of the slot within the region (0 is the lowest); the VMM maps it to a KVM slot.
    pub index: u32,
    /// Guest physical address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the memory behind it (the device's mapping).
    pub host_addr: u64,
}

/// Making part of the hotplug region visible to the guest, or not. The `vmm` crate implements
/// it with `KVM_SET_USER_MEMORY_REGION`; tests use a fake that records the calls.
pub trait MemslotControl: Send {
    /// Maps `slot` into the guest.
    fn add(&mut self, slot: &Memslot) -> io::Result<()>;
    /// Removes `slot` from the guest; its memory is inaccessible afterwards.
    fn remove(&mut self, slot: &Memslot) -> io::Result<()>;
}

/// The guest-visible configuration space (`struct virtio_mem_config`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct VirtioMemConfigSpace {
    /// Block size and alignment in bytes.
    pub block_size: Le64,
    /// NUMA node (meaningless without `VIRTIO_MEM_F_ACPI_PXM`).
    pub node_id: Le16,
    /// Reserved.
    pub padding: [u8; 6],
    /// Guest physical address of the region.
    pub addr: Le64,
    /// Region size in bytes.
    pub region_size: Le64,
    /// Size of the part of the region the driver may plug.
    pub usable_region_size: Le64,
    /// Bytes plugged.
    pub plugged_size: Le64,
    /// Bytes the device wants plugged.
    pub requested_size: Le64,
}

const _: () = assert!(size_of::<VirtioMemConfigSpace>() == 56);

// SAFETY: `VirtioMemConfigSpace` is `repr(C)` and made only of integer types (the `Le*` types are
// `repr(transparent)` integers) laid out without implicit padding (asserted size 56 = the sum of
// the fields), so every byte pattern is a valid value.
unsafe impl ByteValued for VirtioMemConfigSpace {}

/// What the control plane reports (`GET /api/v1/vms/{id}/memory`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMemStatus {
    /// Guest physical address of the hotplug region.
    pub region_addr: u64,
    /// Region size in MiB.
    pub region_size_mib: u64,
    /// Block size in bytes.
    pub block_size_bytes: u64,
    /// Memory the guest has plugged, in MiB.
    pub plugged_mib: u64,
    /// Memory the host asks the guest to plug, in MiB.
    pub requested_mib: u64,
    /// Whether a driver has activated the device.
    pub driver_active: bool,
}

/// The hotplug region: which blocks are plugged, which memslots exist, and the host memory.
pub(crate) struct HotplugRegion {
    pub(crate) addr: u64,
    pub(crate) size: u64,
    pub(crate) block_size: u64,
    slot_size: u64,
    blocks_per_slot: usize,
    pub(crate) requested_size: u64,
    pub(crate) bitmap: BlockBitmap,
    /// Plugged blocks per slot; a slot is mapped into the guest exactly when this is non-zero.
    slot_plugged: Vec<usize>,
    ram: GuestRam,
    host_base: u64,
    discard: Arc<dyn DiscardRam>,
    memslots: Box<dyn MemslotControl>,
    metrics: Arc<VirtioMemMetrics>,
}

impl HotplugRegion {
    pub(crate) fn plugged_size(&self) -> u64 {
        self.bitmap.plugged() as u64 * self.block_size
    }

    fn slot(&self, index: usize) -> Memslot {
        let offset = index as u64 * self.slot_size;
        Memslot {
            index: index as u32,
            guest_addr: self.addr + offset,
            size: self.slot_size.min(self.size - offset),
            host_addr: self.host_base + offset,
        }
    }

    fn slot_blocks(&self, index: usize) -> Range<usize> {
        let start = index * self.blocks_per_slot;
        start..(start + self.blocks_per_slot).min(self.bitmap.len())
    }

    /// Blocks of `blocks` that fall in slot `index`.
    fn overlap(&self, blocks: &Range<usize>, index: usize) -> usize {
        let s = self.slot_blocks(index);
        blocks
            .end
            .min(s.end)
            .saturating_sub(blocks.start.max(s.start))
    }

    fn blocks(&self, addr: u64, nb_blocks: u16) -> Result<Range<usize>, VirtioMemError> {
        // The usable region is the whole region.
        request_blocks(addr, nb_blocks, self.addr, self.size, self.block_size)
    }

    /// Adds `slots` (`add`) or removes them; on a failure puts back the ones it changed and
    /// reports the failure.
    fn change_slots(&mut self, slots: &[usize], add: bool) -> Result<(), VirtioMemError> {
        for (i, &index) in slots.iter().enumerate() {
            let slot = self.slot(index);
            let result = if add {
                self.memslots.add(&slot)
            } else {
                self.memslots.remove(&slot)
            };
            if let Err(source) = result {
                VirtioMemMetrics::add(&self.metrics.memslot_failures, 1);
                for &changed in &slots[..i] {
                    self.undo(changed, !add);
                }
                return Err(VirtioMemError::Memslot {
                    op: if add { "add" } else { "remove" },
                    index: slot.index,
                    source,
                });
            }
            let counter = if add {
                &self.metrics.memslot_adds
            } else {
                &self.metrics.memslot_removes
            };
            VirtioMemMetrics::add(counter, 1);
        }
        Ok(())
    }

    fn undo(&mut self, index: usize, add: bool) {
        let slot = self.slot(index);
        let result = if add {
            self.memslots.add(&slot)
        } else {
            self.memslots.remove(&slot)
        };
        if let Err(e) = result {
            VirtioMemMetrics::add(&self.metrics.memslot_failures, 1);
            tracing::error!("virtio-mem: cannot roll back memslot {index}: {e}");
        }
    }

    fn discard(&self, blocks: &Range<usize>) -> Result<(), VirtioMemError> {
        let addr = GuestAddress(self.addr + blocks.start as u64 * self.block_size);
        let len = blocks.len() as u64 * self.block_size;
        self.discard.discard_range(addr, len).map_err(|e| {
            VirtioMemMetrics::add(&self.metrics.discard_failures, 1);
            tracing::warn!("virtio-mem: cannot discard {:#x}+{len:#x}: {e}", addr.0);
            VirtioMemError::Discard(e)
        })
    }

    /// PLUG: ERROR if the range is wrong or any block is plugged already, NACK if it would
    /// exceed the requested size; otherwise the slots it touches are mapped and the blocks
    /// marked plugged. A memslot that cannot be added leaves everything as it was (BUSY).
    pub(crate) fn process_plug(
        &mut self,
        addr: u64,
        nb_blocks: u16,
        unplugged_inaccessible: bool,
    ) -> Result<(), VirtioMemError> {
        if !unplugged_inaccessible {
            return Err(VirtioMemError::UnpluggedAccessible);
        }
        let blocks = self.blocks(addr, nb_blocks)?;
        if self.bitmap.count_plugged(blocks.clone()) != 0 {
            return Err(VirtioMemError::AlreadyPlugged { addr, nb_blocks });
        }
        let bytes = u64::from(nb_blocks) * self.block_size;
        let plugged = self.plugged_size();
        if plugged.saturating_add(bytes) > self.requested_size {
            return Err(VirtioMemError::BeyondRequested {
                bytes,
                plugged,
                requested: self.requested_size,
            });
        }
        let slots = slots_of(&blocks, self.blocks_per_slot);
        let new: Vec<usize> = slots
            .clone()
            .filter(|&s| self.slot_plugged[s] == 0)
            .collect();
        self.change_slots(&new, true)?;
        for s in slots {
            self.slot_plugged[s] += self.overlap(&blocks, s);
        }
        self.bitmap.set_range(blocks, true);
        Ok(())
    }

    /// UNPLUG: ERROR if the range is wrong or any block is not plugged; otherwise the blocks'
    /// memory is discarded, slots left with no plugged block are removed from the guest, and
    /// the blocks marked unplugged. A host failure leaves the blocks plugged (BUSY).
    pub(crate) fn process_unplug(
        &mut self,
        addr: u64,
        nb_blocks: u16,
    ) -> Result<(), VirtioMemError> {
        let blocks = self.blocks(addr, nb_blocks)?;
        if self.bitmap.count_plugged(blocks.clone()) != blocks.len() {
            return Err(VirtioMemError::NotPlugged { addr, nb_blocks });
        }
        self.discard(&blocks)?;
        let slots = slots_of(&blocks, self.blocks_per_slot);
        let emptied: Vec<usize> = slots
            .clone()
            .filter(|&s| self.slot_plugged[s] == self.overlap(&blocks, s))
            .collect();
        self.change_slots(&emptied, false)?;
        for s in slots {
            self.slot_plugged[s] -= self.overlap(&blocks, s);
        }
        self.bitmap.set_range(blocks, false);
        Ok(())
    }

    /// UNPLUG_ALL: discards every plugged run and removes every slot; returns the bytes
    /// unplugged. A host failure leaves the blocks plugged (BUSY).
    pub(crate) fn process_unplug_all(&mut self) -> Result<u64, VirtioMemError> {
        let bytes = self.plugged_size();
        for run in self.bitmap.plugged_runs() {
            self.discard(&run)?;
        }
        let present: Vec<usize> = (0..self.slot_plugged.len())
            .filter(|&s| self.slot_plugged[s] != 0)
            .collect();
        self.change_slots(&present, false)?;
        self.slot_plugged.fill(0);
        self.bitmap.clear();
        Ok(bytes)
    }

    /// STATE: ERROR if the range is wrong, otherwise the blocks' state.
    pub(crate) fn process_state(&self, addr: u64, nb_blocks: u16) -> Result<u16, VirtioMemError> {
        let blocks = self.blocks(addr, nb_blocks)?;
        Ok(match self.bitmap.range_state(blocks) {
            RangeState::Plugged => STATE_PLUGGED,
            RangeState::Unplugged => STATE_UNPLUGGED,
            RangeState::Mixed => STATE_MIXED,
        })
    }

    /// Runs one request and counts its outcome; returns the guest's answer.
    pub(crate) fn handle_request(
        &mut self,
        request: Result<Request, VirtioMemError>,
        unplugged_inaccessible: bool,
    ) -> Response {
        let started = Instant::now();
        let m = self.metrics.clone();
        let result = request.and_then(|request| match request {
            Request::Plug { addr, nb_blocks } => self
                .process_plug(addr, nb_blocks, unplugged_inaccessible)
                .map(|()| {
                    let bytes = u64::from(nb_blocks) * self.block_size;
                    VirtioMemMetrics::add(&m.plugs, 1);
                    VirtioMemMetrics::add(&m.plugged_bytes, bytes);
                    VirtioMemMetrics::record_latency(
                        &m.plug_latency_ns,
                        &m.plug_latency_ns_max,
                        started.elapsed(),
                    );
                    Response::Ack
                }),
            Request::Unplug { addr, nb_blocks } => self.process_unplug(addr, nb_blocks).map(|()| {
                let bytes = u64::from(nb_blocks) * self.block_size;
                VirtioMemMetrics::add(&m.unplugs, 1);
                VirtioMemMetrics::add(&m.unplugged_bytes, bytes);
                VirtioMemMetrics::record_latency(
                    &m.unplug_latency_ns,
                    &m.unplug_latency_ns_max,
                    started.elapsed(),
                );
                Response::Ack
            }),
            Request::UnplugAll => self.process_unplug_all().map(|bytes| {
                VirtioMemMetrics::add(&m.unplug_alls, 1);
                VirtioMemMetrics::add(&m.unplugged_bytes, bytes);
                VirtioMemMetrics::record_latency(
                    &m.unplug_latency_ns,
                    &m.unplug_latency_ns_max,
                    started.elapsed(),
                );
                Response::Ack
            }),
            Request::State { addr, nb_blocks } => {
                self.process_state(addr, nb_blocks).map(|state| {
                    VirtioMemMetrics::add(&m.state_requests, 1);
                    Response::AckState(state)
                })
            }
        });
        result.unwrap_or_else(|e| {
            let response = e.response();
            let counter = match response {
                Response::Nack => &m.nacks,
                Response::Busy => &m.busy,
                _ => &m.errors,
            };
            VirtioMemMetrics::add(counter, 1);
            tracing::debug!("virtio-mem: request refused ({response:?}): {e}");
            response
        })
    }
}

/// Where one chain's request came from and where its response goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainParts {
    /// The request's 24 bytes.
    pub request: [u8; REQUEST_SIZE],
    /// The device-writable buffers, in order; together at least 10 bytes.
    pub response: Vec<(GuestAddress, u32)>,
}

/// Reads the request of one chain (device-readable descriptors first, at least 24 bytes) and
/// finds room for the response (device-writable descriptors after them, at least 10 bytes).
pub fn process_chain<M>(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
) -> Result<ChainParts, VirtioMemError>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut request = [0u8; REQUEST_SIZE];
    let mut readable = 0u64;
    let mut response = Vec::new();
    let mut writable = 0u64;
    for desc in chain {
        let (addr, len) = (desc.addr(), desc.len());
        if !GuestMemoryBackend::check_range(mem, addr, len as usize) {
            return Err(VirtioMemError::OutsideMemory { addr: addr.0, len });
        }
        if desc.is_write_only() {
            writable += u64::from(len);
            response.push((addr, len));
            continue;
        }
        if !response.is_empty() {
            return Err(VirtioMemError::ReadableAfterWritable);
        }
        let at = (readable as usize).min(REQUEST_SIZE);
        let n = (len as usize).min(REQUEST_SIZE - at);
        mem.read_slice(&mut request[at..at + n], addr)
            .map_err(VirtioMemError::Memory)?;
        readable += u64::from(len);
    }
    if readable < REQUEST_SIZE as u64 {
        return Err(VirtioMemError::RequestTooShort { len: readable });
    }
    if writable < RESPONSE_SIZE as u64 {
        return Err(VirtioMemError::ResponseTooShort { len: writable });
    }
    Ok(ChainParts { request, response })
}

/// Writes `response` across the writable buffers; returns the bytes written.
fn write_response(
    mem: &GuestMemoryMmap,
    buffers: &[(GuestAddress, u32)],
    response: Response,
) -> Result<u32, VirtioMemError> {
    let bytes = response.to_bytes();
    let mut done = 0;
    for &(addr, len) in buffers {
        if done == bytes.len() {
            break;
        }
        let n = (len as usize).min(bytes.len() - done);
        mem.write_slice(&bytes[done..done + n], addr)
            .map_err(VirtioMemError::Memory)?;
        done += n;
    }
    Ok(done as u32)
}

/// What the guest gave us at activation (the queue eventfd is the lifecycle's).
pub(crate) struct ActiveState {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) queue: Queue,
}

/// The virtio-mem device.
pub struct VirtioMem {
    config: VirtioMemConfig,
    virtio: VirtioDeviceState,
    pub(crate) region: HotplugRegion,
    pub(crate) metrics: Arc<VirtioMemMetrics>,
    pub(crate) lifecycle: DeviceLifecycle<ActiveState>,
}

impl std::fmt::Debug for VirtioMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMem")
            .field("config", &self.config)
            .field("acked_features", &self.virtio.acked_features())
            .field("plugged_size", &self.region.plugged_size())
            .field("requested_size", &self.region.requested_size)
            .field("active", &self.lifecycle.is_activated())
            .finish_non_exhaustive()
    }
}

impl VirtioMem {
    /// A device for the region `config` describes (placed: `region_addr` set), whose memory is
    /// `region`: one range covering exactly the region (the VMM maps it with
    /// [`GuestRam::new`], or hands over its own backing). The device asks for transparent huge
    /// pages behind it (blocks are huge-page sized) and makes parts of it visible to the guest
    /// through `memslots` as blocks get plugged. Nothing is plugged and the requested size is 0.
    pub fn new(
        config: VirtioMemConfig,
        region: GuestRam,
        memslots: Box<dyn MemslotControl>,
    ) -> Result<Self, VirtioMemError> {
        let addr = config.validate()?;
        let size = config.region_size.bytes();
        let block_size = config.block_size.bytes();
        let slot_size = config.slot_size.bytes();
        // usize is 64 bits on every host KVM runs on.
        let blocks = (size / block_size) as usize;
        let host_base = match region.host_ranges().as_slice() {
            [(range, ptr)] if range.start.0 == addr && range.size == size => *ptr as u64,
            _ => return Err(VirtioMemError::RegionMismatch { addr, size }),
        };
        let ram = region;
        if let Err(e) = ram.set_hugepages(true) {
            tracing::info!("virtio-mem: no transparent huge pages for the region: {e}");
        } else if host_base % HUGE_PAGE_SIZE != (addr % HUGE_PAGE_SIZE) {
            tracing::info!(
                "virtio-mem: region mapping at {host_base:#x} is not huge-page aligned like \
                 its guest address; blocks straddle huge pages"
            );
        }
        let blocks_per_slot = (slot_size / block_size) as usize;
        let metrics = Arc::new(VirtioMemMetrics::default());
        Ok(VirtioMem {
            config,
            virtio: VirtioDeviceState::new(
                1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
                vec![QUEUE_SIZE],
            ),
            region: HotplugRegion {
                addr,
                size,
                block_size,
                slot_size,
                blocks_per_slot,
                requested_size: 0,
                bitmap: BlockBitmap::new(blocks),
                slot_plugged: vec![0; size.div_ceil(slot_size) as usize],
                discard: Arc::new(ram.clone()),
                ram,
                host_base,
                memslots,
                metrics: metrics.clone(),
            },
            metrics,
            lifecycle: DeviceLifecycle::new("virtio-mem").map_err(VirtioMemError::Event)?,
        })
    }

    /// Replaces how unplugged blocks are given back to the host (by default the region's own
    /// [`GuestRam`]): for tests, or a backing other than anonymous memory.
    pub fn with_discard(mut self, discard: Arc<dyn DiscardRam>) -> Self {
        self.region.discard = discard;
        self
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> VirtioMemConfig {
        self.config
    }

    /// The region's host memory, as handed to [`VirtioMem::new`].
    pub fn ram(&self) -> &GuestRam {
        &self.region.ram
    }

    /// The guest memory of the region alone.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.region.ram.memory()
    }

    /// The device's counters; the handle stays valid for the device's lifetime.
    pub fn metrics(&self) -> Arc<VirtioMemMetrics> {
        self.metrics.clone()
    }

    /// Asks the guest to have `bytes` plugged, and tells it so with a configuration interrupt
    /// if the driver is running. Refused (a 400 for the API) above the region size or when not
    /// a multiple of the block size.
    pub fn set_requested_size(&mut self, bytes: u64) -> Result<(), VirtioMemError> {
        let region = &self.region;
        if bytes > region.size {
            return Err(VirtioMemError::RequestedSizeTooLarge {
                requested_mib: bytes / MIB,
                region_mib: region.size / MIB,
            });
        }
        if !bytes.is_multiple_of(region.block_size) {
            return Err(VirtioMemError::RequestedSizeUnaligned {
                requested: bytes,
                block_size: region.block_size,
            });
        }
        self.region.requested_size = bytes;
        self.config_changed();
        if let Some(active) = self.lifecycle.active() {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Config) {
                VirtioMemMetrics::add(&self.metrics.interrupt_failures, 1);
                return Err(VirtioMemError::Interrupt(e));
            }
        }
        Ok(())
    }

    /// [`Self::set_requested_size`] in MiB, as the API takes it.
    pub fn set_requested_mib(&mut self, mib: u64) -> Result<(), VirtioMemError> {
        let bytes = mib
            .checked_mul(MIB)
            .ok_or(VirtioMemError::RequestedSizeTooLarge {
                requested_mib: mib,
                region_mib: self.region.size / MIB,
            })?;
        self.set_requested_size(bytes)
    }

    /// Bytes the host asks the guest to plug.
    pub fn requested_size(&self) -> u64 {
        self.region.requested_size
    }

    /// Bytes the guest has plugged.
    pub fn plugged_size(&self) -> u64 {
        self.region.plugged_size()
    }

    /// What the control plane reports.
    pub fn status(&self) -> VirtioMemStatus {
        VirtioMemStatus {
            region_addr: self.region.addr,
            region_size_mib: self.region.size / MIB,
            block_size_bytes: self.region.block_size,
            plugged_mib: self.region.plugged_size() / MIB,
            requested_mib: self.region.requested_size / MIB,
            driver_active: self.lifecycle.is_activated(),
        }
    }

    /// The guest-visible configuration space.
    pub fn config_space(&self) -> VirtioMemConfigSpace {
        let r = &self.region;
        VirtioMemConfigSpace {
            block_size: r.block_size.into(),
            node_id: 0u16.into(),
            padding: [0; 6],
            addr: r.addr.into(),
            region_size: r.size.into(),
            usable_region_size: r.size.into(),
            plugged_size: r.plugged_size().into(),
            requested_size: r.requested_size.into(),
        }
    }

    /// For a system reset (VM reboot): unplugs every block, as the specification advises, so
    /// that the next driver starts from nothing plugged. The requested size stays.
    pub fn system_reset(&mut self) -> Result<(), VirtioMemError> {
        let bytes = self.region.process_unplug_all()?;
        VirtioMemMetrics::add(&self.metrics.unplugged_bytes, bytes);
        self.config_changed();
        Ok(())
    }

    fn config_changed(&mut self) {
        self.virtio.config_changed();
    }

    fn unplugged_inaccessible(&self) -> bool {
        self.virtio.has_feature(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    }

    /// Processes every available request: each is answered ACK, NACK, BUSY or ERROR; a chain
    /// too malformed to answer is returned with nothing written and counted.
    pub fn handle_queue(&mut self) -> Result<(), VirtioMemError> {
        let inaccessible = self.unplugged_inaccessible();
        let VirtioMem {
            region,
            lifecycle,
            metrics,
            virtio,
            ..
        } = self;
        let Some(ActiveState {
            mem,
            interrupt,
            queue,
        }) = lifecycle.active_mut()
        else {
            return Ok(());
        };
        let mut used = 0;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let written = match process_chain(mem, chain) {
                Ok(parts) => {
                    let before = region.plugged_size();
                    let response = region.handle_request(
                        parse_request(&parts.request).map_err(VirtioMemError::from),
                        inaccessible,
                    );
                    if region.plugged_size() != before {
                        virtio.config_changed();
                    }
                    match write_response(mem, &parts.response, response) {
                        Ok(n) => n,
                        Err(e) => {
                            tracing::debug!("virtio-mem: response not written: {e}");
                            VirtioMemMetrics::add(&metrics.bad_descriptors, 1);
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!("virtio-mem: chain {head} refused: {e}");
                    VirtioMemMetrics::add(&metrics.bad_descriptors, 1);
                    0
                }
            };
            match queue.add_used(&*mem, head, written) {
                Ok(()) => used += 1,
                Err(e) => {
                    tracing::debug!("virtio-mem: chain {head} not returned: {e}");
                    VirtioMemMetrics::add(&metrics.bad_descriptors, 1);
                }
            }
        }
        if used > 0 && queue.needs_notification(&*mem).unwrap_or(true) {
            if let Err(e) = interrupt.trigger(InterruptKind::Queue(0)) {
                VirtioMemMetrics::add(&metrics.interrupt_failures, 1);
                return Err(VirtioMemError::Interrupt(e));
            }
        }
        Ok(())
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        device_type::MEM
    }

    fn virtio_state(&self) -> &VirtioDeviceState {
        &self.virtio
    }

    fn virtio_state_mut(&mut self) -> &mut VirtioDeviceState {
        &mut self.virtio
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(self.config_space().as_slice(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Every field is read-only for the driver.
        tracing::debug!("virtio-mem: write to read-only config offset {offset:#x} ignored");
    }

    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.check_activation(&activation)?;
        let Activation {
            mem,
            queues,
            queue_evts,
            interrupt,
        } = activation;
        let Some(queue) = queues.into_iter().next() else {
            return Err(VirtioError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        if !queue.ready() || !queue.is_valid(&mem) {
            return Err(VirtioError::QueueNotValid { index: 0 });
        }
        if !self.unplugged_inaccessible() {
            tracing::warn!(
                "virtio-mem: the driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE; \
                 its PLUG requests will be refused"
            );
        }
        let state = ActiveState {
            mem,
            interrupt,
            queue,
        };
        self.lifecycle.activate(state, queue_evts)
    }

    fn is_activated(&self) -> bool {
        self.lifecycle.is_activated()
    }

    fn reset(&mut self) {
        // The specification forbids changing the state of blocks on a device reset: plugged
        // blocks, memslots and the requested size stay.
        self.lifecycle.reset();
        self.virtio.reset();
    }
}
