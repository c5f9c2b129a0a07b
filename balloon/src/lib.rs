//! The virtio-balloon device of memvisor.
//!
//! Planned (issue "virtio-balloon with stats, free page reporting and deflate-on-OOM"): inflate
//! and deflate queues whose PFNs are coalesced into ranges and discarded through the memory
//! manager, the stats queue, free page reporting and `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`. The device
//! sees guest memory, its queues, queue events and an interrupt, never the transport or KVM.
//! Nothing is implemented yet; this crate holds its place in the workspace.
