//! Conformance checks every virtio device must pass, stamped onto a device's tests with
//! [`virtio_device_conformance_tests!`](crate::virtio_device_conformance_tests), and
//! [`GuestDriver`], which plays a guest driver's side of the virtio-mmio registers.

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::mmio::{reg, MmioTransport, CONFIG_OFFSET, INT_CONFIG};
use super::{status, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of [`test_memory`].
pub const TEST_MEM_SIZE: u64 = 16 << 20;

/// Guest memory for conformance tests: [`TEST_MEM_SIZE`] bytes at address 0.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), TEST_MEM_SIZE as usize)])
        .expect("16 MiB of anonymous memory for a test")
}

/// Where [`GuestDriver::setup_all_queues`] puts queue `index`: (descriptor table, available
/// ring, used ring), 64 KiB apart per queue from 1 MiB up.
pub fn queue_layout(index: usize) -> (u64, u64, u64) {
    let base = 0x10_0000 + index as u64 * 0x1_0000;
    (base, base + 0x4000, base + 0x8000)
}

/// Plays the guest driver against a transport through its registers.
#[derive(Debug)]
pub struct GuestDriver<'a>(pub &'a mut MmioTransport);

impl GuestDriver<'_> {
    /// Reads a 32-bit register.
    pub fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.0.read(offset, &mut b);
        u32::from_le_bytes(b)
    }
    /// Writes a 32-bit register.
    pub fn write(&mut self, offset: u64, value: u32) {
        self.0.write(offset, &value.to_le_bytes());
    }
    /// Reads `len` bytes of configuration space.
    pub fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.0.read(CONFIG_OFFSET + offset, &mut b);
        b
    }
    /// The 64 feature bits the device offers, read through the selection window.
    pub fn device_features(&mut self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::DEVICE_FEATURES);
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }
    /// ACKNOWLEDGE, DRIVER, writes `features`, FEATURES_OK; true if FEATURES_OK stuck.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(reg::STATUS, s);
        self.read(reg::STATUS) & status::FEATURES_OK != 0
    }
    /// Sets up queue `index` with `size` entries and the given ring addresses, then marks it ready.
    pub fn setup_queue(&mut self, index: u32, size: u32, desc: u64, avail: u64, used: u64) {
        self.write(reg::QUEUE_SEL, index);
        self.write(reg::QUEUE_NUM, size);
        self.write(reg::QUEUE_DESC_LOW, desc as u32);
        self.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(reg::QUEUE_AVAIL_LOW, avail as u32);
        self.write(reg::QUEUE_AVAIL_HIGH, (avail >> 32) as u32);
        self.write(reg::QUEUE_USED_LOW, used as u32);
        self.write(reg::QUEUE_USED_HIGH, (used >> 32) as u32);
        self.write(reg::QUEUE_READY, 1);
    }
    /// Sets up every queue the device offers at [`queue_layout`], with up to 256 entries.
    pub fn setup_all_queues(&mut self) {
        let mut index = 0;
        loop {
            self.write(reg::QUEUE_SEL, index);
            let max = self.read(reg::QUEUE_NUM_MAX);
            if max == 0 {
                break;
            }
            let (desc, avail, used) = queue_layout(index as usize);
            self.setup_queue(index, max.min(256), desc, avail, used);
            index += 1;
        }
    }
    /// Sets DRIVER_OK and returns the status register read back.
    pub fn driver_ok(&mut self) -> u32 {
        let s = self.read(reg::STATUS);
        self.write(reg::STATUS, s | status::DRIVER_OK);
        self.read(reg::STATUS)
    }
    /// The whole initialisation with every offered feature; returns the final status.
    pub fn init(&mut self) -> u32 {
        let features = self.device_features();
        if !self.negotiate(features) {
            return self.read(reg::STATUS);
        }
        self.setup_all_queues();
        self.driver_ok()
    }
    /// Writes 0 to the status register.
    pub fn reset(&mut self) {
        self.write(reg::STATUS, 0);
    }
}

fn lock(
    device: &Arc<Mutex<dyn VirtioDevice>>,
) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().expect("device lock")
}

fn transport(device: &Arc<Mutex<dyn VirtioDevice>>) -> MmioTransport {
    MmioTransport::new(test_memory(), device.clone()).expect("transport for a valid device")
}

/// The device offers VERSION_1 and drops feature bits it did not offer.
pub fn check_features_mask_unknown_bits(device: &Arc<Mutex<dyn VirtioDevice>>) {
    let mut d = lock(device);
    let avail = d.avail_features();
    assert_ne!(avail & 1 << VIRTIO_F_VERSION_1, 0, "VERSION_1 is offered");
    d.set_acked_features(u64::MAX);
    assert_eq!(d.acked_features(), avail, "unknown bits are masked");
    d.set_acked_features(1 << VIRTIO_F_VERSION_1);
    assert_eq!(d.acked_features(), 1 << VIRTIO_F_VERSION_1);
}

/// A driver acking a feature the device did not offer does not get FEATURES_OK.
pub fn check_unoffered_feature_is_refused(device: &Arc<Mutex<dyn VirtioDevice>>) {
    let mut t = transport(device);
    let mut g = GuestDriver(&mut t);
    let avail = g.device_features();
    let unoffered = !avail & avail.wrapping_add(1);
    let unoffered = if unoffered == 0 { 1 << 63 } else { unoffered };
    assert_eq!(avail & unoffered, 0, "the device offers every feature bit");
    assert!(!g.negotiate(avail | unoffered), "FEATURES_OK refused");
    assert_eq!(
        g.driver_ok() & status::DRIVER_OK,
        0,
        "DRIVER_OK refused too"
    );
    assert!(!lock(device).is_activated());
}

fn snapshot(device: &Arc<Mutex<dyn VirtioDevice>>) -> (u64, bool, Vec<u8>) {
    let d = lock(device);
    let mut config = vec![0u8; 256];
    d.read_config(0, &mut config);
    (d.acked_features(), d.is_activated(), config)
}

/// After activation and configuration writes, writing 0 to the status register returns the
/// device to its initial state, and it can be driven again.
pub fn check_reset_returns_to_initial_state(device: &Arc<Mutex<dyn VirtioDevice>>) {
    let before = snapshot(device);
    let mut t = transport(device);
    let mut g = GuestDriver(&mut t);
    let s = g.init();
    assert_eq!(
        s & status::DEVICE_NEEDS_RESET,
        0,
        "a valid setup is accepted"
    );
    assert_ne!(s & status::DRIVER_OK, 0);
    assert!(lock(device).is_activated());
    for offset in (0..64).step_by(4) {
        g.0.write(CONFIG_OFFSET + offset, &[0x5a; 4]);
    }
    g.reset();
    assert_eq!(g.read(reg::STATUS), 0);
    assert_eq!(g.read(reg::INTERRUPT_STATUS), 0);
    g.write(reg::QUEUE_SEL, 0);
    assert_eq!(g.read(reg::QUEUE_READY), 0);
    assert_eq!(
        snapshot(device),
        before,
        "features, activation and config are back"
    );
    let s = g.init();
    assert_ne!(
        s & status::DRIVER_OK,
        0,
        "the device works again after reset"
    );
    assert_eq!(s & status::DEVICE_NEEDS_RESET, 0);
    assert!(lock(device).is_activated());
}

/// Ways a driver can get queue setup wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadQueueSetup {
    /// QueueNum is not a power of two.
    SizeNotPowerOfTwo,
    /// QueueNum is above QueueNumMax.
    SizeAboveMax,
    /// The descriptor table lies past the end of guest memory.
    RingOutsideMemory,
    /// The used ring straddles the end of guest memory.
    RingStraddlesEndOfMemory,
    /// The descriptor table is not 16-byte aligned.
    MisalignedRing,
}

/// A bad setup of queue 0 is refused at DRIVER_OK (DEVICE_NEEDS_RESET, a config interrupt, the
/// device stays inactive) without a panic, and a reset and a good setup recover.
pub fn check_bad_queue_setup_is_refused(device: &Arc<Mutex<dyn VirtioDevice>>, bad: BadQueueSetup) {
    let mut t = transport(device);
    let mut g = GuestDriver(&mut t);
    let features = g.device_features();
    assert!(g.negotiate(features));
    g.setup_all_queues();
    g.write(reg::QUEUE_SEL, 0);
    let max = g.read(reg::QUEUE_NUM_MAX);
    let (desc, avail, used) = queue_layout(0);
    match bad {
        BadQueueSetup::SizeNotPowerOfTwo => g.setup_queue(0, 3, desc, avail, used),
        BadQueueSetup::SizeAboveMax => g.setup_queue(0, max * 2, desc, avail, used),
        BadQueueSetup::RingOutsideMemory => {
            g.setup_queue(0, max.min(256), TEST_MEM_SIZE + 0x1000, avail, used)
        }
        BadQueueSetup::RingStraddlesEndOfMemory => {
            g.setup_queue(0, max.min(256), desc, avail, TEST_MEM_SIZE - 8)
        }
        BadQueueSetup::MisalignedRing => g.setup_queue(0, max.min(256), desc + 4, avail, used),
    }
    let s = g.driver_ok();
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0, "{bad:?} is refused");
    assert!(!lock(device).is_activated(), "{bad:?} does not activate");
    assert_ne!(g.read(reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    g.reset();
    let s = g.init();
    assert_ne!(s & status::DRIVER_OK, 0, "a good setup after reset works");
    assert_eq!(s & status::DEVICE_NEEDS_RESET, 0);
    assert!(lock(device).is_activated());
}

/// Stamps the conformance tests onto a device: `virtio_device_conformance_tests!(make_device())`
/// inside a test module, where the expression builds a fresh device each time it is evaluated.
#[macro_export]
macro_rules! virtio_device_conformance_tests {
    ($make:expr) => {
        mod virtio_conformance {
            #[allow(unused_imports)]
            use super::*;
            use $crate::virtio::conformance::{self as c, BadQueueSetup};

            fn make() -> ::std::sync::Arc<::std::sync::Mutex<dyn $crate::virtio::VirtioDevice>> {
                ::std::sync::Arc::new(::std::sync::Mutex::new($make))
            }

            #[test]
            fn feature_negotiation_masks_unknown_bits() {
                c::check_features_mask_unknown_bits(&make());
            }
            #[test]
            fn driver_acking_unoffered_feature_gets_no_features_ok() {
                c::check_unoffered_feature_is_refused(&make());
            }
            #[test]
            fn reset_returns_to_initial_state() {
                c::check_reset_returns_to_initial_state(&make());
            }
            #[test]
            fn queue_size_not_power_of_two_is_refused() {
                c::check_bad_queue_setup_is_refused(&make(), BadQueueSetup::SizeNotPowerOfTwo);
            }
            #[test]
            fn queue_size_above_max_is_refused() {
                c::check_bad_queue_setup_is_refused(&make(), BadQueueSetup::SizeAboveMax);
            }
            #[test]
            fn ring_outside_guest_memory_is_refused() {
                c::check_bad_queue_setup_is_refused(&make(), BadQueueSetup::RingOutsideMemory);
            }
            #[test]
            fn ring_straddling_end_of_guest_memory_is_refused() {
                c::check_bad_queue_setup_is_refused(
                    &make(),
                    BadQueueSetup::RingStraddlesEndOfMemory,
                );
            }
            #[test]
            fn misaligned_ring_is_refused() {
                c::check_bad_queue_setup_is_refused(&make(), BadQueueSetup::MisalignedRing);
            }
        }
    };
}
