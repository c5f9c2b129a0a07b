//! The balloon in the VMM's event loop (`event_manager::MutEventSubscriber`).
//!
//! The queue eventfds join and leave the loop through the device's
//! [`DeviceLifecycle`](devices::virtio::DeviceLifecycle); what is the balloon's own is the
//! stats timer and which queue is for what. The `*_event` methods only read their fd and hand
//! over to the device's `handle_*` methods.

use devices::virtio::lifecycle::DEVICE_EVENT_DATA;
use devices::virtio::DeviceEvent;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::device::{Balloon, QueueRole};

const DATA_STATS_TIMER: u32 = DEVICE_EVENT_DATA.start;

impl Balloon {
    fn queue_event(&mut self, index: usize) {
        let Some(role) = self
            .lifecycle
            .active()
            .and_then(|active| active.roles.get(index).copied())
        else {
            return;
        };
        let result = match role {
            QueueRole::Inflate | QueueRole::Deflate => self.handle_page_queue(role),
            QueueRole::Stats => self.handle_stats_queue(),
            QueueRole::Reporting => self.handle_reporting_queue(),
        };
        if let Err(e) = result {
            tracing::error!("balloon: {role:?} queue: {e}");
        }
    }

    fn stats_timer_event(&mut self) {
        // Non-blocking: after a reset disarmed the timer there may be nothing to read.
        match self.stats_timer.wait() {
            Ok(_) => {
                if let Err(e) = self.request_stats() {
                    tracing::error!("balloon: stats request: {e}");
                }
            }
            Err(e) => tracing::debug!("balloon: stats timer read: {e}"),
        }
    }
}

impl MutEventSubscriber for Balloon {
    fn init(&mut self, ops: &mut EventOps) {
        let timer = Events::with_data(&self.stats_timer, DATA_STATS_TIMER, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            tracing::error!("balloon: cannot add the stats timer to the event loop: {e}");
        }
        self.lifecycle.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.lifecycle.process(&events, ops) {
            DeviceEvent::Handled => {}
            DeviceEvent::Queue(index) => self.queue_event(index),
            DeviceEvent::Device(DATA_STATS_TIMER) => self.stats_timer_event(),
            DeviceEvent::Device(data) => tracing::warn!("balloon: unexpected event {data}"),
        }
    }
}
