//! The virtio-mmio transport, version 2 (virtio 1.x, 4.2), for split virtqueues.
//!
//! The VMM places an [`MmioTransport`] on the MMIO bus at some base address, announces it on the
//! guest command line ([`super::mmio_cmdline_fragment`]), registers [`MmioTransport::interrupt_evt`]
//! as an irqfd for the device's interrupt line, and registers each of
//! [`MmioTransport::queue_evts`] as an ioeventfd on `base + QUEUE_NOTIFY_OFFSET` with the queue
//! index as datamatch. Without ioeventfds a QueueNotify write reaching the bus signals the same
//! eventfd, so the device sees no difference.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{
    status, Activation, InterruptKind, VirtioDevice, VirtioError, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;
use crate::interrupt::EventFdTrigger;

/// Size of the MMIO window of one device.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register, where the VMM registers the queue ioeventfds.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Offset of the device configuration space.
pub const CONFIG_OFFSET: u64 = 0x100;

/// "virt" in little endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The virtio-mmio version this transport implements.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("MVSR").
pub const VENDOR_ID: u32 = 0x5253_564d;

/// InterruptStatus bit: a queue was used.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Register offsets (virtio 1.x, 4.2.2).
pub mod reg {
    /// MagicValue (R).
    pub const MAGIC: u64 = 0x00;
    /// Version (R).
    pub const VERSION: u64 = 0x04;
    /// DeviceID (R).
    pub const DEVICE_ID: u64 = 0x08;
    /// VendorID (R).
    pub const VENDOR_ID: u64 = 0x0c;
    /// DeviceFeatures (R).
    pub const DEVICE_FEATURES: u64 = 0x10;
    /// DeviceFeaturesSel (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x14;
    /// DriverFeatures (W).
    pub const DRIVER_FEATURES: u64 = 0x20;
    /// DriverFeaturesSel (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x24;
    /// QueueSel (W).
    pub const QUEUE_SEL: u64 = 0x30;
    /// QueueNumMax (R).
    pub const QUEUE_NUM_MAX: u64 = 0x34;
    /// QueueNum (W).
    pub const QUEUE_NUM: u64 = 0x38;
    /// QueueReady (RW).
    pub const QUEUE_READY: u64 = 0x44;
    /// QueueNotify (W).
    pub const QUEUE_NOTIFY: u64 = 0x50;
    /// InterruptStatus (R).
    pub const INTERRUPT_STATUS: u64 = 0x60;
    /// InterruptACK (W).
    pub const INTERRUPT_ACK: u64 = 0x64;
    /// Status (RW).
    pub const STATUS: u64 = 0x70;
    /// QueueDescLow (W).
    pub const QUEUE_DESC_LOW: u64 = 0x80;
    /// QueueDescHigh (W).
    pub const QUEUE_DESC_HIGH: u64 = 0x84;
    /// QueueDriverLow (W): the available ring.
    pub const QUEUE_AVAIL_LOW: u64 = 0x90;
    /// QueueDriverHigh (W).
    pub const QUEUE_AVAIL_HIGH: u64 = 0x94;
    /// QueueDeviceLow (W): the used ring.
    pub const QUEUE_USED_LOW: u64 = 0xa0;
    /// QueueDeviceHigh (W).
    pub const QUEUE_USED_HIGH: u64 = 0xa4;
    /// SHMSel (W).
    pub const SHM_SEL: u64 = 0xac;
    /// SHMLenLow (R).
    pub const SHM_LEN_LOW: u64 = 0xb0;
    /// SHMLenHigh (R).
    pub const SHM_LEN_HIGH: u64 = 0xb4;
    /// ConfigGeneration (R).
    pub const CONFIG_GENERATION: u64 = 0xfc;
}

/// Errors from building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A device declared a queue whose maximum size is zero, above 32768 or not a power of two.
    #[error("queue {index} has invalid maximum size {size}")]
    QueueMaxSize {
        /// Queue index.
        index: usize,
        /// The declared size.
        size: u16,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

/// The transport's interrupt: sets InterruptStatus bits and signals the irqfd.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    trigger: EventFdTrigger,
}

impl MmioInterrupt {
    fn new() -> Result<Self, MmioError> {
        Ok(MmioInterrupt {
            status: AtomicU32::new(0),
            trigger: EventFdTrigger::new_nonblocking().map_err(MmioError::EventFd)?,
        })
    }
    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }
    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        self.trigger.eventfd()
    }
    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> Result<(), VirtioError> {
        let bit = match kind {
            InterruptKind::Queue(_) => INT_VRING,
            InterruptKind::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.trigger.trigger().map_err(VirtioError::Interrupt)
    }
}

// Which part of a queue's setup the driver got wrong.
const BAD_SIZE: u8 = 1;
const BAD_DESC: u8 = 2;
const BAD_AVAIL: u8 = 4;
const BAD_USED: u8 = 8;

/// A virtio device behind the virtio-mmio register layout.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queues: Vec<Queue>,
    queue_errors: Vec<u8>,
    ring_addrs: Vec<[u64; 3]>,
    queue_evts: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    driver_acked_beyond_64: bool,
    status: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("queues", &self.queues.len())
            .field("status", &self.status)
            .field("driver_features", &self.driver_features)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Wraps `device`, with queue and interrupt eventfds of its own.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let max_sizes = device
            .lock()
            .expect("a device panicked while holding its lock")
            .queue_max_sizes()
            .to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (index, size) in max_sizes.into_iter().enumerate() {
            queues.push(Queue::new(size).map_err(|_| MmioError::QueueMaxSize { index, size })?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(MmioError::EventFd)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt::new()?),
            queue_errors: vec![0; queues.len()],
            ring_addrs: vec![[0; 3]; queues.len()],
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            driver_acked_beyond_64: false,
            status: 0,
        })
    }

    /// The eventfd to register as the device's irqfd.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// One eventfd per queue, in index order: register each as an ioeventfd on
    /// `base + QUEUE_NOTIFY_OFFSET` (4 bytes) with datamatch = its index.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The InterruptStatus register.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt.status()
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device
            .lock()
            .expect("a device panicked while holding its lock")
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.lock_device().device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.lock_device().avail_features();
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc_table() as u32),
            reg::QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            reg::QUEUE_AVAIL_LOW => self.selected_queue().map_or(0, |q| q.avail_ring() as u32),
            reg::QUEUE_AVAIL_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            reg::QUEUE_USED_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            reg::QUEUE_USED_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: a length of all ones says "absent".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.lock_device().config_generation(),
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn queue_setup_allowed(&self) -> bool {
        self.status & status::DRIVER_OK == 0 && self.status & status::FAILED == 0
    }

    fn set_queue_addr(&mut self, offset: u64, value: u32) {
        let index = self.queue_select as usize;
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        let (ring, flag) = match offset {
            reg::QUEUE_DESC_LOW | reg::QUEUE_DESC_HIGH => (0, BAD_DESC),
            reg::QUEUE_AVAIL_LOW | reg::QUEUE_AVAIL_HIGH => (1, BAD_AVAIL),
            _ => (2, BAD_USED),
        };
        // The address as the driver wrote it, so that a refused low half stays refused when
        // the high half follows.
        let written = &mut self.ring_addrs[index][ring];
        let high = matches!(
            offset,
            reg::QUEUE_DESC_HIGH | reg::QUEUE_AVAIL_HIGH | reg::QUEUE_USED_HIGH
        );
        *written = if high {
            (*written & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (*written & !0xffff_ffff) | u64::from(value)
        };
        let addr = GuestAddress(*written);
        let result = match ring {
            0 => queue.try_set_desc_table_address(addr),
            1 => queue.try_set_avail_ring_address(addr),
            _ => queue.try_set_used_ring_address(addr),
        };
        if result.is_ok() {
            self.queue_errors[index] &= !flag;
        } else {
            tracing::warn!("virtio-mmio: queue {index}: misaligned ring address refused");
            self.queue_errors[index] |= flag;
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => {
                let negotiating = self.status & status::DRIVER != 0
                    && self.status & (status::FEATURES_OK | status::FAILED) == 0;
                if !negotiating {
                    tracing::warn!("virtio-mmio: driver features written outside negotiation");
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    // Bits beyond 63 are never offered: acking one fails negotiation.
                    _ if value != 0 => self.driver_acked_beyond_64 = true,
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM if self.queue_setup_allowed() => {
                let index = self.queue_select as usize;
                if let Some(queue) = self.queues.get_mut(index) {
                    let ok = u16::try_from(value)
                        .ok()
                        .is_some_and(|size| queue.try_set_size(size).is_ok());
                    if ok {
                        self.queue_errors[index] &= !BAD_SIZE;
                    } else {
                        tracing::warn!("virtio-mmio: queue {index}: size {value} refused");
                        self.queue_errors[index] |= BAD_SIZE;
                    }
                }
            }
            reg::QUEUE_READY if self.queue_setup_allowed() => {
                if let Some(queue) = self.queues.get_mut(self.queue_select as usize) {
                    queue.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if self.queue_setup_allowed() =>
            {
                self.set_queue_addr(offset, value)
            }
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => {
                tracing::warn!("virtio-mmio: queue setup written after DRIVER_OK; ignored");
            }
            reg::QUEUE_NOTIFY => match self.queue_evts.get(value as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::error!("virtio-mmio: cannot signal queue {value}: {e}");
                    }
                }
                None => tracing::warn!("virtio-mmio: notify of unknown queue {value}"),
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.set_status(value),
            reg::SHM_SEL => {}
            _ => tracing::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    fn avail_features(&self) -> u64 {
        self.lock_device().avail_features()
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        if value & self.status != self.status {
            tracing::warn!(
                "virtio-mmio: status {value:#x} clears bits of {:#x}; ignored",
                self.status
            );
            return;
        }
        let order = [
            status::ACKNOWLEDGE,
            status::DRIVER,
            status::FEATURES_OK,
            status::DRIVER_OK,
        ];
        // Each bit needs every earlier one.
        let mut needed = 0;
        for bit in order {
            if value & bit != 0 && value & needed != needed {
                tracing::warn!("virtio-mmio: status {value:#x} out of order; ignored");
                return;
            }
            needed |= bit;
        }
        let added = value & !self.status;
        let mut new_status = value;
        if added & status::FEATURES_OK != 0 {
            let offered = self.avail_features();
            let unoffered = self.driver_features & !offered;
            if unoffered != 0
                || self.driver_acked_beyond_64
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                tracing::warn!(
                    "virtio-mmio: driver features {:#x} refused (offered {offered:#x})",
                    self.driver_features
                );
                // FEATURES_OK stays clear: the driver sees that and gives up.
                self.status = value & !(status::FEATURES_OK | status::DRIVER_OK);
                return;
            }
            self.lock_device().set_acked_features(self.driver_features);
        }
        if added & status::DRIVER_OK != 0 {
            if let Err(e) = self.activate() {
                tracing::error!("virtio-mmio: device activation failed: {e}");
                new_status |= status::DEVICE_NEEDS_RESET;
                self.status = new_status;
                if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                    tracing::error!("virtio-mmio: cannot raise the config interrupt: {e}");
                }
                return;
            }
        }
        self.status = new_status;
    }

    fn activate(&mut self) -> Result<(), VirtioError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut queue_evts = Vec::with_capacity(self.queues.len());
        for (index, queue) in self.queues.iter().enumerate() {
            if queue.ready() && (self.queue_errors[index] != 0 || !queue.is_valid(&self.mem)) {
                return Err(VirtioError::QueueNotValid { index });
            }
            let copy =
                Queue::try_from(queue.state()).map_err(|_| VirtioError::QueueNotValid { index })?;
            queues.push(copy);
            queue_evts.push(
                self.queue_evts[index]
                    .try_clone()
                    .map_err(VirtioError::EventFd)?,
            );
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.lock_device().activate(Activation {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt,
        })
    }

    fn reset(&mut self) {
        self.lock_device().reset();
        for queue in &mut self.queues {
            queue.reset();
        }
        self.queue_errors.fill(0);
        self.ring_addrs.fill([0; 3]);
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.driver_acked_beyond_64 = false;
        self.status = 0;
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.lock_device().read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte read of register {offset:#x}; only 4-byte reads are valid",
                data.len()
            );
            data.fill(0);
            return;
        };
        *bytes = self.read_register(offset).to_le_bytes();
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            if self.status & status::DRIVER == 0 || self.status & status::FAILED != 0 {
                tracing::warn!("virtio-mmio: config write before DRIVER; ignored");
                return;
            }
            self.lock_device()
                .write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte write of register {offset:#x}; only 4-byte writes are valid",
                data.len()
            );
            return;
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::conformance::{queue_layout, test_memory, GuestDriver};
    use crate::virtio::fake::{FakeDevice, FAKE_DEVICE_TYPE};

    const OFFERED: u64 = 1 << 0 | 1 << 5 | 1 << VIRTIO_F_VERSION_1 | 1 << 40;

    fn setup() -> (Arc<Mutex<FakeDevice>>, MmioTransport) {
        let dev = Arc::new(Mutex::new(FakeDevice::new(&[16, 8], OFFERED)));
        let t = MmioTransport::new(test_memory(), dev.clone()).expect("transport");
        (dev, t)
    }

    #[test]
    fn identity_registers_read_magic_version_device_and_vendor() {
        let (_, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert_eq!(g.read(reg::MAGIC), 0x7472_6976);
        assert_eq!(g.read(reg::VERSION), 2);
        assert_eq!(g.read(reg::DEVICE_ID), FAKE_DEVICE_TYPE);
        assert_eq!(g.read(reg::VENDOR_ID), VENDOR_ID);
    }

    #[test]
    fn device_features_are_read_through_the_selection_window() {
        let (_, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        g.write(reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(g.read(reg::DEVICE_FEATURES), 0b10_0001);
        g.write(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(g.read(reg::DEVICE_FEATURES), 1 | 1 << 8);
        g.write(reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(g.read(reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn driver_features_are_written_through_the_selection_window() {
        let (dev, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert!(g.negotiate(1 << 5 | 1 << VIRTIO_F_VERSION_1));
        assert_eq!(
            dev.lock().expect("lock").acked_features(),
            1 << 5 | 1 << VIRTIO_F_VERSION_1
        );
    }

    #[test]
    fn features_ok_is_refused_when_driver_acks_unoffered_features() {
        let (dev, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert!(!g.negotiate(OFFERED | 1 << 3));
        assert_eq!(g.read(reg::STATUS), status::ACKNOWLEDGE | status::DRIVER);
        assert_eq!(dev.lock().expect("lock").acked_features(), 0);
    }

    #[test]
    fn features_ok_is_refused_when_driver_acks_a_bit_beyond_64() {
        let (_, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        g.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        g.write(reg::DRIVER_FEATURES_SEL, 2);
        g.write(reg::DRIVER_FEATURES, 1);
        assert!(!g.negotiate(OFFERED));
    }

    #[test]
    fn features_ok_is_refused_without_version_1() {
        let (_, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert!(!g.negotiate(1 << 5));
    }

    #[test]
    fn driver_features_after_features_ok_are_ignored() {
        let (dev, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert!(g.negotiate(1 << VIRTIO_F_VERSION_1));
        g.write(reg::DRIVER_FEATURES_SEL, 0);
        g.write(reg::DRIVER_FEATURES, 1);
        g.driver_ok();
        assert_eq!(
            dev.lock().expect("lock").acked_features(),
            1 << VIRTIO_F_VERSION_1
        );
    }

    #[test]
    fn queue_registers_reach_the_queues_given_at_activation() {
        let (dev, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert!(g.negotiate(OFFERED));
        g.write(reg::QUEUE_SEL, 1);
        assert_eq!(g.read(reg::QUEUE_NUM_MAX), 8);
        g.write(reg::QUEUE_SEL, 2);
        assert_eq!(g.read(reg::QUEUE_NUM_MAX), 0, "no queue 2");
        let (desc, avail, used) = queue_layout(0);
        g.setup_queue(0, 4, desc, avail, used);
        assert_eq!(g.read(reg::QUEUE_READY), 1);
        assert_eq!(g.read(reg::QUEUE_DESC_LOW), desc as u32);
        let s = g.driver_ok();
        assert_eq!(s & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(s & status::DRIVER_OK, 0);

        let dev = dev.lock().expect("lock");
        let act = dev.activation().expect("activated");
        assert_eq!(act.queues.len(), 2);
        assert_eq!(act.queue_evts.len(), 2);
        let q = &act.queues[0];
        assert!(q.ready());
        assert_eq!(q.size(), 4);
        assert_eq!(
            (q.desc_table(), q.avail_ring(), q.used_ring()),
            (desc, avail, used)
        );
        assert!(!act.queues[1].ready(), "queue 1 was not set up");
    }

    #[test]
    fn status_bits_out_of_order_are_ignored() {
        let (dev, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        g.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        assert_eq!(g.read(reg::STATUS), 0);
        g.write(reg::STATUS, status::ACKNOWLEDGE);
        g.write(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(
            g.read(reg::STATUS),
            status::ACKNOWLEDGE,
            "DRIVER_OK needs FEATURES_OK"
        );
        g.write(reg::STATUS, status::DRIVER);
        assert_eq!(
            g.read(reg::STATUS),
            status::ACKNOWLEDGE,
            "bits cannot be cleared"
        );
        assert!(!dev.lock().expect("lock").is_activated());
    }

    #[test]
    fn failed_is_accepted_at_any_time() {
        let (_, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        g.write(reg::STATUS, status::ACKNOWLEDGE);
        g.write(reg::STATUS, status::FAILED);
        assert_eq!(g.read(reg::STATUS), status::ACKNOWLEDGE | status::FAILED);
    }

    #[test]
    fn writing_zero_to_status_resets_device_queues_and_features() {
        let (dev, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert_ne!(g.init() & status::DRIVER_OK, 0);
        g.write(reg::QUEUE_SEL, 1);
        g.reset();
        assert_eq!(g.read(reg::STATUS), 0);
        assert_eq!(g.read(reg::QUEUE_READY), 0, "queue select is back to 0");
        g.write(reg::QUEUE_SEL, 0);
        assert_eq!(g.read(reg::QUEUE_READY), 0);
        assert_eq!(g.read(reg::QUEUE_DESC_LOW), 0);
        let d = dev.lock().expect("lock");
        assert_eq!(d.resets(), 1);
        assert!(!d.is_activated());
        assert_eq!(d.acked_features(), 0);
    }

    #[test]
    fn queue_setup_after_driver_ok_is_ignored() {
        let (_, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert_ne!(g.init() & status::DRIVER_OK, 0);
        g.write(reg::QUEUE_SEL, 0);
        g.write(reg::QUEUE_READY, 0);
        g.write(reg::QUEUE_DESC_LOW, 0x2000);
        assert_eq!(g.read(reg::QUEUE_READY), 1);
        assert_eq!(g.read(reg::QUEUE_DESC_LOW), queue_layout(0).0 as u32);
    }

    #[test]
    fn config_space_reads_and_writes_reach_the_device() {
        let (_, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert_eq!(g.read_config(0, 4), 0x1122_3344u32.to_le_bytes());
        assert_eq!(g.read_config(2, 1), [0x22]);
        g.0.write(CONFIG_OFFSET + 4, &[9, 8]);
        assert_eq!(g.read_config(4, 4), [0, 0, 0, 0], "ignored before DRIVER");
        g.write(reg::STATUS, status::ACKNOWLEDGE);
        g.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        g.0.write(CONFIG_OFFSET + 4, &[9, 8]);
        g.0.write(CONFIG_OFFSET, &[0xff]);
        assert_eq!(g.read_config(0, 8), [0x44, 0x33, 0x22, 0x11, 9, 8, 0, 0]);
        assert_eq!(
            g.read_config(0x100, 2),
            [0, 0],
            "past the end reads as zero"
        );
    }

    #[test]
    fn device_interrupts_set_status_bits_and_signal_the_irqfd_until_acked() {
        let (dev, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert_ne!(g.init() & status::DRIVER_OK, 0);
        let interrupt = dev
            .lock()
            .expect("lock")
            .activation()
            .expect("active")
            .interrupt
            .clone();
        interrupt
            .trigger(InterruptKind::Queue(1))
            .expect("queue irq");
        interrupt
            .trigger(InterruptKind::Config)
            .expect("config irq");
        assert_eq!(g.read(reg::INTERRUPT_STATUS), INT_VRING | INT_CONFIG);
        assert_eq!(g.0.interrupt_evt().read().expect("irqfd signalled"), 2);
        g.write(reg::INTERRUPT_ACK, INT_VRING);
        assert_eq!(g.read(reg::INTERRUPT_STATUS), INT_CONFIG);
        g.write(reg::INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(g.read(reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_through_the_bus_signals_the_queue_eventfd() {
        let (dev, mut t) = setup();
        let mut g = GuestDriver(&mut t);
        assert_ne!(g.init() & status::DRIVER_OK, 0);
        g.write(reg::QUEUE_NOTIFY, 1);
        g.write(reg::QUEUE_NOTIFY, 7);
        assert_eq!(t.queue_evts()[1].read().expect("queue 1 notified"), 1);
        assert!(
            t.queue_evts()[0].read().is_err(),
            "queue 0 was not notified"
        );
        g = GuestDriver(&mut t);
        g.write(reg::QUEUE_NOTIFY, 0);
        let d = dev.lock().expect("lock");
        let device_copy = &d.activation().expect("active").queue_evts[0];
        assert_eq!(device_copy.read().expect("same eventfd"), 1);
    }

    #[test]
    fn accesses_of_other_widths_to_registers_are_ignored() {
        let (_, mut t) = setup();
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(reg::STATUS, &[1]);
        assert_eq!(t.status(), 0);
    }

    #[test]
    fn queue_with_invalid_max_size_cannot_be_built() {
        let dev = Arc::new(Mutex::new(FakeDevice::new(&[16, 12], OFFERED)));
        assert!(matches!(
            MmioTransport::new(test_memory(), dev),
            Err(MmioError::QueueMaxSize { index: 1, size: 12 })
        ));
    }

    crate::virtio_device_conformance_tests!(FakeDevice::new(&[16, 8], OFFERED));
}
