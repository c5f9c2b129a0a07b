//! The one way to ask a VM for something: every front door (the REST API, `memvisor ctl`
//! through the API, later the scheduler) builds an [`Action`] and hands it to an
//! [`ActionHandler`], which runs it on the VM's event loop and answers with an [`ActionReply`]
//! or an [`ActionError`].
//!
//! Adding a capability (balloon, virtio-mem, swap, sharing) means: a variant here, its reply
//! type here, a route in `api::routes` (and `docs/api.yaml`), a command in `ctl`, and the arm
//! in the handler. Nothing else changes.

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Something asked of a VM (or of the VMM, for [`Action::ListVms`] and [`Action::Metrics`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Every VM this process runs. Takes no VM id.
    ListVms,
    /// One VM's configuration, state and memory.
    GetVm,
    /// Pause or resume the VM's vCPUs.
    SetState(RunState),
    /// Ask the VM to stop; the VMM then exits as if the guest had shut down.
    Shutdown,
    /// Prometheus text of the VMM's and the VMs' counters. Takes no VM id.
    Metrics,
    /// Set the balloon's target size.
    SetBalloon(BalloonRequest),
    /// The balloon's target and actual size.
    GetBalloon,
    /// The latest memory statistics the guest reported through the balloon.
    GetBalloonStats,
    /// Sample the VM's page-sharing counts now. Answers [`ActionReply::Json`] with a
    /// `memory::sharing::SharingReport`.
    GetSharing,
    /// Host-wide state: KSM settings and counters. Takes no VM id. Answers
    /// [`ActionReply::Json`].
    GetHost,
    /// Ask the guest to have this much virtio-mem memory plugged.
    SetMemory(MemoryRequest),
    /// The virtio-mem region, block size, plugged and requested sizes.
    GetMemory,
    /// Swap the VM's pages out until this much is in its swap file (0: bring everything back).
    /// Starts the work in the background and answers [`ActionReply::Swap`] at once.
    SetSwap(SwapRequest),
    /// The swapper's state and counters ([`ActionReply::Swap`]).
    GetSwap,
}

impl Action {
    /// Whether the action names one VM (and so needs the `vm_id` argument of
    /// [`ActionHandler::handle`]).
    pub fn targets_vm(&self) -> bool {
        match self {
            Action::ListVms | Action::Metrics | Action::GetHost => false,
            Action::GetVm
            | Action::SetState(_)
            | Action::Shutdown
            | Action::SetBalloon(_)
            | Action::GetBalloon
            | Action::GetBalloonStats
            | Action::GetSharing
            | Action::SetMemory(_)
            | Action::GetMemory
            | Action::SetSwap(_)
            | Action::GetSwap => true,
        }
    }
}

/// A VM's lifecycle state, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Built, vCPUs not started yet.
    Created,
    /// vCPUs running the guest.
    Running,
    /// vCPUs parked by [`Action::SetState`].
    Paused,
    /// Stopping or stopped: no more actions that change the VM are taken.
    Stopped,
}

/// The states a client may ask for with [`Action::SetState`].
///
/// Read through a string so that a wrong JSON type says "expected a string" rather than
/// serde_json's bare "expected value" for enums.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", try_from = "String")]
pub enum RunState {
    /// Park the vCPUs.
    Paused,
    /// Let the vCPUs run.
    Running,
}

impl TryFrom<String> for RunState {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.as_str() {
            "paused" => Ok(RunState::Paused),
            "running" => Ok(RunState::Running),
            other => Err(format!(
                "unknown variant `{other}`, expected `paused` or `running`"
            )),
        }
    }
}

impl From<RunState> for VmState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Paused => VmState::Paused,
            RunState::Running => VmState::Running,
        }
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
        })
    }
}

/// A VM's memory, in MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryInfo {
    /// Guest RAM the VM booted with.
    pub boot_mib: u64,
    /// What the guest can use now: boot RAM, plus plugged virtio-mem blocks, minus the balloon.
    pub guest_visible_mib: u64,
    /// Guest RAM pages resident in host memory.
    pub host_resident_mib: u64,
    /// Memory the guest has given back through its balloon.
    #[serde(default)]
    pub ballooned_mib: u64,
    /// virtio-mem memory the guest has plugged.
    #[serde(default)]
    pub plugged_mib: u64,
    /// Guest RAM in the VM's swap file (or dropped as zero pages by swap).
    #[serde(default)]
    pub swapped_mib: u64,
}

/// One VM, as `GET /api/v1/vms/{id}` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    /// The VM's name (`vm0` for `memvisor run`).
    pub id: String,
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// Lifecycle state.
    pub state: VmState,
    /// Memory sizes.
    pub memory: MemoryInfo,
}

/// The body of `GET /api/v1/vms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmList {
    /// Every VM, in the handler's order.
    pub vms: Vec<VmInfo>,
}

/// The body of `PUT /api/v1/vms/{id}/state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRequest {
    /// The state to move to.
    pub state: RunState,
}

/// The body of `PUT /api/v1/vms/{id}/shutdown`: empty, or an empty JSON object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {}

/// The body of `PUT /api/v1/vms/{id}/balloon`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonRequest {
    /// How much memory the guest should give back, in MiB.
    pub target_mib: u64,
}

/// The body of `GET /api/v1/vms/{id}/balloon`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonInfo {
    /// What the host asked for, in MiB.
    pub target_mib: u64,
    /// What the guest has given, in MiB.
    pub actual_mib: u64,
}

/// The body of `GET /api/v1/vms/{id}/balloon/stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsInfo {
    /// Milliseconds since the guest last reported, `null` if it never did.
    pub age_ms: Option<u64>,
    /// Every statistic of the latest report, by name (unknown tags as `tag_N`).
    pub stats: std::collections::BTreeMap<String, u64>,
}

/// The body of `PUT /api/v1/vms/{id}/memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRequest {
    /// How much hotplug memory the guest should have plugged, in MiB: a multiple of the block
    /// size, at most the region size.
    pub requested_mib: u64,
}

/// The body of `PUT /api/v1/vms/{id}/swap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwapRequest {
    /// How much of the VM's RAM should be in swap, in MiB; 0 brings everything back.
    pub target_mib: u64,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// One line saying what was wrong.
    pub error: String,
}

/// What an action answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActionReply {
    /// [`Action::ListVms`].
    VmList(VmList),
    /// [`Action::GetVm`] and [`Action::SetState`] (the state after the change).
    Vm(VmInfo),
    /// [`Action::Shutdown`]: accepted; the VM stops asynchronously.
    Accepted,
    /// [`Action::Metrics`]: Prometheus text exposition format.
    Metrics(String),
    /// [`Action::SetBalloon`] (the state after the change) and [`Action::GetBalloon`].
    Balloon(BalloonInfo),
    /// [`Action::GetBalloonStats`].
    BalloonStats(BalloonStatsInfo),
    /// A JSON document whose schema `docs/api.yaml` gives per route ([`Action::GetSharing`],
    /// [`Action::GetHost`]).
    Json(serde_json::Value),
    /// [`Action::SetMemory`] (the state after the change) and [`Action::GetMemory`].
    Memory(hotplug::VirtioMemStatus),
    /// [`Action::GetSwap`], and [`Action::SetSwap`] with `accepted` set: the swap-out or
    /// swap-in runs in the background (HTTP 202); poll [`Action::GetSwap`] until `busy` is
    /// false.
    Swap {
        /// A `memory::swap::SwapStatus` plus `target_mib` and `busy`, as JSON.
        status: serde_json::Value,
        /// Whether this answers a request that started work.
        accepted: bool,
    },
}

/// Why an action was refused. Each variant is one HTTP status; see [`ActionError::http_status`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The request is malformed or makes no sense for this VM (400).
    #[error("{0}")]
    BadRequest(String),
    /// No VM has this id (404).
    #[error("no VM named {0:?}")]
    NotFound(String),
    /// The VM's state does not allow the action now, e.g. pausing a paused VM (409).
    #[error("{0}")]
    Conflict(String),
    /// The VMM failed to carry the action out (500).
    #[error("{0}")]
    Internal(String),
}

impl ActionError {
    /// The HTTP status the API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            ActionError::BadRequest(_) => 400,
            ActionError::NotFound(_) => 404,
            ActionError::Conflict(_) => 409,
            ActionError::Internal(_) => 500,
        }
    }
}

/// Runs [`Action`]s. The VMM implements it by passing each action to the VM's event loop and
/// waiting for the reply; the API server calls it from its own threads, never a vCPU's.
///
/// `vm_id` is `Some` exactly when [`Action::targets_vm`]; an unknown id is
/// [`ActionError::NotFound`].
pub trait ActionHandler: Send + Sync {
    /// Runs one action and answers it.
    fn handle(&self, vm_id: Option<&str>, action: Action) -> Result<ActionReply, ActionError>;
}

/// An [`ActionHandler`] without a VM that records what it is asked (feature `test-utils`).
#[cfg(any(test, feature = "test-utils"))]
pub mod fake;

#[cfg(test)]
mod tests {
    use super::fake::FakeHandler;
    use super::*;

    #[test]
    fn error_variants_map_to_their_http_status() {
        assert_eq!(ActionError::BadRequest("x".into()).http_status(), 400);
        assert_eq!(ActionError::NotFound("vm9".into()).http_status(), 404);
        assert_eq!(ActionError::Conflict("x".into()).http_status(), 409);
        assert_eq!(ActionError::Internal("x".into()).http_status(), 500);
    }

    #[test]
    fn not_found_names_the_id() {
        assert_eq!(
            ActionError::NotFound("vm9".into()).to_string(),
            "no VM named \"vm9\""
        );
    }

    #[test]
    fn only_per_vm_actions_target_a_vm() {
        assert!(!Action::ListVms.targets_vm());
        assert!(!Action::Metrics.targets_vm());
        assert!(Action::GetVm.targets_vm());
        assert!(Action::SetState(RunState::Paused).targets_vm());
        assert!(Action::Shutdown.targets_vm());
    }

    #[test]
    fn vm_info_round_trips_through_json() {
        let h = FakeHandler::new(&["vm0"]);
        let Ok(ActionReply::Vm(info)) = h.handle(Some("vm0"), Action::GetVm) else {
            panic!("expected a VM");
        };
        let text = serde_json::to_string(&info).expect("serialize");
        assert!(text.contains(r#""state":"running""#), "{text}");
        assert!(text.contains(r#""boot_mib":128"#), "{text}");
        let back: VmInfo = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, info);
    }

    #[test]
    fn state_request_rejects_states_a_client_cannot_ask_for() {
        let e = serde_json::from_str::<StateRequest>(r#"{"state": "stopped"}"#)
            .expect_err("stopped is not a target");
        assert!(e.to_string().contains("unknown variant `stopped`"), "{e}");
    }

    #[test]
    fn state_request_of_the_wrong_type_asks_for_a_string() {
        let e = serde_json::from_str::<StateRequest>(r#"{"state": 1}"#).expect_err("a number");
        assert!(
            e.to_string()
                .starts_with("invalid type: integer `1`, expected a string"),
            "{e}"
        );
        let ok: StateRequest = serde_json::from_str(r#"{"state": "running"}"#).expect("parse");
        assert_eq!(ok.state, RunState::Running);
    }

    #[test]
    fn fake_answers_what_it_is_told_then_from_the_action_alone() {
        let h = FakeHandler::new(&["vm0"]);
        h.answer_next(Err(ActionError::Conflict("scripted".into())));
        let pause = Action::SetState(RunState::Paused);
        assert_eq!(
            h.handle(Some("vm0"), pause.clone()),
            Err(ActionError::Conflict("scripted".into()))
        );
        let Ok(ActionReply::Vm(info)) = h.handle(Some("vm0"), pause.clone()) else {
            panic!("expected a VM");
        };
        assert_eq!(info.state, VmState::Paused, "the state asked for");
        assert_eq!(
            h.actions(),
            vec![
                (Some("vm0".into()), pause.clone()),
                (Some("vm0".into()), pause)
            ]
        );
    }

    #[test]
    fn fake_unknown_id_is_not_found() {
        let h = FakeHandler::new(&["vm0"]);
        assert_eq!(
            h.handle(Some("vm1"), Action::GetVm),
            Err(ActionError::NotFound("vm1".into()))
        );
    }
}
