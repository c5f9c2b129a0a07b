//! Address buses: a map from address ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes at addresses of a bus.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset` from the device's base address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` from the device's base address.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from placing a device on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Base address of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: non-overlapping ranges, each served by one device.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base+len`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let clash_below = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if clash_below {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &Entry)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + len as u64 <= entry.len).then_some((offset, entry))
    }

    /// Dispatches a read. Returns false (and leaves `data` untouched) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => {
                entry
                    .device
                    .lock()
                    .expect("a device panicked while holding its lock")
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write. Returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, entry)) => {
                entry
                    .device
                    .lock()
                    .expect("a device panicked while holding its lock")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset_within_range() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).expect("insert");
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[7]));
        assert_eq!(dev.lock().expect("lock").writes, vec![(7, vec![7])]);
    }

    #[test]
    fn accesses_outside_any_device_are_not_dispatched() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x1000, 0x10)
            .expect("insert");
        let mut b = [0xffu8; 4];
        assert!(!bus.read(0xfff, &mut b));
        assert!(!bus.read(0x100e, &mut b), "straddles the end");
        assert!(!bus.write(0x1010, &[1]));
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let d = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(d(), 0x100, 0x10).expect("insert");
        assert!(bus.insert(d(), 0x10f, 1).is_err());
        assert!(bus.insert(d(), 0xf8, 0x10).is_err());
        assert!(bus.insert(d(), 0x0, 0x1000).is_err());
        assert!(bus.insert(d(), 0x200, 0).is_err());
        assert!(bus.insert(d(), u64::MAX, 2).is_err());
        bus.insert(d(), 0x110, 0x10).expect("adjacent is fine");
        bus.insert(d(), 0xf0, 0x10).expect("adjacent below is fine");
    }
}
