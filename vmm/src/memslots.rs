//! KVM memslots for the VMM's own memory: guest RAM slots, the virtio-mem region's slots
//! (through [`hotplug::MemslotControl`]), and dirty logging on guest RAM for the swapper's page
//! ages ([`memory::swap::DirtyLog`]). Where a discarded page goes is memory's business
//! ([`memory::discard::GuestDiscard`]).
//!
//! Slot numbers: guest RAM takes slots `0..n` (one per [`memory::RamRange`]), the hotplug
//! region's slots follow at `n + index`.

use std::io;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use memory::GuestRam;

fn kvm_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

/// Maps each guest RAM range into KVM at slot = its index; `dirty_log` turns on
/// `KVM_MEM_LOG_DIRTY_PAGES`. Calling it again with the other `dirty_log` changes the flags of
/// the existing slots.
pub fn map_ram(vm_fd: &VmFd, ram: &GuestRam, dirty_log: bool) -> Result<(), kvm_ioctls::Error> {
    for (slot, (range, host)) in ram.host_ranges().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: range.start.0,
            memory_size: range.size,
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `ram`; the VM keeps guest RAM for
        // as long as the KVM VM exists (its fields drop after the vCPU threads are joined).
        unsafe { vm_fd.set_user_memory_region(region) }?;
    }
    Ok(())
}

/// The virtio-mem region's memslots, added and removed with `KVM_SET_USER_MEMORY_REGION`.
#[derive(Debug)]
pub struct KvmMemslots {
    vm_fd: Arc<VmFd>,
    first_slot: u32,
}

impl KvmMemslots {
    /// Slots numbered from `first_slot` (the number of guest RAM slots).
    pub fn new(vm_fd: Arc<VmFd>, first_slot: u32) -> Self {
        KvmMemslots { vm_fd, first_slot }
    }

    fn set(&self, slot: &hotplug::Memslot, size: u64) -> io::Result<()> {
        let index = self
            .first_slot
            .checked_add(slot.index)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let region = kvm_userspace_memory_region {
            slot: index,
            flags: 0,
            guest_phys_addr: slot.guest_addr,
            memory_size: size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: `host_addr` is inside the virtio-mem device's region mapping, which lives as
        // long as the device, and the device lives as long as the VM (size 0 removes the slot).
        unsafe { self.vm_fd.set_user_memory_region(region) }.map_err(kvm_io)
    }
}

impl hotplug::MemslotControl for KvmMemslots {
    fn add(&mut self, slot: &hotplug::Memslot) -> io::Result<()> {
        self.set(slot, slot.size)
    }

    fn remove(&mut self, slot: &hotplug::Memslot) -> io::Result<()> {
        self.set(slot, 0)
    }
}

/// KVM's dirty log of guest RAM, one bitmap per RAM slot (the swapper's page ages).
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm_fd: Arc<VmFd>,
    sizes: Vec<u64>,
}

impl KvmDirtyLog {
    /// The dirty log of `ram`'s slots (mapped by [`map_ram`] with dirty logging on).
    pub fn new(vm_fd: Arc<VmFd>, ram: &GuestRam) -> Self {
        KvmDirtyLog {
            vm_fd,
            sizes: ram.ranges().iter().map(|r| r.size).collect(),
        }
    }
}

impl memory::swap::DirtyLog for KvmDirtyLog {
    fn dirty_pages(&mut self, range_idx: usize) -> io::Result<Vec<u64>> {
        let size = *self
            .sizes
            .get(range_idx)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.vm_fd
            .get_dirty_log(range_idx as u32, size as usize)
            .map_err(kvm_io)
    }
}
