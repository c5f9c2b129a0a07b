//! Connects the front doors to a VM's event loop: the API server's threads call a
//! [`VmHandle`] (an [`ActionHandler`]), which passes each [`Action`] through a channel to the
//! thread running [`Vm::wait`](crate::Vm::wait) and waits for its reply.

use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

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
}

/// The [`ActionHandler`] for one VM.
#[derive(Debug)]
pub struct VmHandle {
    id: String,
    tx: Mutex<mpsc::Sender<Request>>,
    wake: EventFd,
}

impl VmHandle {
    /// A handle for VM `id`, with the channel's sending side and the event loop's wake-up fd.
    pub fn new(id: String, tx: mpsc::Sender<Request>, wake: EventFd) -> Self {
        VmHandle {
            id,
            tx: Mutex::new(tx),
            wake,
        }
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
            .send(Request { action, reply })
            .map_err(|_| stopped())?;
        self.wake
            .write(1)
            .map_err(|e| ActionError::Internal(format!("cannot wake the VM's event loop: {e}")))?;
        match answer.recv_timeout(ACTION_TIMEOUT) {
            Ok(reply) => reply,
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(stopped()),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ActionError::Internal(format!(
                "{} did not answer within {ACTION_TIMEOUT:?}",
                self.id
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
