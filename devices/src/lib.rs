//! memvisor's device model.
//!
//! - [`bus`]: the port-I/O and MMIO buses a vCPU exit is dispatched on, and the [`BusDevice`]
//!   trait every device on them implements.
//! - [`legacy`]: the 16550 serial console (vm-superio) and the i8042 controller (reset only).
//! - [`interrupt`]: the edge-triggered interrupt a device raises (an eventfd that the `vmm`
//!   crate registers as a KVM irqfd).
//! - [`virtio`]: the `VirtioDevice` trait, the virtio-mmio transport, the virtio interrupt and
//!   the device lifecycle (activation, reset, the queue eventfds in an event loop) every virtio
//!   device shares; with the `test-utils` feature, fakes and the conformance tests every virtio
//!   device runs.
//!
//! The crate knows nothing about KVM; the `vmm` crate does the wiring.

pub mod bus;
pub mod interrupt;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use interrupt::EventFdTrigger;
