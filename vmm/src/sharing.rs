//! `GET /api/v1/vms/{id}/sharing` off the event loop.
//!
//! A sharing sample reads `/proc/self/pagemap` and `/proc/kpagecount` and is paced by the
//! sampler's pages-per-second budget, which sleeps: at the default budget a 4,096-page sample
//! takes about 40 ms, and a tighter budget seconds. The event loop must not sleep (it serves the
//! guest's devices and every other API call), so the VM hands each sharing request, with its
//! reply channel and deadline, to a `sharing` thread that owns the sampler; the answer goes
//! straight from there to the asker. Requests are taken in order, one sample at a time (the
//! budget is per sampler), and one whose asker has given up is not sampled at all.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use memory::sharing::{SharingSampler, SharingStats};
use memory::GuestRam;

use crate::action::{Action, ActionError, ActionReply};
use crate::controller::{Reply, Request};

/// One sharing request: the RAM to sample and where the answer goes.
#[derive(Debug)]
struct Job {
    ram: GuestRam,
    request: Request,
}

/// The thread that samples page sharing for one VM.
#[derive(Debug)]
pub struct SharingWorker {
    jobs: mpsc::Sender<Job>,
    last: Arc<Mutex<Option<SharingStats>>>,
}

impl SharingWorker {
    /// Starts a `sharing` thread sampling with `sampler`. The thread ends when the worker is
    /// dropped, after the sample it is taking, if any.
    pub fn spawn(sampler: SharingSampler) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let last = Arc::new(Mutex::new(None));
        let thread_last = last.clone();
        std::thread::Builder::new()
            .name("sharing".into())
            .spawn(move || {
                let mut sampler = sampler;
                for Job { ram, request } in queue {
                    request.answer(|_| sample(&mut sampler, &ram, &thread_last));
                }
            })?;
        Ok(SharingWorker { jobs, last })
    }

    /// Queues `request` (a [`Action::GetSharing`]) for a sample of `ram`; the worker answers it.
    pub fn submit(&self, ram: GuestRam, request: Request) {
        if let Err(mpsc::SendError(job)) = self.jobs.send(Job { ram, request }) {
            job.request.answer(|_| {
                Err(ActionError::Internal(
                    "the sharing sampler thread is gone".into(),
                ))
            });
        }
    }

    /// Samples `ram` and waits for the answer (for callers off the event loop, and tests).
    pub fn sample_now(&self, ram: &GuestRam, timeout: Duration) -> Reply {
        let (reply, answer) = mpsc::sync_channel(1);
        self.submit(
            ram.clone(),
            Request::new(Action::GetSharing, reply, timeout),
        );
        answer.recv_timeout(timeout).unwrap_or_else(|_| {
            Err(ActionError::Internal(format!(
                "no sharing sample within {timeout:?}"
            )))
        })
    }

    /// The figures of the latest sample that had some (they feed `GET /metrics`).
    pub fn last(&self) -> Option<SharingStats> {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn sample(
    sampler: &mut SharingSampler,
    ram: &GuestRam,
    last: &Mutex<Option<SharingStats>>,
) -> Reply {
    let report = sampler
        .sample(ram)
        .map_err(|e| ActionError::Internal(e.to_string()))?;
    if let Some(stats) = report.stats() {
        *last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(*stats);
    }
    serde_json::to_value(&report)
        .map(ActionReply::Json)
        .map_err(|e| ActionError::Internal(e.to_string()))
}
