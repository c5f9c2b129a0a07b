//! The balloon in the VMM's event loop (`event_manager::MutEventSubscriber`).
//!
//! The event loop registers the balloon once, before the guest runs. Activation happens later
//! on a vCPU thread: the device then signals its activate eventfd, and this handler adds the
//! queue eventfds to the loop (and, after a reset, removes the old ones). The `*_event`
//! methods only read their fd and hand over to the device's `handle_*` methods.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::device::{Balloon, QueueRole};

const DATA_ACTIVATE: u32 = 0;
const DATA_STATS_TIMER: u32 = 1;
const DATA_QUEUE_BASE: u32 = 16;

impl Balloon {
    fn activate_event(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.activate_evt.read() {
            tracing::debug!("balloon: activate eventfd read: {e}");
        }
        self.sync_registrations(ops);
    }

    /// Removes the queue eventfds of an earlier activation and adds the current ones.
    fn sync_registrations(&mut self, ops: &mut EventOps) {
        for evt in self.retired_evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                tracing::warn!("balloon: cannot remove a queue eventfd: {e}");
            }
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.evts_registered {
            return;
        }
        for (role, evt) in &active.evts {
            let data = DATA_QUEUE_BASE + *role as u32;
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                tracing::error!("balloon: cannot add the {role:?} queue to the event loop: {e}");
            }
        }
        active.evts_registered = true;
    }

    fn queue_event(&mut self, role: QueueRole) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        if let Some((_, evt)) = active.evts.iter().find(|(r, _)| *r == role) {
            if let Err(e) = evt.read() {
                tracing::debug!("balloon: {role:?} queue eventfd read: {e}");
            }
        }
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
        let sources = [
            Events::with_data(&self.activate_evt, DATA_ACTIVATE, EventSet::IN),
            Events::with_data(&self.stats_timer, DATA_STATS_TIMER, EventSet::IN),
        ];
        for events in sources {
            if let Err(e) = ops.add(events) {
                tracing::error!("balloon: cannot join the event loop: {e}");
            }
        }
        // Registered after the guest already activated the device: catch up.
        self.sync_registrations(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DATA_ACTIVATE => self.activate_event(ops),
            DATA_STATS_TIMER => self.stats_timer_event(),
            data => match QueueRole::ALL.get((data.wrapping_sub(DATA_QUEUE_BASE)) as usize) {
                Some(role) => self.queue_event(*role),
                None => tracing::warn!("balloon: unexpected event {data}"),
            },
        }
    }
}
