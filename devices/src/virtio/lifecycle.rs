//! The life of a virtio device between its transport and an event loop, written once for every
//! device: [`DeviceLifecycle`].
//!
//! A device is *inactive* until the guest driver sets `DRIVER_OK`; the transport then calls
//! [`VirtioDevice::activate`](super::VirtioDevice::activate) on a vCPU thread, and the device is
//! *activated* with what the guest gave it (its own state `A`: memory, queues, interrupt) and
//! one eventfd per queue. A reset makes it inactive again.
//!
//! The queue eventfds must be read by someone. With `event-manager` (as the `vmm` crate runs
//! devices) the device joins the event loop once, before the guest runs, and the loop must add
//! the queue eventfds when the device is activated and remove them when it is reset — but both
//! happen on a vCPU thread, not on the loop's. So the lifecycle owns an *activate eventfd*:
//! [`DeviceLifecycle::activate`] and [`DeviceLifecycle::reset`] signal it, and the loop, woken
//! by it, brings its registrations in line ([`DeviceLifecycle::init`],
//! [`DeviceLifecycle::process`]). The eventfds of an earlier activation stay open until the
//! loop has removed them, so an fd number is never reused under a stale registration.
//!
//! An embedder that runs devices some other way needs none of that: it reads
//! [`DeviceLifecycle::queue_evts`] (and may wait on [`DeviceLifecycle::activate_evt`] to learn
//! when they change) and calls the device's queue handling itself.
//!
//! Writing a device with it: keep a `DeviceLifecycle<MyActiveState>`; in `activate`, check the
//! activation, build the state and call [`DeviceLifecycle::activate`]; in `reset`, call
//! [`DeviceLifecycle::reset`]; implement `is_activated` with
//! [`DeviceLifecycle::is_activated`]; in `MutEventSubscriber::init` call
//! [`DeviceLifecycle::init`] (and add the device's own sources with event data in
//! [`DEVICE_EVENT_DATA`]); in `process` match on what [`DeviceLifecycle::process`] returns.

use std::io;
use std::ops::Range;

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioError;

/// The event data [`DeviceLifecycle::init`] gives the activate eventfd.
pub const ACTIVATE_EVENT_DATA: u32 = 0;
/// The event data a device may give its own event sources (timers and the like).
pub const DEVICE_EVENT_DATA: Range<u32> = 1..QUEUE_EVENT_DATA_BASE;
/// The event data of queue `i`'s eventfd is `QUEUE_EVENT_DATA_BASE + i`.
pub const QUEUE_EVENT_DATA_BASE: u32 = 0x1_0000;

/// What an event the device's subscriber got means, once [`DeviceLifecycle::process`] has
/// done the lifecycle's part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    /// The lifecycle handled it (an activation or a reset); the device has nothing to do.
    Handled,
    /// The driver notified queue `index` (its transport index); its eventfd was read. Only
    /// returned while the device is activated and has such a queue.
    Queue(usize),
    /// An event of the device's own (event data in [`DEVICE_EVENT_DATA`]), left to it.
    Device(u32),
}

/// The queue eventfds of an activation, and whether the event loop has them.
#[derive(Debug)]
struct Activated<A> {
    state: A,
    queue_evts: Vec<EventFd>,
    registered: bool,
}

/// Whether a device is activated, with what, and the event-loop bookkeeping that goes with it.
/// See the [module documentation](self).
#[derive(Debug)]
pub struct DeviceLifecycle<A> {
    /// The device's name in log lines.
    name: &'static str,
    activate_evt: EventFd,
    activated: Option<Activated<A>>,
    /// Queue eventfds of an earlier activation the event loop still has: removed at its next
    /// sync, closed after that.
    retired_evts: Vec<EventFd>,
}

impl<A> DeviceLifecycle<A> {
    /// An inactive device called `name` in log lines, with a fresh non-blocking activate
    /// eventfd.
    pub fn new(name: &'static str) -> io::Result<Self> {
        Ok(DeviceLifecycle {
            name,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            activated: None,
            retired_evts: Vec::new(),
        })
    }

    /// Records an activation: the device's `state` and one eventfd per queue, in transport
    /// index order. Signals the activate eventfd so that an event loop adds the queue eventfds.
    /// A device already activated is refused and keeps its activation.
    pub fn activate(&mut self, state: A, queue_evts: Vec<EventFd>) -> Result<(), VirtioError> {
        if self.activated.is_some() {
            return Err(VirtioError::AlreadyActive);
        }
        self.activated = Some(Activated {
            state,
            queue_evts,
            registered: false,
        });
        self.activate_evt.write(1).map_err(VirtioError::EventFd)
    }

    /// Makes the device inactive and returns what its activation held (`None` if it was not
    /// activated). Queue eventfds an event loop registered are kept until it removes them, and
    /// it is told through the activate eventfd.
    pub fn reset(&mut self) -> Option<A> {
        let activated = self.activated.take()?;
        if activated.registered {
            self.retired_evts.extend(activated.queue_evts);
            if let Err(e) = self.activate_evt.write(1) {
                tracing::error!(
                    "{}: cannot tell the event loop about the reset: {e}",
                    self.name
                );
            }
        }
        Some(activated.state)
    }

    /// Whether the device is activated.
    pub fn is_activated(&self) -> bool {
        self.activated.is_some()
    }

    /// The device's state of its current activation.
    pub fn active(&self) -> Option<&A> {
        self.activated.as_ref().map(|a| &a.state)
    }

    /// The same, to change.
    pub fn active_mut(&mut self) -> Option<&mut A> {
        self.activated.as_mut().map(|a| &mut a.state)
    }

    /// The queue eventfds of the current activation, in transport index order; empty while
    /// inactive. For an embedder that reads them without `event-manager`.
    pub fn queue_evts(&self) -> &[EventFd] {
        self.activated
            .as_ref()
            .map_or(&[], |a| a.queue_evts.as_slice())
    }

    /// The eventfd signalled at every activation and every reset of an activation an event
    /// loop had registered.
    pub fn activate_evt(&self) -> &EventFd {
        &self.activate_evt
    }

    /// For `MutEventSubscriber::init`: adds the activate eventfd to the loop and, if the device
    /// was activated before it joined, its queue eventfds.
    pub fn init(&mut self, ops: &mut EventOps) {
        let events = Events::with_data(&self.activate_evt, ACTIVATE_EVENT_DATA, EventSet::IN);
        if let Err(e) = ops.add(events) {
            tracing::error!("{}: cannot join the event loop: {e}", self.name);
        }
        self.sync(ops);
    }

    /// For `MutEventSubscriber::process`: handles the activate eventfd (brings the loop's
    /// registrations in line) and reads a queue's eventfd; says what is left for the device.
    pub fn process(&mut self, events: &Events, ops: &mut EventOps) -> DeviceEvent {
        let data = events.data();
        if data == ACTIVATE_EVENT_DATA {
            if let Err(e) = self.activate_evt.read() {
                tracing::debug!("{}: activate eventfd read: {e}", self.name);
            }
            self.sync(ops);
            return DeviceEvent::Handled;
        }
        let Some(index) = data.checked_sub(QUEUE_EVENT_DATA_BASE) else {
            return DeviceEvent::Device(data);
        };
        let index = index as usize;
        let Some(evt) = self.queue_evts().get(index) else {
            // A notification that raced a reset: the loop drops the eventfd at its next sync.
            return DeviceEvent::Handled;
        };
        if let Err(e) = evt.read() {
            tracing::debug!("{}: queue {index} eventfd read: {e}", self.name);
        }
        DeviceEvent::Queue(index)
    }

    /// Removes the queue eventfds of earlier activations from the loop and adds the current
    /// ones, once.
    fn sync(&mut self, ops: &mut EventOps) {
        for evt in self.retired_evts.drain(..) {
            if let Err(e) = ops.remove(Events::empty(&evt)) {
                tracing::warn!("{}: cannot remove a queue eventfd: {e}", self.name);
            }
        }
        let Some(activated) = self.activated.as_mut() else {
            return;
        };
        if activated.registered {
            return;
        }
        for (index, evt) in activated.queue_evts.iter().enumerate() {
            let data = QUEUE_EVENT_DATA_BASE + index as u32;
            if let Err(e) = ops.add(Events::with_data(evt, data, EventSet::IN)) {
                tracing::error!(
                    "{}: cannot add queue {index} to the event loop: {e}",
                    self.name
                );
            }
        }
        activated.registered = true;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

    use super::*;

    /// A device that is its lifecycle and one event source of its own, and records the events
    /// it is handed.
    #[derive(Debug)]
    struct Counting {
        lifecycle: DeviceLifecycle<&'static str>,
        own: EventFd,
        queue_events: Vec<usize>,
        device_events: Vec<u32>,
    }

    impl Counting {
        fn new() -> Self {
            Counting {
                lifecycle: DeviceLifecycle::new("test").expect("lifecycle"),
                own: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
                queue_events: Vec::new(),
                device_events: Vec::new(),
            }
        }
    }

    impl MutEventSubscriber for Counting {
        fn init(&mut self, ops: &mut EventOps) {
            let own = Events::with_data(&self.own, DEVICE_EVENT_DATA.start, EventSet::IN);
            ops.add(own).expect("add the device's own source");
            self.lifecycle.init(ops);
        }
        fn process(&mut self, events: Events, ops: &mut EventOps) {
            match self.lifecycle.process(&events, ops) {
                DeviceEvent::Handled => {}
                DeviceEvent::Queue(i) => self.queue_events.push(i),
                DeviceEvent::Device(d) => {
                    self.own.read().expect("read");
                    self.device_events.push(d);
                }
            }
        }
    }

    fn evts(n: usize) -> Vec<EventFd> {
        (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"))
            .collect()
    }

    fn setup() -> (Arc<Mutex<Counting>>, EventManager<Arc<Mutex<Counting>>>) {
        let dev = Arc::new(Mutex::new(Counting::new()));
        let mut em = EventManager::new().expect("event manager");
        em.add_subscriber(dev.clone());
        (dev, em)
    }

    fn notify(dev: &Arc<Mutex<Counting>>, index: usize) {
        let d = dev.lock().expect("lock");
        d.lifecycle.queue_evts()[index].write(1).expect("notify");
    }

    #[test]
    fn a_second_activation_is_refused_and_keeps_the_first() {
        let mut l = DeviceLifecycle::new("test").expect("lifecycle");
        l.activate("first", evts(1)).expect("activate");
        assert!(matches!(
            l.activate("second", evts(2)),
            Err(VirtioError::AlreadyActive)
        ));
        assert_eq!(l.active(), Some(&"first"));
        assert_eq!(l.queue_evts().len(), 1);
    }

    #[test]
    fn reset_hands_back_the_state_and_leaves_no_queue_eventfds() {
        let mut l = DeviceLifecycle::new("test").expect("lifecycle");
        assert_eq!(l.reset(), None);
        l.activate("state", evts(2)).expect("activate");
        assert_eq!(l.reset(), Some("state"));
        assert!(!l.is_activated());
        assert!(l.queue_evts().is_empty());
    }

    #[test]
    fn queue_eventfds_join_the_loop_at_activation_and_leave_it_at_reset() {
        let (dev, mut em) = setup();
        dev.lock()
            .expect("lock")
            .lifecycle
            .activate("a", evts(2))
            .expect("activate");
        assert_eq!(em.run_with_timeout(100).expect("loop"), 1, "activation");
        notify(&dev, 1);
        assert_eq!(em.run_with_timeout(100).expect("loop"), 1, "queue event");
        assert_eq!(dev.lock().expect("lock").queue_events, vec![1]);

        let stale = {
            let mut d = dev.lock().expect("lock");
            let fd = d.lifecycle.queue_evts()[0].try_clone().expect("clone");
            d.lifecycle.reset();
            fd
        };
        assert_eq!(em.run_with_timeout(100).expect("loop"), 1, "reset");
        stale.write(1).expect("notify the retired eventfd");
        assert_eq!(
            em.run_with_timeout(50).expect("loop"),
            0,
            "a retired eventfd is out of the loop"
        );

        dev.lock()
            .expect("lock")
            .lifecycle
            .activate("b", evts(1))
            .expect("activate again");
        assert_eq!(em.run_with_timeout(100).expect("loop"), 1, "activation");
        notify(&dev, 0);
        assert_eq!(em.run_with_timeout(100).expect("loop"), 1, "queue event");
        assert_eq!(dev.lock().expect("lock").queue_events, vec![1, 0]);
    }

    #[test]
    fn a_device_activated_before_it_joins_the_loop_is_caught_up() {
        let dev = Arc::new(Mutex::new(Counting::new()));
        dev.lock()
            .expect("lock")
            .lifecycle
            .activate("a", evts(1))
            .expect("activate");
        let mut em = EventManager::<Arc<Mutex<Counting>>>::new().expect("event manager");
        em.add_subscriber(dev.clone());
        notify(&dev, 0);
        // The pending activation event and the queue event, in either order.
        let handled =
            em.run_with_timeout(100).expect("loop") + em.run_with_timeout(100).expect("loop");
        assert_eq!(handled, 2);
        assert_eq!(dev.lock().expect("lock").queue_events, vec![0]);
    }

    #[test]
    fn events_of_the_device_own_sources_are_left_to_it() {
        let (dev, mut em) = setup();
        let own = dev.lock().expect("lock").own.try_clone().expect("clone");
        own.write(1).expect("signal");
        assert_eq!(em.run_with_timeout(100).expect("loop"), 1);
        let d = dev.lock().expect("lock");
        assert_eq!(d.device_events, vec![DEVICE_EVENT_DATA.start]);
        assert!(d.queue_events.is_empty());
    }
}
