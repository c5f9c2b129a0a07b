//! The virtio layer: the [`VirtioDevice`] trait every virtio device implements, the
//! virtio-mmio transport ([`mmio`]), the interrupt a device raises ([`VirtioInterrupt`]) and the
//! device lifecycle every device shares ([`lifecycle`]).
//!
//! A device never sees the transport. At activation it receives an [`Activation`]: guest memory,
//! its queues, one eventfd per queue (the VMM registers the transport's copies as ioeventfds) and
//! the interrupt. What happens to those between activation and reset — and how the queue
//! eventfds get into and out of an `event-manager` loop although activation happens on a vCPU
//! thread — is written once, in [`lifecycle`]; every device keeps a [`DeviceLifecycle`].
//!
//! With the `test-utils` feature, [`fake`] has an interrupt and a device that record what they
//! are asked, and [`conformance`] the tests stamped onto every device.

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;
pub mod lifecycle;
pub mod mmio;

use std::fmt::Debug;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use lifecycle::{DeviceEvent, DeviceLifecycle};
pub use mmio::{MmioError, MmioInterrupt, MmioTransport};

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Feature bit: the device complies with virtio 1.x (mandatory for virtio-mmio version 2).
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Virtio device ids (virtio 1.x, 5).
pub mod device_type {
    /// Traditional memory balloon.
    pub const BALLOON: u32 = 5;
    /// Memory device (virtio-mem).
    pub const MEM: u32 = 24;
}

/// Errors at the device/transport boundary.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// The device was given a different number of queues or queue eventfds than it has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues or eventfds it was given.
        got: usize,
    },
    /// A queue the device needs was not set up, or its rings lie outside guest memory.
    #[error("queue {index} is not ready or not valid")]
    QueueNotValid {
        /// Queue index.
        index: usize,
    },
    /// The device is already active.
    #[error("the device is already active")]
    AlreadyActive,
    /// Raising an interrupt failed.
    #[error("cannot raise the interrupt")]
    Interrupt(#[source] std::io::Error),
    /// Signalling an eventfd failed.
    #[error("cannot signal an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// Buffers were used in queue `n`.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// The interrupt a device raises, as the transport implements it. Tests use
/// `fake::FakeInterrupt` (feature `test-utils`), which records each call.
pub trait VirtioInterrupt: Send + Sync + Debug {
    /// Raises an interrupt of `kind`.
    fn trigger(&self, kind: InterruptKind) -> Result<(), VirtioError>;
}

/// What a device receives when the guest driver sets `DRIVER_OK`, and nothing else.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The device's queues, in index order (ready or not: the device checks the ones it needs).
    pub queues: Vec<Queue>,
    /// One eventfd per queue, signalled when the driver notifies that queue.
    pub queue_evts: Vec<EventFd>,
    /// The interrupt the device raises.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

/// What every virtio device keeps the same way: the features it offers and those the driver
/// acknowledged, its queue sizes and its configuration generation. A device embeds one and
/// hands it out through [`VirtioDevice::virtio_state`]; the trait's provided methods do the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VirtioDeviceState {
    avail_features: u64,
    acked_features: u64,
    queue_max_sizes: Vec<u16>,
    config_generation: u32,
}

impl VirtioDeviceState {
    /// A device offering `avail_features` plus [`VIRTIO_F_VERSION_1`], with one queue of each
    /// size in `queue_max_sizes`; nothing acknowledged, configuration generation 0.
    pub fn new(avail_features: u64, queue_max_sizes: Vec<u16>) -> Self {
        VirtioDeviceState {
            avail_features: avail_features | 1 << VIRTIO_F_VERSION_1,
            acked_features: 0,
            queue_max_sizes,
            config_generation: 0,
        }
    }
    /// The features the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }
    /// The features the driver acknowledged (a subset of [`Self::avail_features`]).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }
    /// Whether the driver acknowledged feature `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        self.acked_features & (1 << bit) != 0
    }
    /// Records the driver's features; bits the device did not offer are dropped.
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }
    /// The maximum size of each queue.
    pub fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }
    /// The configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }
    /// Records that the device changed its configuration (bumps the generation).
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
    }
    /// For a device reset: forgets the acknowledged features. The generation keeps counting.
    pub fn reset(&mut self) {
        self.acked_features = 0;
    }
}

/// A virtio device, independent of its transport.
///
/// Writing a device:
/// - embed a [`VirtioDeviceState`] (built with [`VirtioDeviceState::new`]) and return it from
///   [`Self::virtio_state`] and [`Self::virtio_state_mut`]: feature negotiation, the queue sizes
///   and the configuration generation then come from the provided methods. Call
///   [`VirtioDeviceState::config_changed`] when the device changes its configuration, and
///   [`VirtioDeviceState::reset`] from [`Self::reset`];
/// - implement [`Self::read_config`] with [`read_config_bytes`] over the device's configuration
///   bytes, and [`Self::write_config`] for the fields the driver may write;
/// - start [`Self::activate`] with [`Self::check_activation`], then check the queues the device
///   needs ([`VirtioError::QueueNotValid`]).
pub trait VirtioDevice: Send {
    /// The virtio device id ([`device_type`]).
    fn device_type(&self) -> u32;
    /// The device's features, queue sizes and configuration generation.
    fn virtio_state(&self) -> &VirtioDeviceState;
    /// The same, to change.
    fn virtio_state_mut(&mut self) -> &mut VirtioDeviceState;
    /// The maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.virtio_state().queue_max_sizes()
    }
    /// The features the device offers (includes [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64 {
        self.virtio_state().avail_features()
    }
    /// The features the driver acknowledged, masked by [`Self::avail_features`].
    fn acked_features(&self) -> u64 {
        self.virtio_state().acked_features()
    }
    /// Records the driver's features; bits the device did not offer are dropped.
    fn set_acked_features(&mut self, features: u64) {
        self.virtio_state_mut().set_acked_features(features);
    }
    /// Reads device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset`; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The configuration generation: changes whenever the device changes its configuration.
    fn config_generation(&self) -> u32 {
        self.virtio_state().config_generation()
    }
    /// Starts the device. On error the device stays inactive.
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError>;
    /// Whether [`Self::activate`] succeeded since the last reset.
    fn is_activated(&self) -> bool;
    /// Returns the device to its state before feature negotiation and activation.
    fn reset(&mut self);
    /// The checks every [`Self::activate`] starts with: the device is not active yet
    /// ([`VirtioError::AlreadyActive`]) and `activation` has one queue and one eventfd per
    /// entry of [`Self::queue_max_sizes`] ([`VirtioError::QueueCount`]).
    fn check_activation(&self, activation: &Activation) -> Result<(), VirtioError> {
        if self.is_activated() {
            return Err(VirtioError::AlreadyActive);
        }
        let expected = self.queue_max_sizes().len();
        let (queues, evts) = (activation.queues.len(), activation.queue_evts.len());
        if queues != expected || evts != expected {
            return Err(VirtioError::QueueCount {
                expected,
                got: queues.min(evts),
            });
        }
        Ok(())
    }
}

/// The guest command-line fragment that announces a virtio-mmio device of `size_bytes` at `base`
/// using interrupt `irq` (Linux `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`).
pub fn mmio_cmdline_fragment(base: u64, size_bytes: u64, irq: u32) -> String {
    if size_bytes.is_multiple_of(1024) {
        format!("virtio_mmio.device={}K@{base:#x}:{irq}", size_bytes / 1024)
    } else {
        format!("virtio_mmio.device={size_bytes}@{base:#x}:{irq}")
    }
}

/// Copies `config[offset..]` into `data`; bytes past the end of `config` read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_fragment_uses_kib_and_hex_base() {
        assert_eq!(
            mmio_cmdline_fragment(0xd000_0000, 0x1000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            mmio_cmdline_fragment(0x1000, 100, 12),
            "virtio_mmio.device=100@0x1000:12"
        );
    }
}
