//! Fakes for tests: an interrupt and a device that record what they were asked.

use std::sync::Mutex;

use super::{
    read_config_bytes, Activation, InterruptKind, VirtioDevice, VirtioDeviceState, VirtioError,
    VirtioInterrupt,
};

/// A [`VirtioInterrupt`] that records every trigger.
#[derive(Debug, Default)]
pub struct FakeInterrupt {
    raised: Mutex<Vec<InterruptKind>>,
}

impl FakeInterrupt {
    /// A fake with nothing recorded.
    pub fn new() -> Self {
        Self::default()
    }
    /// Every interrupt raised so far, in order.
    pub fn raised(&self) -> Vec<InterruptKind> {
        self.raised.lock().expect("fake interrupt lock").clone()
    }
    /// How many times `kind` was raised.
    pub fn count(&self, kind: InterruptKind) -> usize {
        self.raised().iter().filter(|k| **k == kind).count()
    }
    /// Forgets what was recorded.
    pub fn clear(&self) {
        self.raised.lock().expect("fake interrupt lock").clear();
    }
}

impl VirtioInterrupt for FakeInterrupt {
    fn trigger(&self, kind: InterruptKind) -> Result<(), VirtioError> {
        self.raised.lock().expect("fake interrupt lock").push(kind);
        Ok(())
    }
}

/// A [`VirtioDevice`] that records what the transport asks of it. Its configuration space is
/// 8 bytes: the first 4 read-only (`0x11223344`), the last 4 writable.
#[derive(Debug)]
pub struct FakeDevice {
    virtio: VirtioDeviceState,
    config: [u8; 8],
    activation: Option<Activation>,
    resets: usize,
}

/// The device id [`FakeDevice`] reports.
pub const FAKE_DEVICE_TYPE: u32 = 0xff;

impl FakeDevice {
    /// A device with queues of `queue_max_sizes` offering `avail_features` (plus VERSION_1).
    pub fn new(queue_max_sizes: &[u16], avail_features: u64) -> Self {
        let mut config = [0u8; 8];
        config[..4].copy_from_slice(&0x1122_3344u32.to_le_bytes());
        FakeDevice {
            virtio: VirtioDeviceState::new(avail_features, queue_max_sizes.to_vec()),
            config,
            activation: None,
            resets: 0,
        }
    }
    /// What the device got at its last activation.
    pub fn activation(&self) -> Option<&Activation> {
        self.activation.as_ref()
    }
    /// How many times the device was reset.
    pub fn resets(&self) -> usize {
        self.resets
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        FAKE_DEVICE_TYPE
    }
    fn virtio_state(&self) -> &VirtioDeviceState {
        &self.virtio
    }
    fn virtio_state_mut(&mut self) -> &mut VirtioDeviceState {
        &mut self.virtio
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            if (4..8).contains(&at) {
                self.config[at as usize] = *b;
            }
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<(), VirtioError> {
        self.check_activation(&activation)?;
        self.activation = Some(activation);
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.activation.is_some()
    }
    fn reset(&mut self) {
        *self = FakeDevice {
            resets: self.resets + 1,
            ..FakeDevice::new(self.virtio.queue_max_sizes(), self.virtio.avail_features())
        };
    }
}
