//! The virtio-mem device of memvisor (virtio 1.2, "Memory Device", device id 24).
//!
//! A hotplug region of guest physical address space, split into blocks (default 2 MiB) that
//! the guest's driver plugs and unplugs to follow the `requested_size` the host sets
//! ([`VirtioMem::set_requested_size`]). The device answers PLUG, UNPLUG, UNPLUG_ALL and STATE
//! requests with ACK, NACK, BUSY or ERROR as the specification says, keeps a plugged-block
//! bitmap ([`bitmap`]) and offers `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`: unplugged memory is
//! not mapped into the guest. The region is split into memslots (default 128 MiB) that are
//! added through [`MemslotControl`] when their first block is plugged and removed when their
//! last block is unplugged; unplugged blocks' host memory is discarded.
//!
//! The device sees guest memory, its queue, the queue eventfd and an interrupt at activation,
//! never the transport or KVM. Wiring, for the VMM: place the region in the guest's address
//! space (the VMM owns the layout), map its memory (a `memory::GuestRam` of the one range),
//! build a [`VirtioMem`] with it and a `MemslotControl` backed by `KVM_SET_USER_MEMORY_REGION`,
//! wrap it in `Arc<Mutex<_>>`, hand a clone to `devices::virtio::MmioTransport::new` and
//! another to the event loop (`event_manager::EventManager::add_subscriber`). See
//! `docs/virtio-mem.md`.
//!
//! Modules, lowest first: [`wire`] (the request and response formats), [`error`] (the device's
//! errors and the guest's answer to each), [`util`] and [`bitmap`] (pure block and slot
//! bookkeeping), [`metrics`], [`device`], then `event_handler` (the event-loop wiring).

pub mod bitmap;
pub mod device;
pub mod error;
pub mod event_handler;
pub mod metrics;
pub mod util;
pub mod wire;

pub use device::{
    Memslot, MemslotControl, VirtioMem, VirtioMemConfig, VirtioMemConfigSpace, VirtioMemStatus,
    DEFAULT_BLOCK_SIZE, DEFAULT_SLOT_SIZE, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};
pub use error::VirtioMemError;
pub use metrics::VirtioMemMetrics;
pub use wire::{Request, Response};

#[cfg(test)]
mod tests;
