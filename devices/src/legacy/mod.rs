//! Legacy PC devices on the port-I/O bus.

mod i8042;
mod serial;

pub use i8042::{I8042, I8042_BASE};
pub use serial::{Serial, SerialOutput, COM1_BASE, COM1_IRQ};
