//! The i8042 keyboard controller, reduced to what a VMM needs: the CPU reset command.
//!
//! Linux reboots through it (`reboot=k`): writing `0xfe` to the command port pulses the reset
//! line, which memvisor turns into a clean VM exit.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Base port of the controller (data port 0x60; command/status port 0x64).
pub const I8042_BASE: u16 = 0x60;
const DATA: u64 = 0;
const COMMAND: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller.
#[derive(Debug)]
pub struct I8042 {
    reset_evt: EventFd,
}

impl I8042 {
    /// A controller that signals `reset_evt` when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042 { reset_evt }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // No keyboard: the status register says "output buffer empty", data reads zero.
        match offset {
            DATA | COMMAND => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset_evt.write(1) {
                tracing::error!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_the_vmm() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let mut dev = I8042::new(evt.try_clone().expect("clone"));
        dev.write(COMMAND, &[0xd1]);
        assert!(evt.read().is_err(), "other commands do not reset");
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().expect("reset signalled"), 1);
    }
}
