//! KVM memslots for the VMM's own memory: guest RAM slots, the virtio-mem region's slots
//! (through [`hotplug::MemslotControl`]), and dirty logging on guest RAM for the swapper's page
//! ages ([`memory::swap::DirtyLog`]).
//!
//! Slot numbers: guest RAM takes slots `0..n` (one per [`memory::RamRange`]), the hotplug
//! region's slots follow at `n + index`.

use std::io;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use memory::{DiscardRam, GuestRam, RamError};
use vm_memory::GuestAddress;

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

/// Where a guest page the balloon gives back goes: into the virtio-mem region's memory, to the
/// swapper (which frees its swap slot too) once swap is armed, or plain guest RAM.
#[derive(Debug)]
pub struct GuestDiscard {
    ram: GuestRam,
    swap: crate::swap::SwapperCell,
    hotplug: Option<GuestRam>,
}

impl GuestDiscard {
    /// Discards for `ram`, through the swapper once `swap` is set, and for the `hotplug`
    /// region's memory.
    pub fn new(ram: GuestRam, swap: crate::swap::SwapperCell, hotplug: Option<GuestRam>) -> Self {
        GuestDiscard { ram, swap, hotplug }
    }
}

fn contains(ram: &GuestRam, addr: GuestAddress, len: u64) -> bool {
    ram.ranges()
        .iter()
        .any(|r| addr.0 >= r.start.0 && addr.0.saturating_add(len) <= r.end())
}

impl DiscardRam for GuestDiscard {
    fn discard_range(&self, addr: GuestAddress, len: u64) -> Result<(), RamError> {
        if let Some(hp) = &self.hotplug {
            if contains(hp, addr, len) {
                return hp.discard(addr, len);
            }
        }
        let swapper = self
            .swap
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match swapper {
            Some(swapper) if contains(&self.ram, addr, len) => swapper.discard_range(addr, len),
            _ => self.ram.discard(addr, len),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::swap::{SwapOptions, Swapper};
    use memory::RamRange;
    use std::sync::RwLock;
    use vm_memory::Bytes;

    #[test]
    fn balloon_discards_go_to_the_region_or_the_swapper_and_free_swap_slots() {
        let ram = GuestRam::new(&[RamRange::new(0, 4 << 20)]).expect("ram");
        let region = GuestRam::new(&[RamRange::new(128 << 20, 4 << 20)]).expect("region");
        let cell: crate::swap::SwapperCell = Arc::new(RwLock::new(None));
        let discard = GuestDiscard::new(ram.clone(), cell.clone(), Some(region.clone()));

        // Before swap is armed: plain discards, in RAM and in the region.
        let page = vec![0x77u8; 4096];
        ram.memory()
            .write_slice(&page, GuestAddress(0x1000))
            .expect("write");
        region
            .memory()
            .write_slice(&page, GuestAddress((128 << 20) + 0x2000))
            .expect("write");
        discard
            .discard_range(GuestAddress(0x1000), 4096)
            .expect("discard RAM");
        discard
            .discard_range(GuestAddress((128 << 20) + 0x2000), 4096)
            .expect("discard region");
        let mut back = vec![0u8; 4096];
        ram.memory()
            .read_slice(&mut back, GuestAddress(0x1000))
            .expect("read");
        assert!(back.iter().all(|b| *b == 0));
        region
            .memory()
            .read_slice(&mut back, GuestAddress((128 << 20) + 0x2000))
            .expect("read");
        assert!(back.iter().all(|b| *b == 0));
        assert!(discard.discard_range(GuestAddress(64 << 20), 4096).is_err());

        // Armed: a ballooned page that is in swap gives up its slot.
        let dir = tempfile::tempdir().expect("dir");
        let swapper = match Swapper::new(&ram, dir.path(), SwapOptions::default()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                eprintln!("skipped: no userfaultfd write-protect here: {e}");
                return;
            }
        };
        *cell.write().expect("cell") = Some(swapper.clone());
        for i in 0..16u64 {
            ram.memory()
                .write_slice(&page, GuestAddress(0x10_0000 + i * 4096))
                .expect("write");
        }
        swapper.swap_out(4 << 20).expect("swap out");
        let swapped = swapper.status().swapped_pages;
        assert!(swapped >= 16, "{swapped}");
        discard
            .discard_range(GuestAddress(0x10_0000), 16 * 4096)
            .expect("discard swapped pages");
        assert_eq!(swapper.status().swapped_pages, swapped - 16);
        ram.memory()
            .read_slice(&mut back, GuestAddress(0x10_0000))
            .expect("read");
        assert!(
            back.iter().all(|b| *b == 0),
            "a ballooned page reads as zero"
        );
    }
}
