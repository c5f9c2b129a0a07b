//! Where a guest page given back to the host goes. A page the balloon frees can be in the
//! virtio-mem region (discarded there), in guest RAM once swap is armed (through the swapper,
//! which also frees its swap slot), or in plain guest RAM.

use vm_memory::GuestAddress;

use crate::swap::SwapperCell;
use crate::{DiscardRam, GuestRam, RamError};

/// Routes discards to the hotplug region's memory, the swapper (once armed) or guest RAM.
#[derive(Debug)]
pub struct GuestDiscard {
    ram: GuestRam,
    swap: SwapperCell,
    hotplug: Option<GuestRam>,
}

impl GuestDiscard {
    /// Discards for `ram`, through the swapper once `swap` holds one, and for the `hotplug`
    /// region's memory.
    pub fn new(ram: GuestRam, swap: SwapperCell, hotplug: Option<GuestRam>) -> Self {
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
    use crate::swap::{SwapOptions, Swapper};
    use crate::RamRange;
    use std::sync::{Arc, RwLock};
    use vm_memory::Bytes;

    #[test]
    fn balloon_discards_go_to_the_region_or_the_swapper_and_free_swap_slots() {
        let ram = GuestRam::new(&[RamRange::new(0, 4 << 20)]).expect("ram");
        let region = GuestRam::new(&[RamRange::new(128 << 20, 4 << 20)]).expect("region");
        let cell: SwapperCell = Arc::new(RwLock::new(None));
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
        let swapper = match Swapper::new(&ram, &std::env::temp_dir(), SwapOptions::default()) {
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
