//! The 16550A serial console (vm-superio) on the port-I/O bus.

use std::io::{self, Write};

use vm_superio::serial::NoEvents;

use crate::bus::BusDevice;
use crate::interrupt::EventFdTrigger;

/// Base port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Where the guest's console output goes.
pub type SerialOutput = Box<dyn Write + Send>;

/// A 16550A UART.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(irq: EventFdTrigger, out: SerialOutput) -> Self {
        Serial {
            inner: vm_superio::Serial::new(irq, out),
        }
    }

    /// Queues host input for the guest. Returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let room = self.inner.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return Ok(0);
        }
        self.inner
            .enqueue_raw_bytes(&bytes[..n])
            .map_err(|e| io::Error::other(format!("serial input: {e:?}")))
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.inner.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.inner.write(off, *value) {
                tracing::debug!("serial: write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output_and_input_raises_the_irq() {
        let sink = Sink::default();
        let irq = EventFdTrigger::new_nonblocking().expect("eventfd");
        let irq_fd = irq.eventfd().try_clone().expect("clone");
        let mut serial = Serial::new(irq, Box::new(sink.clone()));
        for b in b"hi" {
            serial.write(0, &[*b]);
        }
        assert_eq!(sink.0.lock().expect("lock").as_slice(), b"hi");

        serial.write(1, &[0x01]); // IER: received-data interrupt on
        assert_eq!(serial.enqueue_input(b"x").expect("enqueue"), 1);
        assert!(irq_fd.read().is_ok(), "input raised the interrupt");
        let mut b = [0u8];
        serial.read(0, &mut b);
        assert_eq!(b[0], b'x');
    }

    #[test]
    fn input_beyond_the_fifo_is_not_accepted() {
        let irq = EventFdTrigger::new_nonblocking().expect("eventfd");
        let mut serial = Serial::new(irq, Box::new(io::sink()));
        let big = vec![b'a'; 1000];
        let n = serial.enqueue_input(&big).expect("enqueue");
        assert_eq!(n, 64);
        assert_eq!(serial.enqueue_input(&big).expect("full"), 0);
    }

    #[test]
    fn wide_accesses_are_ignored() {
        let irq = EventFdTrigger::new_nonblocking().expect("eventfd");
        let mut serial = Serial::new(irq, Box::new(io::sink()));
        let mut b = [0u8; 2];
        serial.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        serial.write(0, &[1, 2]);
    }
}
