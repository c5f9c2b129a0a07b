//! The scheduler's half of admission: can a new VM start, and what must move first?
//!
//! The host's admission control (`memory::admission`, the host issue) checks reservations: the
//! sum of reservations must fit in `memory_budget - min_free`. This module answers the next
//! question for a VM whose reservation fits, following VMware's expandable reservations: does
//! its boot size fit in the free budget; if not, can the other VMs be shrunk (never below
//! `max(min, reservation)`, nor below what their tools can give) to make room; if not, can it
//! start at its reservation and grow by virtio-mem later; otherwise it is refused with the
//! numbers. [`plan_admission`] is pure, like [`decide`](super::decide): it returns the plan
//! and the decisions that carry it out, and the host applies them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::targets::{self, Claim};
use super::{Decision, DecisionAction, HostView, Policy, Reason, Rule, Tool, VmView};
use crate::signals::VmPolicy;

/// The answer for a new VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "plan", rename_all = "snake_case")]
pub enum AdmissionPlan {
    /// The boot size fits in the free budget: start now.
    Fits {
        /// Free budget above `min_free` before the VM starts, MiB.
        free_mib: u64,
    },
    /// Start once the other VMs have given `reclaim_mib`: the decisions say how.
    ShrinkOthers {
        /// Memory to take from the others, MiB.
        reclaim_mib: u64,
        /// The decisions that take it (full size, not rate-limited).
        decisions: Vec<Decision>,
    },
    /// Boot with `start_mib` of RAM (at least the reservation) and grow by virtio-mem, up to
    /// `grow_mib` more, as memory becomes free. Needs a VM whose memory above `start_mib` is a
    /// virtio-mem region; the host checks that its configuration allows it.
    StartAtReservation {
        /// Boot RAM to start with, MiB.
        start_mib: u64,
        /// virtio-mem to plug later, MiB.
        grow_mib: u64,
        /// Memory to take from the others first, MiB (may be 0).
        reclaim_mib: u64,
        /// The decisions that take it.
        decisions: Vec<Decision>,
    },
    /// No way to start the VM.
    Refuse(AdmissionRefusal),
}

/// Why a VM cannot start, with the numbers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum AdmissionRefusal {
    /// The reservations would not fit.
    #[error(
        "reservations do not fit: budget {budget_mib} MiB minus min_free {min_free_mib} MiB, \
         {reserved_mib} MiB reserved, {asked_mib} MiB asked, short by {short_mib} MiB"
    )]
    Reservations {
        /// The host's budget.
        budget_mib: u64,
        /// Its `min_free`.
        min_free_mib: u64,
        /// Reservations of the running VMs.
        reserved_mib: u64,
        /// The new VM's reservation.
        asked_mib: u64,
        /// How much is missing.
        short_mib: u64,
    },
    /// Neither the boot size nor the reservation can be made free.
    #[error(
        "not enough memory: {free_mib} MiB free and {reclaimable_mib} MiB reclaimable from \
         other VMs, {asked_mib} MiB needed, short by {short_mib} MiB"
    )]
    Memory {
        /// Free budget above `min_free`.
        free_mib: u64,
        /// What the other VMs could give without going below their floors.
        reclaimable_mib: u64,
        /// The smallest start that was asked (the reservation, or the boot size).
        asked_mib: u64,
        /// How much is missing.
        short_mib: u64,
    },
}

/// Plans the start of a VM with policy `new` and `boot_mib` of boot RAM on the host `view`.
pub fn plan_admission(
    policy: &Policy,
    view: &HostView,
    new: &VmPolicy,
    boot_mib: u64,
) -> AdmissionPlan {
    let usable = view.memory_budget_mib.saturating_sub(view.min_free_mib);
    let reserved: u64 = view.vms.iter().map(|v| v.policy.reservation_mib).sum();
    if reserved + new.reservation_mib > usable {
        return AdmissionPlan::Refuse(AdmissionRefusal::Reservations {
            budget_mib: view.memory_budget_mib,
            min_free_mib: view.min_free_mib,
            reserved_mib: reserved,
            asked_mib: new.reservation_mib,
            short_mib: reserved + new.reservation_mib - usable,
        });
    }
    let free = (view.free_mib() - view.min_free_mib as i64).max(0) as u64;
    if boot_mib <= free {
        return AdmissionPlan::Fits { free_mib: free };
    }
    let capacities: Vec<u64> = view
        .vms
        .iter()
        .map(|vm| reclaimable_mib(policy, vm))
        .collect();
    let reclaimable: u64 = capacities.iter().sum();
    if boot_mib <= free + reclaimable {
        let need = boot_mib - free;
        return AdmissionPlan::ShrinkOthers {
            reclaim_mib: need,
            decisions: shrink_plan(policy, view, &capacities, need),
        };
    }
    let start = new.floor_mib();
    if start > 0 && start < boot_mib && start <= free + reclaimable && new.max_mib >= boot_mib {
        let need = start.saturating_sub(free);
        return AdmissionPlan::StartAtReservation {
            start_mib: start,
            grow_mib: boot_mib - start,
            reclaim_mib: need,
            decisions: shrink_plan(policy, view, &capacities, need),
        };
    }
    let asked = if start > 0 {
        start.min(boot_mib)
    } else {
        boot_mib
    };
    AdmissionPlan::Refuse(AdmissionRefusal::Memory {
        free_mib: free,
        reclaimable_mib: reclaimable,
        asked_mib: asked,
        short_mib: asked.saturating_sub(free + reclaimable),
    })
}

/// What one VM can give: down to its floor, as far as its charged memory and its tools go.
fn reclaimable_mib(policy: &Policy, vm: &VmView) -> u64 {
    let s = &vm.signals;
    let floor = vm.policy.floor_mib();
    let charged_above_floor = s.host.charged_mib.saturating_sub(floor);
    let visible = s.guest_visible_mib();
    let mut tools = 0;
    if policy.tools.balloon && vm.tools.balloon {
        if let Some(b) = &s.balloon {
            tools += s.boot_mib.saturating_sub(b.target_mib);
        }
    }
    if policy.tools.hotplug && vm.tools.hotplug {
        if let Some(h) = &s.hotplug {
            tools += h.requested_mib;
        }
    }
    if policy.tools.swap && vm.tools.swap {
        let swapped = s.swap.as_ref().map_or(0, |w| w.swapped_pages / 256);
        tools += s.boot_mib.saturating_sub(swapped);
    }
    charged_above_floor
        .min(visible.saturating_sub(floor))
        .min(tools)
}

/// Decisions taking `need_mib` from the VMs, by the same shares and idle tax as the targets,
/// each VM within `capacities`; balloon first, then virtio-mem, then swap.
fn shrink_plan(
    policy: &Policy,
    view: &HostView,
    capacities: &[u64],
    need_mib: u64,
) -> Vec<Decision> {
    if need_mib == 0 {
        return Vec::new();
    }
    let claims: Vec<Claim> = view
        .vms
        .iter()
        .zip(capacities)
        .map(|(vm, &cap)| {
            let size = vm.signals.host.charged_mib;
            Claim {
                natural_mib: size,
                floor_mib: size - cap.min(size),
                working_set_mib: working_set_hint(vm),
                shares: vm.policy.shares.max(1),
                pressed: false,
                mean_count: 1.0,
                reclaim_cost: 1.0,
            }
        })
        .collect();
    let total: u64 = claims.iter().map(|c| c.natural_mib).sum();
    let t = targets::allocate(&claims, total as i64 - need_mib as i64, policy.idle_cost());
    let mut out = Vec::new();
    for ((vm, c), t) in view.vms.iter().zip(&claims).zip(t) {
        let mut take = c.natural_mib - t;
        if take == 0 {
            continue;
        }
        let s = &vm.signals;
        let mut values = BTreeMap::new();
        values.insert("need_mib".into(), need_mib as f64);
        values.insert("take_mib".into(), take as f64);
        let mut push = |tool, action, from, to| {
            out.push(Decision {
                vm: vm.id.clone(),
                action,
                tool,
                from,
                to,
                reason: Reason {
                    rule: Rule::Admission,
                    values: values.clone(),
                },
            })
        };
        // Guest memory the host never backed frees nothing when taken: the balloon must take
        // it as well (the guest gives its untouched free pages first).
        let swapped = s.swap.as_ref().map_or(0, |w| w.swapped_pages / 256);
        let untouched = s
            .guest_visible_mib()
            .saturating_sub(swapped)
            .saturating_sub(s.host.charged_mib);
        if policy.tools.balloon && vm.tools.balloon {
            if let Some(b) = &s.balloon {
                let amount = (take + untouched).min(s.boot_mib.saturating_sub(b.target_mib));
                if amount > 0 {
                    let to = b.target_mib + amount;
                    push(
                        Tool::Balloon,
                        DecisionAction::SetBalloon { target_mib: to },
                        b.target_mib,
                        to,
                    );
                    take = take.saturating_sub(amount.saturating_sub(untouched));
                }
            }
        }
        if take > 0 && policy.tools.hotplug && vm.tools.hotplug {
            if let Some(h) = &s.hotplug {
                let block = (h.block_size_bytes >> 20).max(1);
                // Whole blocks, rounding the level down: at least `take` goes.
                let to = h.requested_mib.saturating_sub(take) / block * block;
                let amount = h.requested_mib - to;
                if amount > 0 {
                    push(
                        Tool::Hotplug,
                        DecisionAction::SetHotplug { requested_mib: to },
                        h.requested_mib,
                        to,
                    );
                    take = take.saturating_sub(amount);
                }
            }
        }
        if take > 0 && policy.tools.swap && vm.tools.swap {
            let swapped = s.swap.as_ref().map_or(0, |w| w.swapped_pages / 256);
            let to = swapped + take;
            push(
                Tool::Swap,
                DecisionAction::SwapOut { target_mib: to },
                swapped,
                to,
            );
        }
    }
    out
}

/// The guest's used memory when it reports it, else everything it has.
fn working_set_hint(vm: &VmView) -> u64 {
    let stats = vm.signals.balloon.as_ref().and_then(|b| b.stats);
    match stats.and_then(|s| Some((s.total_bytes?, s.available_bytes?))) {
        Some((total, available)) => total.saturating_sub(available) >> 20,
        None => vm.signals.host.charged_mib,
    }
}
