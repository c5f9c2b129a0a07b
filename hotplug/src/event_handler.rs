//! The device in the VMM's event loop (`event_manager::MutEventSubscriber`).
//!
//! The event loop registers the device once, before the guest runs. Activation happens later on
//! a vCPU thread: the device then signals its activate eventfd, and this handler adds the queue
//! eventfd to the loop (and, after a reset, removes the old one). The `*_event` methods only
//! read their fd and hand over to [`VirtioMem::handle_queue`].

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::device::VirtioMem;

const DATA_ACTIVATE: u32 = 0;
const DATA_QUEUE: u32 = 1;

impl VirtioMem {
    fn activate_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activate_evt.read() {
            tracing::debug!("virtio-mem: activate eventfd read: {e}");
        }
        self.sync_registrations(ops);
    }

    /// Removes the queue eventfd of an earlier activation and adds the current one.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.retired_evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                tracing::warn!("virtio-mem: cannot remove a queue eventfd: {e}");
            }
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.evt_registered {
            return;
        }
        if let Err(e) = ops.add(Events::with_data(&active.evt, DATA_QUEUE, EventSet::IN)) {
            tracing::error!("virtio-mem: cannot add the queue to the event loop: {e}");
        }
        active.evt_registered = true;
    }

    fn queue_event(&mut self) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if let Err(e) = active.evt.read() {
            tracing::debug!("virtio-mem: queue eventfd read: {e}");
        }
        if let Err(e) = self.handle_queue() {
            tracing::error!("virtio-mem: queue: {e}");
        }
    }
}

impl MutEventSubscriber for VirtioMem {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.activate_evt,
            DATA_ACTIVATE,
            EventSet::IN,
        )) {
            tracing::error!("virtio-mem: cannot join the event loop: {e}");
        }
        // Registered after the guest already activated the device: catch up.
        self.sync_registrations(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DATA_ACTIVATE => self.activate_event(ops),
            DATA_QUEUE => self.queue_event(),
            data => tracing::warn!("virtio-mem: unexpected event {data}"),
        }
    }
}
