//! How a [`Vm`] carries out an [`Action`]: [`Vm::handle_action`] refuses what a stopped VM
//! cannot do and dispatches; each action has its own small function below.

use std::sync::{Arc, Mutex};

use balloon::Balloon;
use hotplug::VirtioMem;

use crate::action::{
    Action, ActionError, ActionReply, BalloonRequest, BalloonStatsInfo, MemoryRequest, RunState,
    SwapRequest, VmList, VmState,
};
use crate::controller::Reply;
use crate::swap::AgeSampler;
use crate::vcpu::VmExit;
use crate::vm::Vm;

use event_manager::SubscriberOps;

/// Whether a stopped VM still answers `action` (it reports, it does not change).
fn allowed_when_stopped(action: &Action) -> bool {
    matches!(
        action,
        Action::GetVm | Action::ListVms | Action::Metrics | Action::GetSwap | Action::GetMemory
    )
}

fn internal(e: impl std::fmt::Display) -> ActionError {
    ActionError::Internal(e.to_string())
}

impl Vm {
    /// Carries out one action on the event loop's thread.
    pub fn handle_action(&mut self, action: Action) -> Reply {
        if self.state() == VmState::Stopped && !allowed_when_stopped(&action) {
            return Err(ActionError::Conflict(format!("{} has stopped", self.id)));
        }
        match action {
            Action::ListVms => Ok(ActionReply::VmList(VmList {
                vms: vec![self.info()],
            })),
            Action::GetVm => Ok(ActionReply::Vm(self.info())),
            Action::Metrics => Ok(ActionReply::Metrics(self.metrics_text())),
            Action::SetState(RunState::Paused) => self.action_pause(),
            Action::SetState(RunState::Running) => self.action_resume(),
            Action::Shutdown => {
                self.shared.request_exit_quiet(VmExit::Stopped);
                Ok(ActionReply::Accepted)
            }
            Action::SetBalloon(req) => self.action_set_balloon(req),
            Action::GetBalloon => self.action_get_balloon(),
            Action::GetBalloonStats => self.action_get_balloon_stats(),
            Action::GetSharing => self.action_get_sharing(),
            Action::GetHost => Ok(ActionReply::Json(Self::host_info())),
            Action::SetMemory(req) => self.action_set_memory(req),
            Action::GetMemory => self.action_get_memory(),
            Action::SetSwap(req) => self.action_set_swap(req),
            Action::GetSwap => Ok(ActionReply::Swap {
                status: self.swap.status_json(),
                accepted: false,
            }),
        }
    }

    /// `SetState(Paused)`: refused unless running.
    fn action_pause(&mut self) -> Reply {
        match self.state() {
            VmState::Paused => Err(ActionError::Conflict(format!(
                "{} is already paused",
                self.id
            ))),
            VmState::Created => Err(ActionError::Conflict(format!(
                "{} has not started",
                self.id
            ))),
            _ => {
                self.pause().map_err(internal)?;
                Ok(ActionReply::Vm(self.info()))
            }
        }
    }

    /// `SetState(Running)`: refused unless paused.
    fn action_resume(&mut self) -> Reply {
        let state = self.state();
        if state != VmState::Paused {
            return Err(ActionError::Conflict(format!(
                "{} is already {state}",
                self.id
            )));
        }
        self.resume();
        Ok(ActionReply::Vm(self.info()))
    }

    /// `SetBalloon`: a target above the VM's boot memory is refused.
    fn action_set_balloon(&mut self, req: BalloonRequest) -> Reply {
        let boot_mib = self.config.memory.mib();
        if req.target_mib > boot_mib {
            return Err(ActionError::BadRequest(format!(
                "balloon target {} MiB is larger than the VM's {boot_mib} MiB",
                req.target_mib
            )));
        }
        self.balloon_device()?
            .lock()
            .map_err(|_| ActionError::Internal("the balloon device failed".into()))?
            .set_target_mib(req.target_mib)
            .map_err(|e| ActionError::BadRequest(e.to_string()))?;
        self.action_get_balloon()
    }

    /// `GetBalloon`: the balloon's target and actual size.
    fn action_get_balloon(&self) -> Reply {
        self.balloon_device()?;
        self.balloon_info()
            .map(ActionReply::Balloon)
            .ok_or_else(|| ActionError::Internal("the balloon device failed".into()))
    }

    /// `GetBalloonStats`: the guest's latest statistics and their age.
    fn action_get_balloon_stats(&self) -> Reply {
        let latest = self
            .balloon_device()?
            .lock()
            .map_err(|_| ActionError::Internal("the balloon device failed".into()))?
            .latest_stats();
        Ok(ActionReply::BalloonStats(match latest {
            Some((stats, age)) => BalloonStatsInfo {
                age_ms: Some(age.as_millis() as u64),
                stats: stats.values().into_iter().collect(),
            },
            None => BalloonStatsInfo {
                age_ms: None,
                stats: Default::default(),
            },
        }))
    }

    /// `GetSharing`: samples page sharing now, on the `sharing` thread, and waits for it (the
    /// event loop's own requests do not wait: `drain_requests` hands them over). The sample
    /// also feeds `GET /metrics`.
    fn action_get_sharing(&mut self) -> Reply {
        self.sharing
            .sample_now(&self.ram, crate::controller::ACTION_TIMEOUT)
    }

    /// `SetMemory`: a size the device refuses as wrong is a bad request.
    fn action_set_memory(&mut self, req: MemoryRequest) -> Reply {
        let mut mem = self
            .mem_device()?
            .lock()
            .map_err(|_| ActionError::Internal("the virtio-mem device failed".into()))?;
        mem.set_requested_mib(req.requested_mib).map_err(|e| {
            if e.is_bad_request() {
                ActionError::BadRequest(e.to_string())
            } else {
                ActionError::Internal(e.to_string())
            }
        })?;
        Ok(ActionReply::Memory(mem.status()))
    }

    /// `GetMemory`: the virtio-mem device's status.
    fn action_get_memory(&self) -> Reply {
        self.mem_device()?;
        self.memory_status()
            .map(ActionReply::Memory)
            .ok_or_else(|| ActionError::Internal("the virtio-mem device failed".into()))
    }

    /// `SetSwap`: starts the request; the first one that arms swap also starts sampling page
    /// ages on the event loop.
    fn action_set_swap(&mut self, req: SwapRequest) -> Reply {
        self.swap.request(req.target_mib)?;
        if !self.age_sampler && self.swap.swapper().is_some() {
            let sampler = AgeSampler::new(self.swap.clone())
                .map_err(|e| ActionError::Internal(format!("page-age timer: {e}")))?;
            self.events.add_subscriber(Arc::new(Mutex::new(sampler)));
            self.age_sampler = true;
        }
        Ok(ActionReply::Swap {
            status: self.swap.status_json(),
            accepted: true,
        })
    }

    /// Host-wide memory state: KSM settings and counters.
    pub fn host_info() -> serde_json::Value {
        let ksm = memory::ksm::Ksm::open().and_then(|k| Ok((k.settings()?, k.counters()?)));
        match ksm {
            Ok((settings, counters)) => serde_json::json!({
                "ksm": {
                    "status": "ok",
                    "settings": settings,
                    "counters": counters,
                }
            }),
            Err(e) => serde_json::json!({
                "ksm": { "status": "unavailable", "reason": e.to_string() }
            }),
        }
    }

    fn balloon_device(&self) -> Result<&Arc<Mutex<Balloon>>, ActionError> {
        self.devices.balloon.as_ref().ok_or_else(|| {
            ActionError::BadRequest(format!(
                "{} has no balloon device (start it with --balloon)",
                self.id
            ))
        })
    }

    fn mem_device(&self) -> Result<&Arc<Mutex<VirtioMem>>, ActionError> {
        self.devices.mem.as_ref().ok_or_else(|| {
            ActionError::BadRequest(format!(
                "{} has no virtio-mem device (start it with --hotplug)",
                self.id
            ))
        })
    }
}
