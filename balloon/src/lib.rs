//! The virtio-balloon device of memvisor.
//!
//! The guest puts pages into the balloon (inflate queue) and takes them back (deflate queue);
//! the host discards inflated pages through [`memory::DiscardRam`] after coalescing their PFNs
//! into ranges ([`util`]), so one syscall frees many pages. The stats queue carries the guest's
//! memory statistics ([`stats`]), the free page reporting queue carries free ranges the host
//! discards too, and `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` lets the guest deflate when it runs out
//! of memory. Every PFN is bounds-checked against guest memory; a bad PFN or malformed
//! descriptor is counted ([`metrics`]) and skipped.
//!
//! The device sees guest memory, its queues, queue eventfds and an interrupt at activation,
//! never the transport or KVM. Wiring, for the VMM: build a [`Balloon`], wrap it in
//! `Arc<Mutex<_>>`, hand a clone to `devices::virtio::MmioTransport::new` and another to the
//! event loop (`event_manager::EventManager::add_subscriber`).

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod stats;
pub mod util;

pub use device::{Balloon, BalloonConfig, BalloonConfigSpace, BalloonError, QueueRole};
pub use metrics::BalloonMetrics;
pub use stats::BalloonStats;

#[cfg(test)]
mod tests;
