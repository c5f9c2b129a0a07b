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
//! never the transport or KVM. Wiring, for the VMM: pick the region's address with
//! [`VirtioMemConfig::placed`], build a [`VirtioMem`] with a `MemslotControl` backed by
//! `KVM_SET_USER_MEMORY_REGION`, wrap it in `Arc<Mutex<_>>`, hand a clone to
//! `devices::virtio::MmioTransport::new` and another to the event loop
//! (`event_manager::EventManager::add_subscriber`). See `docs/virtio-mem.md`.

pub mod bitmap;
pub mod device;
pub mod event_handler;
pub mod metrics;
mod sys;
pub mod util;

pub use device::{
    Memslot, MemslotControl, VirtioMem, VirtioMemConfig, VirtioMemConfigSpace, VirtioMemError,
    VirtioMemStatus, DEFAULT_BLOCK_SIZE, DEFAULT_SLOT_SIZE, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};
pub use metrics::VirtioMemMetrics;
pub use util::{place_region, Request, Response};

#[cfg(test)]
mod tests;
