//! The device in the VMM's event loop (`event_manager::MutEventSubscriber`).
//!
//! The queue eventfd joins and leaves the loop through the device's
//! [`DeviceLifecycle`](devices::virtio::DeviceLifecycle); a notification is handed over to
//! [`VirtioMem::handle_queue`].

use devices::virtio::DeviceEvent;
use event_manager::{EventOps, Events, MutEventSubscriber};

use crate::device::VirtioMem;

impl MutEventSubscriber for VirtioMem {
    fn init(&mut self, ops: &mut EventOps) {
        self.lifecycle.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.lifecycle.process(&events, ops) {
            DeviceEvent::Handled => {}
            DeviceEvent::Queue(_) => {
                if let Err(e) = self.handle_queue() {
                    tracing::error!("virtio-mem: queue: {e}");
                }
            }
            DeviceEvent::Device(data) => tracing::warn!("virtio-mem: unexpected event {data}"),
        }
    }
}
