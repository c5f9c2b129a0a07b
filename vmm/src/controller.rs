//! Connects the front doors to a VM's event loop: the API server's threads call a
//! [`VmHandle`] (an [`ActionHandler`]), which passes each [`Action`] through a channel to the
//! thread running [`Vm::wait`](crate::Vm::wait) and waits for its reply.
//!
//! A request carries the deadline its asker waits until; the event loop answers a request
//! whose deadline has passed with an error and never carries it out, so an action that timed
//! out for the client (a pause, a balloon target) does not happen behind its back later.

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::action::{Action, ActionError, ActionHandler, ActionReply};

/// How long a front door waits for the event loop to answer.
pub const ACTION_TIMEOUT: Duration = Duration::from_secs(10);

/// What an action answers.
pub type Reply = Result<ActionReply, ActionError>;

/// One action on its way to the event loop, with where to send the reply.
#[derive(Debug)]
pub struct Request {
    /// What is asked.
    pub action: Action,
    /// Where the answer goes.
    pub reply: mpsc::SyncSender<Reply>,
    /// When the asker stops waiting: after it, the action is not carried out.
    pub deadline: Instant,
}

impl Request {
    /// A request for `action` whose asker waits up to `timeout` for the answer on `reply`.
    pub fn new(action: Action, reply: mpsc::SyncSender<Reply>, timeout: Duration) -> Self {
        Request {
            action,
            reply,
            deadline: Instant::now() + timeout,
        }
    }

    /// Whether the asker has given up.
    pub fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// Answers with `run(action)`, unless the deadline has passed: then `run` is not called
    /// and the (gone) asker is told so.
    pub fn answer(self, run: impl FnOnce(Action) -> Reply) {
        let answer = if self.expired() {
            tracing::warn!(
                "dropping {:?}: its asker stopped waiting before the VM got to it",
                self.action
            );
            Err(ActionError::Internal(
                "the request timed out before the VM got to it; it was not carried out".into(),
            ))
        } else {
            run(self.action)
        };
        // The asker may have given up waiting; nothing to do then.
        let _ = self.reply.send(answer);
    }
}

/// The [`ActionHandler`] for one VM.
#[derive(Debug)]
pub struct VmHandle {
    id: String,
    tx: Mutex<mpsc::Sender<Request>>,
    wake: EventFd,
    timeout: Duration,
}

impl VmHandle {
    /// A handle for VM `id`, with the channel's sending side and the event loop's wake-up fd.
    pub fn new(id: String, tx: mpsc::Sender<Request>, wake: EventFd) -> Self {
        VmHandle {
            id,
            tx: Mutex::new(tx),
            wake,
            timeout: ACTION_TIMEOUT,
        }
    }

    /// The same handle waiting `timeout` instead of [`ACTION_TIMEOUT`] for each answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl ActionHandler for VmHandle {
    fn handle(&self, vm_id: Option<&str>, action: Action) -> Reply {
        if let Some(id) = vm_id {
            if id != self.id {
                return Err(ActionError::NotFound(id.to_owned()));
            }
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let stopped = || ActionError::Conflict(format!("{} has stopped", self.id));
        self.tx
            .lock()
            .map_err(|_| stopped())?
            .send(Request::new(action, reply, self.timeout))
            .map_err(|_| stopped())?;
        self.wake
            .write(1)
            .map_err(|e| ActionError::Internal(format!("cannot wake the VM's event loop: {e}")))?;
        match answer.recv_timeout(self.timeout) {
            Ok(reply) => reply,
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ActionError::Internal(format!(
                "{} did not answer within {:?}; the request is cancelled",
                self.id, self.timeout
            ))),
        }
    }
}

/// Reads the wake-up eventfd on the event loop; the VM then drains its request channel.
#[derive(Debug)]
pub struct WakeSubscriber(pub EventFd);

impl MutEventSubscriber for WakeSubscriber {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("cannot watch the action eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::RunState;

    #[test]
    fn a_request_that_timed_out_is_never_carried_out() {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let handle = VmHandle::new("vm0".into(), tx, wake).with_timeout(Duration::from_millis(50));
        // The event loop is busy: nobody answers in time.
        let asked = std::thread::spawn(move || {
            handle.handle(Some("vm0"), Action::SetState(RunState::Paused))
        });
        let answer = asked.join().expect("asker");
        let err = answer.expect_err("timed out");
        assert!(err.to_string().contains("cancelled"), "{err}");
        // The loop gets to the request later: it must not pause the VM then.
        let request = rx.recv().expect("queued request");
        let mut carried_out = false;
        request.answer(|_| {
            carried_out = true;
            Ok(ActionReply::Accepted)
        });
        assert!(!carried_out, "a cancelled request was carried out");
    }

    #[test]
    fn a_request_in_time_is_carried_out() {
        let (reply, answer) = mpsc::sync_channel(1);
        let request = Request::new(Action::GetVm, reply, Duration::from_secs(10));
        request.answer(|action| {
            assert_eq!(action, Action::GetVm);
            Ok(ActionReply::Accepted)
        });
        assert_eq!(answer.recv().expect("answered"), Ok(ActionReply::Accepted));
    }
}
