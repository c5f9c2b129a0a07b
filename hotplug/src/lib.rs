//! The virtio-mem device of memvisor.
//!
//! Planned (issue "virtio-mem: hot-plug and hot-unplug of guest memory"): a hotplug region split
//! into blocks, a plugged-block bitmap, the PLUG/UNPLUG/UNPLUG_ALL/STATE requests and memslots
//! added and removed through a small trait that the `vmm` crate implements. Nothing is
//! implemented yet; this crate holds its place in the workspace.
