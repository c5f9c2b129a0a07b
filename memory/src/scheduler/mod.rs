//! The memory scheduler: a pure policy that keeps a host's VMs within its memory budget and
//! moves memory to the VMs that need it, choosing for each VM the cheapest tool.
//!
//! [`decide`] takes the host [`Policy`], a [`HostView`] (the budget, `min_free`, the time, and
//! every VM's policy, typed signals and tools) and the [`SchedulerState`] the caller keeps
//! between ticks, and returns [`Decision`]s. It has no clock, no threads and no KVM: time comes
//! in the view, and everything it remembers is in the state, so every rule is tested with plain
//! values and replayed in the simulator ([`sim`]).
//!
//! One tick, in order (each rule's source is given where it is implemented):
//! 1. **Host state** from the free budget against `min_free`, with hysteresis
//!    ([`HostState::next`], ESXi's high/clear/soft/hard/low).
//! 2. **Per VM**: rates since the previous sample, pressure (rising major faults, guest swap-in,
//!    hypervisor swap faults, allocation stalls, OOM kills), the working-set estimate, what it
//!    wants, and the progress of decisions still in flight (a balloon that missed its deadline,
//!    an unplug the guest refused: cancelled, and the tool is not used on that VM for a while).
//! 3. **Targets** in `[max(min, reservation, remembered floor), max]` (the `targets` module: shares with
//!    the idle-memory tax, pressed VMs first).
//! 4. **Moves**, cheapest tool first, each within its per-tick rate limit: guest page-out after a
//!    balloon grew deflates it and remembers a floor; growth (balloon deflate, virtio-mem plug,
//!    swap-in once calm) within what the budget has free; shrinking (virtio-mem unplug for large
//!    lasting shrinks, balloon while the guest has free or cache pages, hypervisor swap only
//!    without a balloon, after the balloon missed its deadline, or in the hard and low states);
//!    page merging as a trial in the clear state, kept where the sharing metric shows it pays.
//! 5. At most `decisions_per_tick`, most urgent first.
//!
//! Deadbands (`deadband_mib`), one decision in flight per tool and VM, and targets that depend
//! on demand rather than on the VMs' current sizes keep decisions from oscillating when demand
//! is steady.

pub mod admission;
pub mod policy;
pub mod sim;
mod targets;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use admission::{plan_admission, AdmissionPlan, AdmissionRefusal};
pub use policy::{Mode, Policy, PolicyValueError, PressureMarks, RateLimits, StateMarks, ToolSet};

use crate::signals::{VmMemorySignals, VmPolicy};
use targets::Claim;

// ------------------------------------------------------------------------------------------------
// What the scheduler sees.
// ------------------------------------------------------------------------------------------------

/// The host as the scheduler sees it at one tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    /// The host's clock, ms (the same clock as the signals' `sampled_at_ms`).
    pub now_ms: u64,
    /// Guest memory the host may back in total, MiB.
    pub memory_budget_mib: u64,
    /// Free budget the host keeps, MiB (the host states are marks relative to it).
    pub min_free_mib: u64,
    /// Every running VM.
    pub vms: Vec<VmView>,
}

impl HostView {
    /// Budget not charged to any VM, MiB; negative when the host is over budget.
    pub fn free_mib(&self) -> i64 {
        let charged: u64 = self.vms.iter().map(|v| v.signals.host.charged_mib).sum();
        self.memory_budget_mib as i64 - charged as i64
    }
}

/// One VM as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmView {
    /// The VM's id.
    pub id: String,
    /// Its memory policy.
    pub policy: VmPolicy,
    /// Its latest signals.
    pub signals: VmMemorySignals,
    /// The tools it has.
    pub tools: VmTools,
    /// Whether page merging is on for it now.
    pub merging: bool,
}

/// The tools one VM has (a balloon device with a driver, a virtio-mem device, a swap
/// directory, mergeable guest RAM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmTools {
    /// A virtio-balloon device.
    pub balloon: bool,
    /// A virtio-mem device.
    pub hotplug: bool,
    /// Hypervisor swap (a swap directory).
    pub swap: bool,
    /// Page merging (KSM) can be turned on.
    pub merge: bool,
}

// ------------------------------------------------------------------------------------------------
// What it decides.
// ------------------------------------------------------------------------------------------------

/// The host's memory state, from its free budget against `min_free` (ESXi 6's five states).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Enough free budget: nothing is taken from anyone.
    #[default]
    High,
    /// Below `states.clear_pct`: page merging.
    Clear,
    /// Below `states.soft_pct`: + balloon and virtio-mem unplug.
    Soft,
    /// Below `states.hard_pct`: + hypervisor swap.
    Hard,
    /// Below `states.low_pct`: + swap at twice the rate, no VM grows.
    Low,
}

impl HostState {
    const ALL: [HostState; 5] = [
        HostState::High,
        HostState::Clear,
        HostState::Soft,
        HostState::Hard,
        HostState::Low,
    ];

    /// The free-budget mark below which this state is entered, MiB (`None` for `High`).
    fn enter_mark_mib(self, min_free_mib: u64, marks: &StateMarks) -> Option<f64> {
        let pct = match self {
            HostState::High => return None,
            HostState::Clear => marks.clear_pct,
            HostState::Soft => marks.soft_pct,
            HostState::Hard => marks.hard_pct,
            HostState::Low => marks.low_pct,
        };
        Some(min_free_mib as f64 * f64::from(pct) / 100.0)
    }

    /// The state after `prev` for a free budget of `free_mib` (ESXi's memory states; the
    /// hysteresis is ours: a state is entered below its mark and left above the mark plus
    /// `leave_margin_pct`).
    pub fn next(prev: HostState, free_mib: i64, min_free_mib: u64, marks: &StateMarks) -> Self {
        let free = free_mib as f64;
        // The worst state whose entering mark is above the free budget.
        let entered = Self::ALL
            .into_iter()
            .rev()
            .find(|s| {
                s.enter_mark_mib(min_free_mib, marks)
                    .is_some_and(|m| free < m)
            })
            .unwrap_or(HostState::High);
        if entered >= prev {
            return entered;
        }
        // Better than before: climb one state at a time while above the leaving mark.
        let mut state = prev;
        while state > entered {
            let mark = state.enter_mark_mib(min_free_mib, marks).unwrap_or(0.0);
            let leave = mark * (1.0 + f64::from(marks.leave_margin_pct) / 100.0);
            if free < leave {
                break;
            }
            state = Self::ALL[state as usize - 1];
        }
        state
    }
}

/// A tool the scheduler uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tool {
    /// Page merging (KSM).
    Merge,
    /// The guest's balloon.
    Balloon,
    /// virtio-mem.
    Hotplug,
    /// Hypervisor swap.
    Swap,
}

/// What to do to a VM. Each is one of the API's memory actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DecisionAction {
    /// `PUT /vms/{id}/balloon {"target_mib"}`: the balloon's size.
    SetBalloon {
        /// MiB the guest should give.
        target_mib: u64,
    },
    /// `PUT /vms/{id}/memory {"requested_mib"}`: plugged virtio-mem memory.
    SetHotplug {
        /// MiB the guest should have plugged.
        requested_mib: u64,
    },
    /// `PUT /vms/{id}/swap {"target_mib"}` with more than is swapped now: swap out, coldest
    /// pages first.
    SwapOut {
        /// MiB of the VM's RAM that should be in swap.
        target_mib: u64,
    },
    /// The same with less: bring pages back.
    SwapIn {
        /// MiB that should stay in swap (0: everything back).
        target_mib: u64,
    },
    /// Page merging on or off for the VM.
    SetMerge {
        /// On or off.
        on: bool,
    },
}

/// The rule that made a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The host is in its clear state or worse: merging is tried.
    MergeTrial,
    /// The merge trial is over and the sharing metric shows too little sharing.
    MergeNotPaying,
    /// The host is in its soft state or worse: the VM is above its share-based target.
    ReclaimToTarget,
    /// A pressed VM waits for memory the free budget does not have: others give theirs.
    Reallocate,
    /// The VM is above its policy's `max`.
    AboveMax,
    /// The VM is below its target and the budget has room.
    GrowToTarget,
    /// The VM is under pressure and below its target.
    PressureGrow,
    /// The guest paged out after its balloon grew: deflate and remember a floor.
    GuestPageOut,
    /// The balloon did not reach its target by the deadline: cancelled, another tool next.
    BalloonDeadlineMissed,
    /// The guest did not unplug (or plug) by the deadline: cancelled, another tool next.
    HotplugRefused,
    /// Memory taken from running VMs to admit a new one ([`plan_admission`]).
    Admission,
}

/// Why a decision was made: the rule and the signal values that fired it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    /// The rule.
    pub rule: Rule,
    /// The values the rule looked at, by name (`free_mib`, `target_mib`, `major_faults_per_s`).
    pub values: BTreeMap<String, f64>,
}

/// One decision. The host applies it through the API's action and records
/// `{time, vm, tool, from, to, reason}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// The VM.
    pub vm: String,
    /// What to do.
    pub action: DecisionAction,
    /// The tool.
    pub tool: Tool,
    /// The tool's level before, MiB (balloon target, requested virtio-mem size, swapped MiB;
    /// for merging 0 = off, 1 = on).
    pub from: u64,
    /// The tool's level asked for, in the same unit.
    pub to: u64,
    /// Why.
    pub reason: Reason,
}

// ------------------------------------------------------------------------------------------------
// What it remembers.
// ------------------------------------------------------------------------------------------------

/// What the scheduler keeps between ticks; the caller owns it and passes it to every
/// [`decide`]. Starts empty ([`Default`]).
#[derive(Clone, Debug, Default)]
pub struct SchedulerState {
    host_state: HostState,
    calm_ticks: u32,
    vms: BTreeMap<String, VmMemo>,
}

impl SchedulerState {
    /// The host state of the last tick.
    pub fn host_state(&self) -> HostState {
        self.host_state
    }

    /// What the last tick found for a VM, if it saw it.
    pub fn vm(&self, id: &str) -> Option<&VmReport> {
        self.vms.get(id).map(|m| &m.report)
    }

    /// A floor remembered after the VM's guest paged out, MiB, and until when (host ms).
    pub fn remembered_floor(&self, id: &str) -> Option<(u64, u64)> {
        self.vms
            .get(id)
            .and_then(|m| m.floor)
            .map(|f| (f.mib, f.until_ms))
    }
}

/// What the last tick found for one VM (for the host's timeline and the tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmReport {
    /// Guest-visible memory minus swapped, MiB: what the guest can use without host faults.
    pub alloc_mib: u64,
    /// The same with the decisions in flight done.
    pub planned_mib: u64,
    /// The working-set estimate, MiB.
    pub working_set_mib: u64,
    /// What the VM would have on an uncontended host, MiB.
    pub natural_mib: u64,
    /// The floor used, MiB.
    pub floor_mib: u64,
    /// The target, MiB.
    pub target_mib: u64,
    /// Whether the guest is under pressure.
    pub pressed: bool,
    /// Guest major faults per second since the previous sample.
    pub major_faults_per_s: f64,
    /// Guest swap-in since the previous sample, KiB/s.
    pub swap_in_kib_per_s: f64,
    /// Hypervisor swap faults per second.
    pub host_swap_faults_per_s: f64,
}

#[derive(Clone, Debug, Default)]
struct VmMemo {
    prev: Option<Counters>,
    pending: BTreeMap<Tool, Pending>,
    floor: Option<Floor>,
    failed_until_ms: BTreeMap<Tool, u64>,
    merge_since_ms: Option<u64>,
    merge_refused_until_ms: u64,
    balloon_grew_at_ms: Option<u64>,
    large_shrink_ticks: u32,
    report: VmReport,
}

#[derive(Clone, Copy, Debug)]
struct Floor {
    mib: u64,
    until_ms: u64,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    to: u64,
    issued_ms: u64,
}

/// Cumulative counters of one sample, for rates.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    at_ms: u64,
    major_faults: u64,
    swap_in_bytes: u64,
    host_swap_faults: u64,
    oom_kills: u64,
    alloc_stalls: u64,
}

impl Counters {
    fn of(s: &VmMemorySignals) -> Self {
        let stats = s.balloon.as_ref().and_then(|b| b.stats).unwrap_or_default();
        Counters {
            at_ms: s.sampled_at_ms,
            major_faults: stats.major_faults.unwrap_or(0),
            swap_in_bytes: stats.swap_in_bytes.unwrap_or(0),
            host_swap_faults: s.swap.as_ref().map_or(0, |w| w.faults),
            oom_kills: stats.oom_kills.unwrap_or(0),
            alloc_stalls: stats.alloc_stalls.unwrap_or(0),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The decision.
// ------------------------------------------------------------------------------------------------

/// One VM's evaluation within a tick.
#[derive(Clone, Debug)]
struct Eval {
    alloc_mib: u64,
    planned_mib: u64,
    ws_mib: u64,
    want_mib: u64,
    floor_mib: u64,
    pressed: bool,
    /// Pressed by the guest's own paging (not by hypervisor swap faults).
    guest_paging: bool,
    guest_swapped_mib: u64,
    giveable_mib: Option<u64>,
    mean_count: f64,
    values: BTreeMap<String, f64>,
}

/// A decision not yet chosen: lower `priority` goes first.
struct Candidate {
    priority: u32,
    decision: Decision,
}

/// Decides this tick's moves. See the module documentation for the order of the rules.
pub fn decide(policy: &Policy, view: &HostView, state: &mut SchedulerState) -> Vec<Decision> {
    if policy.mode == Mode::Off {
        state.vms.clear();
        return Vec::new();
    }
    let now = view.now_ms;
    state
        .vms
        .retain(|id, _| view.vms.iter().any(|v| &v.id == id));
    let free = view.free_mib();
    state.host_state = HostState::next(state.host_state, free, view.min_free_mib, &policy.states);
    let host_state = state.host_state;

    let mut candidates: Vec<Candidate> = Vec::new();
    let mut evals = Vec::with_capacity(view.vms.len());
    for vm in &view.vms {
        let memo = state.vms.entry(vm.id.clone()).or_default();
        follow_up(policy, vm, memo, now, &mut candidates);
        evals.push(evaluate(policy, vm, memo, now));
    }

    // Targets.
    let charged: u64 = view.vms.iter().map(|v| v.signals.host.charged_mib).sum();
    let alloc_sum: u64 = evals.iter().map(|e| e.alloc_mib).sum();
    let pool = view.memory_budget_mib as i64 - view.min_free_mib as i64;
    // Memory the VMs hold but the host does not back (untouched, merged) is credited: the pool
    // is in the same unit as the VMs' allocations.
    let pool_alloc = alloc_sum as i64 + pool - charged as i64;
    let claims: Vec<Claim> = view
        .vms
        .iter()
        .zip(&evals)
        .map(|(vm, e)| Claim {
            natural_mib: vm
                .signals
                .boot_mib
                .max(e.want_mib)
                .clamp(e.floor_mib, vm.policy.max_mib.max(e.floor_mib)),
            floor_mib: e.floor_mib,
            working_set_mib: e.ws_mib,
            shares: vm.policy.shares.max(1),
            pressed: e.pressed,
            mean_count: e.mean_count,
            reclaim_cost: if swap_only(policy, vm) {
                policy.swap_only_cost
            } else {
                1.0
            },
        })
        .collect();
    let targets = targets::allocate(&claims, pool_alloc, policy.idle_cost());

    // Growth room: what the budget has free above `min_free`, less growth already in flight.
    let in_flight_growth: u64 = evals
        .iter()
        .map(|e| e.planned_mib.saturating_sub(e.alloc_mib))
        .sum();
    let mut room = (pool - charged as i64 - in_flight_growth as i64).max(0) as u64;
    let waiting: u64 = evals
        .iter()
        .zip(&targets)
        .filter(|(e, &t)| e.pressed && t > e.planned_mib + policy.deadband_mib)
        .map(|(e, &t)| t - e.planned_mib)
        .sum();
    let reallocating = waiting > room;
    let calm = host_state <= HostState::Clear;
    state.calm_ticks = if calm {
        state.calm_ticks.saturating_add(1)
    } else {
        0
    };
    let calm_enough = calm && state.calm_ticks >= policy.calm_ticks;

    // Growth first for pressed VMs, then the rest, each within the room left.
    let mut order: Vec<usize> = (0..view.vms.len()).collect();
    order.sort_by_key(|&i| {
        (
            !evals[i].pressed,
            std::cmp::Reverse(targets[i].saturating_sub(evals[i].planned_mib)),
        )
    });
    for i in order {
        let vm = &view.vms[i];
        let e = &mut evals[i];
        let target = targets[i];
        let memo = state.vms.get_mut(&vm.id).expect("every VM has a memo");
        memo.report = VmReport {
            alloc_mib: e.alloc_mib,
            planned_mib: e.planned_mib,
            working_set_mib: e.ws_mib,
            natural_mib: claims[i].natural_mib,
            floor_mib: e.floor_mib,
            target_mib: target,
            pressed: e.pressed,
            major_faults_per_s: e.values.get("major_faults_per_s").copied().unwrap_or(0.0),
            swap_in_kib_per_s: e.values.get("swap_in_kib_per_s").copied().unwrap_or(0.0),
            host_swap_faults_per_s: e
                .values
                .get("host_swap_faults_per_s")
                .copied()
                .unwrap_or(0.0),
        };
        e.values.insert("target_mib".into(), target as f64);
        e.values.insert("free_mib".into(), free as f64);
        e.values
            .insert("min_free_mib".into(), view.min_free_mib as f64);

        if let Some(c) = page_out(policy, vm, memo, e, now) {
            candidates.push(c);
            continue;
        }
        if target > e.planned_mib + policy.deadband_mib && host_state != HostState::Low {
            grow(
                policy,
                vm,
                memo,
                e,
                target,
                &mut room,
                calm_enough,
                &mut candidates,
            );
        } else if e.planned_mib > target + policy.deadband_mib {
            let above_max = e.planned_mib > vm.policy.max_mib;
            let allowed = host_state >= HostState::Soft || reallocating || above_max;
            if allowed {
                let rule = if host_state >= HostState::Soft {
                    Rule::ReclaimToTarget
                } else if above_max {
                    Rule::AboveMax
                } else {
                    Rule::Reallocate
                };
                shrink(
                    policy,
                    vm,
                    memo,
                    e,
                    target,
                    host_state,
                    rule,
                    &mut candidates,
                );
            } else {
                memo.large_shrink_ticks = 0;
            }
        } else {
            memo.large_shrink_ticks = 0;
        }
        merge(policy, vm, memo, e, host_state, now, &mut candidates);
    }

    // Update the remembered samples, then choose.
    for vm in &view.vms {
        let memo = state.vms.get_mut(&vm.id).expect("every VM has a memo");
        memo.prev = Some(Counters::of(&vm.signals));
    }
    candidates.sort_by_key(|c| c.priority);
    candidates.truncate(policy.decisions_per_tick as usize);
    let mut out = Vec::with_capacity(candidates.len());
    for c in candidates {
        let d = c.decision;
        let memo = state.vms.get_mut(&d.vm).expect("every VM has a memo");
        match d.action {
            DecisionAction::SetMerge { on } => {
                if on {
                    memo.merge_since_ms = Some(now);
                } else {
                    memo.merge_since_ms = None;
                    memo.merge_refused_until_ms = now + policy.retry_after_ms;
                }
            }
            _ => {
                if is_cancel(&d) {
                    memo.pending.remove(&d.tool);
                } else {
                    memo.pending.insert(
                        d.tool,
                        Pending {
                            to: d.to,
                            issued_ms: now,
                        },
                    );
                }
                if d.tool == Tool::Balloon && d.to > d.from {
                    memo.balloon_grew_at_ms = Some(now);
                }
            }
        }
        out.push(d);
    }
    out
}

fn is_cancel(d: &Decision) -> bool {
    matches!(
        d.reason.rule,
        Rule::BalloonDeadlineMissed | Rule::HotplugRefused
    )
}

/// Checks decisions in flight: done, or past their deadline (then cancelled, and the tool is
/// not used on the VM for `retry_after_ms`). A cancelled decision leaves `pending` when its
/// cancellation is chosen.
fn follow_up(policy: &Policy, vm: &VmView, memo: &mut VmMemo, now: u64, out: &mut Vec<Candidate>) {
    if let Some(f) = memo.floor {
        if now >= f.until_ms {
            memo.floor = None;
        }
    }
    memo.failed_until_ms.retain(|_, until| now < *until);
    let s = &vm.signals;
    let mut done = Vec::new();
    for (&tool, p) in &memo.pending {
        let elapsed = now.saturating_sub(p.issued_ms);
        match tool {
            Tool::Balloon => {
                let Some(b) = &s.balloon else {
                    done.push(tool);
                    continue;
                };
                if b.target_mib != p.to || b.actual_mib.abs_diff(b.target_mib) <= 1 {
                    done.push(tool);
                } else if elapsed >= policy.balloon_deadline_ms {
                    // A missed inflate stays pending until its cancellation is chosen (so a
                    // cancellation cut by `decisions_per_tick` comes again next tick).
                    if b.actual_mib >= b.target_mib {
                        done.push(tool);
                    } else {
                        memo.failed_until_ms
                            .insert(tool, now + policy.retry_after_ms);
                        out.push(cancel(
                            vm,
                            Tool::Balloon,
                            DecisionAction::SetBalloon {
                                target_mib: b.actual_mib,
                            },
                            b.target_mib,
                            b.actual_mib,
                            Rule::BalloonDeadlineMissed,
                            elapsed,
                        ));
                    }
                }
            }
            Tool::Hotplug => {
                let Some(h) = &s.hotplug else {
                    done.push(tool);
                    continue;
                };
                if h.requested_mib != p.to || h.plugged_mib == h.requested_mib {
                    done.push(tool);
                } else if elapsed >= policy.hotplug_deadline_ms {
                    memo.failed_until_ms
                        .insert(tool, now + policy.retry_after_ms);
                    out.push(cancel(
                        vm,
                        Tool::Hotplug,
                        DecisionAction::SetHotplug {
                            requested_mib: h.plugged_mib,
                        },
                        h.requested_mib,
                        h.plugged_mib,
                        Rule::HotplugRefused,
                        elapsed,
                    ));
                }
            }
            Tool::Swap => {
                let busy = s.swap.as_ref().is_some_and(|w| w.busy);
                if !busy || elapsed >= policy.balloon_deadline_ms {
                    done.push(tool);
                }
            }
            Tool::Merge => done.push(tool),
        }
    }
    for t in done {
        memo.pending.remove(&t);
    }
}

fn cancel(
    vm: &VmView,
    tool: Tool,
    action: DecisionAction,
    from: u64,
    to: u64,
    rule: Rule,
    elapsed_ms: u64,
) -> Candidate {
    let mut values = BTreeMap::new();
    values.insert("asked_mib".into(), from as f64);
    values.insert("reached_mib".into(), to as f64);
    values.insert("elapsed_ms".into(), elapsed_ms as f64);
    Candidate {
        priority: 1,
        decision: Decision {
            vm: vm.id.clone(),
            action,
            tool,
            from,
            to,
            reason: Reason { rule, values },
        },
    }
}

const MIB: u64 = 1 << 20;

/// Rates, pressure, working set and wants of one VM.
fn evaluate(policy: &Policy, vm: &VmView, memo: &mut VmMemo, now: u64) -> Eval {
    let s = &vm.signals;
    let swapped_mib = s.swap.as_ref().map_or(0, |w| w.swapped_pages.div_ceil(256));
    let alloc = s.guest_visible_mib().saturating_sub(swapped_mib);
    // Planned: what the VM will have once the decisions in flight are done.
    let boot = s.boot_mib;
    let balloon_planned = s.balloon.as_ref().map_or(0, |b| b.target_mib);
    let plugged_planned = s.hotplug.as_ref().map_or(0, |h| {
        if memo.pending.contains_key(&Tool::Hotplug) {
            h.requested_mib
        } else {
            h.plugged_mib
        }
    });
    let swapped_planned = memo.pending.get(&Tool::Swap).map_or(swapped_mib, |p| p.to);
    let planned =
        (boot.saturating_sub(balloon_planned) + plugged_planned).saturating_sub(swapped_planned);

    let cur = Counters::of(s);
    let mut values = BTreeMap::new();
    let (mut major_ps, mut swap_in_kps, mut host_faults_ps) = (0.0, 0.0, 0.0);
    let mut oom_rose = false;
    let mut stalls_rose = false;
    if let Some(prev) = memo.prev {
        let dt_s = cur.at_ms.saturating_sub(prev.at_ms) as f64 / 1000.0;
        if dt_s > 0.0 {
            major_ps = cur.major_faults.saturating_sub(prev.major_faults) as f64 / dt_s;
            swap_in_kps =
                cur.swap_in_bytes.saturating_sub(prev.swap_in_bytes) as f64 / 1024.0 / dt_s;
            host_faults_ps =
                cur.host_swap_faults.saturating_sub(prev.host_swap_faults) as f64 / dt_s;
        }
        oom_rose = cur.oom_kills > prev.oom_kills;
        stalls_rose = cur.alloc_stalls > prev.alloc_stalls;
    }
    let m = &policy.pressure;
    let guest_paging = major_ps >= m.major_faults_per_s || swap_in_kps >= m.swap_in_kib_per_s;
    let pressed =
        guest_paging || host_faults_ps >= m.host_swap_faults_per_s || oom_rose || stalls_rose;
    values.insert("major_faults_per_s".into(), major_ps);
    values.insert("swap_in_kib_per_s".into(), swap_in_kps);
    values.insert("host_swap_faults_per_s".into(), host_faults_ps);
    if oom_rose {
        values.insert("oom_kills".into(), cur.oom_kills as f64);
    }
    if stalls_rose {
        values.insert("alloc_stalls".into(), cur.alloc_stalls as f64);
    }

    // Working set: the guest's own numbers when it sends them (used memory it cannot drop plus
    // the part of its cache it reclaims slowly); otherwise what KVM's dirty log saw written
    // lately; otherwise everything the VM has (nothing known to be idle).
    // Statistics older than `stats_max_age_ms` say nothing about the guest now.
    let stats = s
        .balloon
        .as_ref()
        .filter(|b| {
            b.stats_age_ms
                .is_none_or(|age| age <= policy.stats_max_age_ms)
        })
        .and_then(|b| b.stats);
    let guest = stats.and_then(|st| {
        Some((
            st.total_bytes?,
            st.available_bytes?,
            st.caches_bytes.unwrap_or(0),
            st.free_bytes,
        ))
    });
    let mut known = true;
    let ws = if let Some((total, available, caches, _)) = guest {
        let used = total.saturating_sub(available) / MIB;
        used + ((caches / MIB) as f64 * policy.cache_in_working_set) as u64
    } else if let Some(ages) = s
        .ages
        .as_ref()
        .filter(|a| a.samples >= u64::from(policy.cold_after_samples))
    {
        let tracked: u64 = ages.not_written_for.iter().sum();
        let written =
            tracked.saturating_sub(ages.pages_colder_than(policy.cold_after_samples as usize));
        (written / 256).min(alloc)
    } else {
        known = false;
        alloc
    };
    let guest_swapped_mib = stats.map_or(0, |st| {
        st.swap_out_bytes
            .unwrap_or(0)
            .saturating_sub(st.swap_in_bytes.unwrap_or(0))
            / MIB
    });
    let headroom = (ws * u64::from(policy.headroom_pct) / 100).max(policy.headroom_min_mib);
    // Nothing known: the VM wants what it has.
    let mut want = if known { ws + headroom } else { alloc };
    if pressed {
        // A pressed guest also needs back what it paged out, and at least a step more.
        want = want
            .max(ws + guest_swapped_mib + headroom)
            .max(alloc + policy.grow_step_mib);
    }
    let giveable_mib = guest.map(|(_, _, caches, free)| {
        let free = free.unwrap_or(0) / MIB;
        let cache_given = ((caches / MIB) as f64 * (1.0 - policy.cache_in_working_set)) as u64;
        (free + cache_given).saturating_sub(headroom)
    });
    values.insert("working_set_mib".into(), ws as f64);
    values.insert("alloc_mib".into(), alloc as f64);

    let remembered = memo.floor.filter(|f| now < f.until_ms).map_or(0, |f| f.mib);
    let floor = vm
        .policy
        .floor_mib()
        .max(remembered)
        .min(vm.policy.max_mib.max(vm.policy.floor_mib()));
    let mean_count = s
        .sharing
        .as_ref()
        .and_then(|sh| sh.mean_count)
        .filter(|m| m.is_finite())
        .unwrap_or(1.0)
        .max(1.0);
    Eval {
        alloc_mib: alloc,
        planned_mib: planned,
        ws_mib: ws,
        want_mib: want,
        floor_mib: floor,
        pressed,
        guest_paging: guest_paging || oom_rose,
        guest_swapped_mib,
        giveable_mib,
        mean_count,
        values,
    }
}

/// Guest page-out detection (the "resource reservation application" idea, read from balloon
/// statistics): a guest pressed soon after its balloon grew was squeezed by it. Deflate and
/// remember a floor so that the balloon does not go there again for `floor_memory_ms`.
fn page_out(
    policy: &Policy,
    vm: &VmView,
    memo: &mut VmMemo,
    e: &Eval,
    now: u64,
) -> Option<Candidate> {
    let b = vm.signals.balloon.as_ref()?;
    let grew_at = memo.balloon_grew_at_ms?;
    if !e.guest_paging
        || now.saturating_sub(grew_at) > policy.page_out_window_ms
        || b.target_mib == 0
    {
        return None;
    }
    let deflating = memo
        .pending
        .get(&Tool::Balloon)
        .is_some_and(|p| p.to < b.actual_mib);
    if !policy.tools.balloon || deflating {
        return None;
    }
    let back = e
        .guest_swapped_mib
        .max(policy.grow_step_mib)
        .min(policy.rate_limits.balloon_mib)
        .min(b.target_mib);
    let to = b.target_mib - back;
    let floor = (e.alloc_mib + back).min(vm.policy.max_mib);
    memo.floor = Some(Floor {
        mib: floor,
        until_ms: now + policy.floor_memory_ms,
    });
    memo.balloon_grew_at_ms = None;
    memo.pending.remove(&Tool::Balloon);
    let mut values = e.values.clone();
    values.insert("floor_mib".into(), floor as f64);
    values.insert("guest_swapped_mib".into(), e.guest_swapped_mib as f64);
    Some(Candidate {
        priority: 0,
        decision: Decision {
            vm: vm.id.clone(),
            action: DecisionAction::SetBalloon { target_mib: to },
            tool: Tool::Balloon,
            from: b.target_mib,
            to,
            reason: Reason {
                rule: Rule::GuestPageOut,
                values,
            },
        },
    })
}

/// Whether hypervisor swap is the only way to take memory from the VM.
fn swap_only(policy: &Policy, vm: &VmView) -> bool {
    let balloon = policy.tools.balloon && vm.tools.balloon && vm.signals.balloon.is_some();
    let hotplug = policy.tools.hotplug
        && vm.tools.hotplug
        && vm
            .signals
            .hotplug
            .is_some_and(|h| h.driver_active && h.plugged_mib > 0);
    !balloon && !hotplug
}

fn usable(policy: &Policy, vm: &VmView, memo: &VmMemo, tool: Tool) -> bool {
    let (allowed, has) = match tool {
        Tool::Merge => (policy.tools.merge, vm.tools.merge),
        Tool::Balloon => (
            policy.tools.balloon,
            vm.tools.balloon && vm.signals.balloon.is_some(),
        ),
        Tool::Hotplug => (
            policy.tools.hotplug,
            vm.tools.hotplug && vm.signals.hotplug.is_some_and(|h| h.driver_active),
        ),
        Tool::Swap => (policy.tools.swap, vm.tools.swap),
    };
    allowed && has && !memo.pending.contains_key(&tool) && !memo.failed_until_ms.contains_key(&tool)
}

#[allow(clippy::too_many_arguments)]
fn candidate(
    vm: &VmView,
    priority: u32,
    tool: Tool,
    action: DecisionAction,
    from: u64,
    to: u64,
    rule: Rule,
    values: BTreeMap<String, f64>,
) -> Candidate {
    Candidate {
        priority,
        decision: Decision {
            vm: vm.id.clone(),
            action,
            tool,
            from,
            to,
            reason: Reason { rule, values },
        },
    }
}

/// Growth toward the target, within the free budget: swap-in once the host is calm (the
/// pages the host took come back first), balloon deflate, then virtio-mem plug above the
/// boot size (the hot-plug dynamic-memory design).
#[allow(clippy::too_many_arguments)]
fn grow(
    policy: &Policy,
    vm: &VmView,
    memo: &mut VmMemo,
    e: &Eval,
    target: u64,
    room: &mut u64,
    calm_enough: bool,
    out: &mut Vec<Candidate>,
) {
    memo.large_shrink_ticks = 0;
    let mut need = (target - e.planned_mib).min(*room);
    if need < policy.deadband_mib.min(target - e.planned_mib) {
        return;
    }
    let rule = if e.pressed {
        Rule::PressureGrow
    } else {
        Rule::GrowToTarget
    };
    let priority = if e.pressed { 2 } else { 4 };
    let s = &vm.signals;
    let mut values = e.values.clone();
    values.insert("room_mib".into(), *room as f64);

    let swapped = s.swap.as_ref().map_or(0, |w| w.swapped_pages / 256);
    if need > 0
        && swapped > 0
        && calm_enough
        && policy.swap_in_when_calm
        && usable(policy, vm, memo, Tool::Swap)
    {
        let amount = need.min(swapped).min(policy.rate_limits.swap_in_mib);
        let to = swapped - amount;
        out.push(candidate(
            vm,
            priority,
            Tool::Swap,
            DecisionAction::SwapIn { target_mib: to },
            swapped,
            to,
            rule,
            values.clone(),
        ));
        need -= amount;
        *room -= amount;
    }
    if let Some(b) = s.balloon.as_ref() {
        if need > 0 && b.target_mib > 0 && usable(policy, vm, memo, Tool::Balloon) {
            let amount = need.min(b.target_mib).min(policy.rate_limits.balloon_mib);
            let to = b.target_mib - amount;
            out.push(candidate(
                vm,
                priority,
                Tool::Balloon,
                DecisionAction::SetBalloon { target_mib: to },
                b.target_mib,
                to,
                rule,
                values.clone(),
            ));
            need -= amount;
            *room -= amount;
        }
    }
    if let Some(h) = s.hotplug.as_ref() {
        let block = (h.block_size_bytes / MIB).max(1);
        if need > 0 && h.requested_mib < h.region_mib && usable(policy, vm, memo, Tool::Hotplug) {
            // Whole blocks (rounding the level up), within the region.
            let step = need.min(policy.rate_limits.hotplug_mib.max(block));
            let to = ((h.requested_mib + step).div_ceil(block) * block)
                .min(h.region_mib / block * block);
            let amount = to.saturating_sub(h.requested_mib);
            // Whole blocks may overshoot the target a little, never the VM's max.
            if amount > 0 && e.planned_mib + amount <= vm.policy.max_mib {
                out.push(candidate(
                    vm,
                    priority,
                    Tool::Hotplug,
                    DecisionAction::SetHotplug { requested_mib: to },
                    h.requested_mib,
                    to,
                    rule,
                    values,
                ));
                *room = room.saturating_sub(amount);
            }
        }
    }
}

/// A shrink step: tool, action, from, to, the values that fired it.
type Planned = (Tool, DecisionAction, u64, u64, BTreeMap<String, f64>);

/// Shrinking toward the target, cheapest tool first.
#[allow(clippy::too_many_arguments)]
fn shrink(
    policy: &Policy,
    vm: &VmView,
    memo: &mut VmMemo,
    e: &Eval,
    target: u64,
    host_state: HostState,
    rule: Rule,
    out: &mut Vec<Candidate>,
) {
    let s = &vm.signals;
    let mut excess = e.planned_mib - target;
    memo.large_shrink_ticks = if excess >= policy.unplug_min_mib {
        memo.large_shrink_ticks + 1
    } else {
        0
    };
    let lasting = memo.large_shrink_ticks >= policy.unplug_lasting_ticks;
    let unplug = |excess: u64| -> Option<(u64, u64, u64)> {
        let h = s.hotplug.as_ref()?;
        if !usable(policy, vm, memo, Tool::Hotplug) || h.plugged_mib == 0 {
            return None;
        }
        let block = (h.block_size_bytes / MIB).max(1);
        // Whole blocks, never more than the excess (rounding the level up).
        let step = excess.min(policy.rate_limits.hotplug_mib.max(block));
        let to = h.requested_mib.saturating_sub(step).div_ceil(block) * block;
        (to < h.requested_mib).then(|| (h.requested_mib, to, h.requested_mib - to))
    };
    let mut plan: Vec<Planned> = Vec::new();
    // 1. A large shrink that lasted: whole virtio-mem blocks.
    if lasting {
        if let Some((from, to, amount)) = unplug(excess) {
            let mut v = e.values.clone();
            v.insert("shrink_mib".into(), excess as f64);
            v.insert("lasted_ticks".into(), f64::from(memo.large_shrink_ticks));
            plan.push((
                Tool::Hotplug,
                DecisionAction::SetHotplug { requested_mib: to },
                from,
                to,
                v,
            ));
            excess -= amount;
        }
    }
    // 2. The balloon, while the guest has free or cache pages to give (in the hard and low
    //    states, down to the working-set estimate: the guest picks its victims better than
    //    the host would). What the balloon will give over the next ticks is not swapped.
    let balloon_failed = memo.failed_until_ms.contains_key(&Tool::Balloon);
    if let Some(b) = s.balloon.as_ref().filter(|_| excess > 0) {
        if policy.tools.balloon && vm.tools.balloon && !balloon_failed {
            let above_ws = e.planned_mib.saturating_sub(e.ws_mib);
            let giveable = match e.giveable_mib {
                Some(g) if host_state < HostState::Hard => g,
                Some(g) => g.max(above_ws),
                None => u64::MAX,
            };
            let will_give = excess
                .min(giveable)
                .min(s.boot_mib.saturating_sub(b.target_mib));
            let amount = will_give.min(policy.rate_limits.balloon_mib);
            if amount > 0 && usable(policy, vm, memo, Tool::Balloon) {
                let to = b.target_mib + amount;
                let mut v = e.values.clone();
                if giveable != u64::MAX {
                    v.insert("giveable_mib".into(), giveable as f64);
                }
                plan.push((
                    Tool::Balloon,
                    DecisionAction::SetBalloon { target_mib: to },
                    b.target_mib,
                    to,
                    v,
                ));
            }
            excess -= will_give;
        }
    }
    // 3. Any plugged memory, block by block.
    if excess > 0 && !lasting {
        if let Some((from, to, amount)) = unplug(excess) {
            plan.push((
                Tool::Hotplug,
                DecisionAction::SetHotplug { requested_mib: to },
                from,
                to,
                e.values.clone(),
            ));
            excess -= amount;
        }
    }
    // 4. Hypervisor swap, only when the guest cannot give fast enough: no balloon, the
    //    balloon missed its deadline, or the host is hard or low. Oldest (cold) pages first.
    let has_balloon = policy.tools.balloon && vm.tools.balloon && s.balloon.is_some();
    let swap_ok = !has_balloon || balloon_failed || host_state >= HostState::Hard;
    if excess > 0 && swap_ok && usable(policy, vm, memo, Tool::Swap) {
        let swapped = s.swap.as_ref().map_or(0, |w| w.swapped_pages / 256);
        let rate = if host_state == HostState::Low {
            2 * policy.rate_limits.swap_out_mib
        } else {
            policy.rate_limits.swap_out_mib
        };
        let amount = excess.min(rate).min(s.boot_mib.saturating_sub(swapped));
        if amount > 0 {
            let to = swapped + amount;
            let mut v = e.values.clone();
            let why = if !has_balloon {
                0.0
            } else if balloon_failed {
                1.0
            } else {
                2.0
            };
            v.insert("swap_because".into(), why);
            plan.push((
                Tool::Swap,
                DecisionAction::SwapOut { target_mib: to },
                swapped,
                to,
                v,
            ));
        }
    }
    for (tool, action, from, to, values) in plan {
        out.push(candidate(vm, 3, tool, action, from, to, rule, values));
    }
}

/// Page merging: tried in the clear state or worse (ESXi shares pages from its clear state
/// on), kept only where the sharing metric then shows many pages shared (a mean map count of
/// at least `merge_keep_mean_count`).
fn merge(
    policy: &Policy,
    vm: &VmView,
    memo: &mut VmMemo,
    e: &Eval,
    host_state: HostState,
    now: u64,
    out: &mut Vec<Candidate>,
) {
    if !(policy.tools.merge && vm.tools.merge) {
        return;
    }
    if vm.merging {
        let since = *memo.merge_since_ms.get_or_insert(now);
        if now.saturating_sub(since) < policy.merge_trial_ms {
            return;
        }
        let Some(sh) = vm.signals.sharing.as_ref() else {
            return;
        };
        // Only a sample taken during the trial says whether merging pays.
        if sh.age_ms > now.saturating_sub(since) {
            return;
        }
        if e.mean_count < policy.merge_keep_mean_count {
            let mut values = e.values.clone();
            values.insert("mean_count".into(), e.mean_count);
            values.insert("median_count".into(), sh.median_count.unwrap_or(1.0));
            out.push(Candidate {
                priority: 6,
                decision: Decision {
                    vm: vm.id.clone(),
                    action: DecisionAction::SetMerge { on: false },
                    tool: Tool::Merge,
                    from: 1,
                    to: 0,
                    reason: Reason {
                        rule: Rule::MergeNotPaying,
                        values,
                    },
                },
            });
        }
    } else if host_state >= HostState::Clear && now >= memo.merge_refused_until_ms {
        let mut values = e.values.clone();
        values.insert("mean_count".into(), e.mean_count);
        out.push(Candidate {
            priority: 2,
            decision: Decision {
                vm: vm.id.clone(),
                action: DecisionAction::SetMerge { on: true },
                tool: Tool::Merge,
                from: 0,
                to: 1,
                reason: Reason {
                    rule: Rule::MergeTrial,
                    values,
                },
            },
        });
    }
}
