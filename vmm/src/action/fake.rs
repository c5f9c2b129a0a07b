//! An [`ActionHandler`] without a VM, for tests and benchmarks of the front doors (the API
//! server, its routes, `memvisor ctl`). Feature `test-utils`; not in release builds.
//!
//! The fake knows none of a VM's rules: it never refuses an action on its own, except an
//! unknown VM id, which the [`ActionHandler`] contract itself makes [`ActionError::NotFound`].
//! It records every action, answers with what a test scripted ([`FakeHandler::answer_next`]),
//! and otherwise with a reply made from the action alone. What a real VM answers — which
//! requests it refuses, and in which words — is tested against the real `Vm` (tests/api.rs).

use std::collections::VecDeque;
use std::sync::Mutex;

use super::*;

/// A fixed Prometheus exposition for [`Action::Metrics`]: one counter per VM.
fn metrics_text(vms: &[VmInfo]) -> String {
    let mut text = String::from(
        "# HELP memvisor_vm_exits_total VM exits by reason.\n\
         # TYPE memvisor_vm_exits_total counter\n",
    );
    for vm in vms {
        text.push_str(&format!(
            "memvisor_vm_exits_total{{vm=\"{}\",reason=\"io_out\"}} 42\n",
            vm.id
        ));
    }
    text
}

/// Records every action it is given and answers it; see the [module documentation](self).
#[derive(Debug)]
pub struct FakeHandler {
    vms: Vec<VmInfo>,
    scripted: Mutex<VecDeque<Result<ActionReply, ActionError>>>,
    log: Mutex<Vec<(Option<String>, Action)>>,
}

impl FakeHandler {
    /// Running VMs with these ids, each with the default configuration of a guest in `/guest`.
    pub fn new(ids: &[&str]) -> Self {
        let vms = ids
            .iter()
            .map(|id| {
                let config = VmConfig {
                    initrd: Some("/guest/initramfs.cpio.gz".into()),
                    ..VmConfig::new("/guest/vmlinux")
                };
                let boot_mib = config.memory.bytes() >> 20;
                VmInfo {
                    id: (*id).to_owned(),
                    config,
                    state: VmState::Running,
                    memory: MemoryInfo {
                        boot_mib,
                        guest_visible_mib: boot_mib,
                        host_resident_mib: boot_mib / 4,
                        ballooned_mib: 0,
                        plugged_mib: 0,
                        swapped_mib: 0,
                    },
                }
            })
            .collect();
        FakeHandler {
            vms,
            scripted: Mutex::new(VecDeque::new()),
            log: Mutex::new(Vec::new()),
        }
    }

    /// Makes the next action that reaches the handler get `answer`, whatever it is (answers
    /// queue up in order).
    pub fn answer_next(&self, answer: Result<ActionReply, ActionError>) {
        self.scripted
            .lock()
            .expect("fake handler script poisoned")
            .push_back(answer);
    }

    /// The actions handled so far, oldest first, with the VM id each was for.
    pub fn actions(&self) -> Vec<(Option<String>, Action)> {
        self.log.lock().expect("fake handler log poisoned").clone()
    }

    /// The reply made from `action` alone, for the VM `vm` (`None` for actions on no VM).
    fn reply_for(&self, vm: Option<&VmInfo>, action: Action) -> ActionReply {
        let Some(vm) = vm else {
            return match action {
                Action::Metrics => ActionReply::Metrics(metrics_text(&self.vms)),
                Action::GetHost => ActionReply::Json(serde_json::json!({
                    "ksm": {"status": "unavailable", "reason": "fake handler"}
                })),
                _ => ActionReply::VmList(VmList {
                    vms: self.vms.clone(),
                }),
            };
        };
        let memory = |requested_mib| hotplug::VirtioMemStatus {
            region_addr: 1 << 32,
            region_size_mib: 1024,
            block_size_bytes: 2 << 20,
            plugged_mib: 0,
            requested_mib,
            driver_active: false,
        };
        match action {
            Action::GetVm => ActionReply::Vm(vm.clone()),
            Action::SetState(target) => ActionReply::Vm(VmInfo {
                state: VmState::from(target),
                ..vm.clone()
            }),
            Action::Shutdown => ActionReply::Accepted,
            Action::SetBalloon(BalloonRequest { target_mib }) => {
                ActionReply::Balloon(BalloonInfo {
                    target_mib,
                    actual_mib: 0,
                })
            }
            Action::GetBalloon => ActionReply::Balloon(BalloonInfo {
                target_mib: 0,
                actual_mib: 0,
            }),
            Action::GetBalloonStats => ActionReply::BalloonStats(BalloonStatsInfo {
                age_ms: None,
                stats: Default::default(),
            }),
            Action::GetSharing => ActionReply::Json(serde_json::json!({
                "status": "unavailable", "reason": "fake handler"
            })),
            Action::SetMemory(MemoryRequest { requested_mib }) => {
                ActionReply::Memory(memory(requested_mib))
            }
            Action::GetMemory => ActionReply::Memory(memory(0)),
            Action::SetSwap(SwapRequest { target_mib }) => ActionReply::Swap {
                status: serde_json::json!({
                    "state": "idle", "armed": true, "busy": true, "target_mib": target_mib
                }),
                accepted: true,
            },
            Action::GetSwap => ActionReply::Swap {
                status: serde_json::json!({"state": "idle", "armed": false, "busy": false}),
                accepted: false,
            },
            Action::ListVms | Action::Metrics | Action::GetHost => {
                unreachable!("these take no VM id")
            }
        }
    }
}

impl ActionHandler for FakeHandler {
    fn handle(&self, vm_id: Option<&str>, action: Action) -> Result<ActionReply, ActionError> {
        self.log
            .lock()
            .expect("fake handler log poisoned")
            .push((vm_id.map(str::to_owned), action.clone()));
        let scripted = self
            .scripted
            .lock()
            .expect("fake handler script poisoned")
            .pop_front();
        if let Some(answer) = scripted {
            return answer;
        }
        if !action.targets_vm() {
            return Ok(self.reply_for(None, action));
        }
        let id = vm_id.ok_or_else(|| ActionError::BadRequest("a VM id is required".into()))?;
        let vm = self
            .vms
            .iter()
            .find(|v| v.id == id)
            .ok_or_else(|| ActionError::NotFound(id.to_owned()))?;
        Ok(self.reply_for(Some(vm), action))
    }
}
