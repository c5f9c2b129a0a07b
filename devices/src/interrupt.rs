//! Interrupt triggers.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt line backed by an eventfd. The `vmm` crate registers the eventfd
/// with KVM as an irqfd, so a write injects the interrupt without leaving the kernel.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
    /// A fresh non-blocking eventfd.
    pub fn new_nonblocking() -> io::Result<Self> {
        Ok(EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK)?))
    }
    /// The eventfd, to register as an irqfd or to read in tests.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
    /// Raises the interrupt.
    pub fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        EventFdTrigger::trigger(self)
    }
}
