//! The host's scheduling policy: what `[host.policy]` in the host file and
//! `PUT /api/v1/host/policy` carry.
//!
//! Every key has a default, so an empty table is a valid policy (with `mode = "off"`, which
//! leaves every VM as configured). Unknown keys are refused by name, and
//! [`Policy::validate`] refuses values that make no sense with a one-line error naming the key.

use serde::{Deserialize, Serialize};

/// Whether the scheduler acts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every VM stays as configured: `decide` returns nothing (the default; `memvisor run`).
    #[default]
    Off,
    /// The scheduler keeps the host within its budget and moves memory between VMs.
    On,
}

/// Free-budget marks of the host states, in percent of `min_free`, as ESXi 6 places them
/// (clear below 100 %, soft below 64 %, hard below 32 %, low below 16 % of minFree).
///
/// A state is entered when the free budget falls below its mark and left (for a better state)
/// only when the free budget rises above the mark plus `leave_margin_pct` percent of it: the
/// marks for entering and leaving differ, so the host state does not flap around one mark.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateMarks {
    /// Below this the host is `clear` (merge identical pages).
    pub clear_pct: u32,
    /// Below this the host is `soft` (+ balloon).
    pub soft_pct: u32,
    /// Below this the host is `hard` (+ hypervisor swap).
    pub hard_pct: u32,
    /// Below this the host is `low` (+ swap at full rate, refuse growth).
    pub low_pct: u32,
    /// How far above a mark the free budget must rise to leave its state, percent of the mark.
    pub leave_margin_pct: u32,
}

impl Default for StateMarks {
    fn default() -> Self {
        StateMarks {
            clear_pct: 100,
            soft_pct: 64,
            hard_pct: 32,
            low_pct: 16,
            leave_margin_pct: 25,
        }
    }
}

/// Which tools the scheduler may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ToolSet {
    /// Page merging (KSM) per VM.
    pub merge: bool,
    /// Balloon targets.
    pub balloon: bool,
    /// virtio-mem requested sizes.
    pub hotplug: bool,
    /// Hypervisor swap.
    pub swap: bool,
}

impl Default for ToolSet {
    fn default() -> Self {
        ToolSet {
            merge: true,
            balloon: true,
            hotplug: true,
            swap: true,
        }
    }
}

/// How far one decision may move a tool on one VM in one tick, MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Balloon target change per tick (inflate or deflate).
    pub balloon_mib: u64,
    /// virtio-mem requested-size change per tick (rounded to whole blocks, at least one).
    pub hotplug_mib: u64,
    /// Swap-out per tick.
    pub swap_out_mib: u64,
    /// Swap-in per tick.
    pub swap_in_mib: u64,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            balloon_mib: 128,
            hotplug_mib: 256,
            swap_out_mib: 64,
            swap_in_mib: 64,
        }
    }
}

/// When a guest is under memory pressure, from the rates between two samples.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PressureMarks {
    /// Major faults per second (guest statistics) at or above which the guest is pressed.
    pub major_faults_per_s: f64,
    /// Guest swap-in, KiB per second.
    pub swap_in_kib_per_s: f64,
    /// Hypervisor swap faults per second.
    pub host_swap_faults_per_s: f64,
}

impl Default for PressureMarks {
    fn default() -> Self {
        PressureMarks {
            major_faults_per_s: 200.0,
            swap_in_kib_per_s: 1024.0,
            host_swap_faults_per_s: 400.0,
        }
    }
}

/// The host policy. See the module documentation and docs/scheduler.md.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// `off` (default) or `on`.
    pub mode: Mode,
    /// The host's tick period, ms (the host calls `decide` once per tick).
    pub tick_ms: u64,
    /// Host-state marks.
    pub states: StateMarks,
    /// Tools allowed.
    pub tools: ToolSet,
    /// Per-tool, per-VM limits, MiB per tick.
    pub rate_limits: RateLimits,
    /// At most this many decisions per tick, host-wide.
    pub decisions_per_tick: u32,
    /// Waldspurger's idle-memory tax, in [0, 1): an idle MiB costs `1 / (1 - tax)` times an
    /// active one when memory is taken back.
    pub idle_tax: f64,
    /// Part of the guest's page cache counted in its working set, in [0, 1].
    pub cache_in_working_set: f64,
    /// Headroom above the working-set estimate a VM is given when memory allows, percent.
    pub headroom_pct: u32,
    /// ... and at least this much, MiB.
    pub headroom_min_mib: u64,
    /// Moves smaller than this are not made (a VM within this of its target is left alone).
    pub deadband_mib: u64,
    /// A balloon change that has not reached its target after this long failed: it is
    /// cancelled and another tool is tried.
    pub balloon_deadline_ms: u64,
    /// The same for a virtio-mem unplug (the guest may refuse).
    pub hotplug_deadline_ms: u64,
    /// After a tool failed on a VM, it is not used again on that VM for this long.
    pub retry_after_ms: u64,
    /// Bring swapped pages back once the host has been calm (state high or clear, no guest
    /// pressed) for `calm_ticks` ticks.
    pub swap_in_when_calm: bool,
    /// Ticks of calm before swapping in.
    pub calm_ticks: u32,
    /// Guest statistics older than this are ignored (working set, what the guest can give),
    /// ms.
    pub stats_max_age_ms: u64,
    /// Dirty-log samples a page must go unwritten to be cold (usage classes and the
    /// working-set estimate of VMs without guest statistics).
    pub cold_after_samples: u32,
    /// Guest pressure marks.
    pub pressure: PressureMarks,
    /// A guest that pages out within this long after its balloon grew was squeezed by it.
    pub page_out_window_ms: u64,
    /// How long a balloon floor remembered after a guest page-out holds.
    pub floor_memory_ms: u64,
    /// A VM under pressure asks for at least this much more per tick, MiB.
    pub grow_step_mib: u64,
    /// A shrink at least this large (MiB) that lasted `unplug_lasting_ticks` is done by
    /// virtio-mem unplug when the VM has plugged memory.
    pub unplug_min_mib: u64,
    /// Ticks a large shrink must last before unplugging.
    pub unplug_lasting_ticks: u32,
    /// Merging turned on for a trial keeps going only if, after `merge_trial_ms`, the VM's
    /// sharing metric shows a mean map count at least this high.
    pub merge_keep_mean_count: f64,
    /// How long a merge trial runs before the sharing metric is judged, ms.
    pub merge_trial_ms: u64,
    /// How much dearer a MiB taken by hypervisor swap is than one the guest gives (weights
    /// the targets of VMs that only swap can shrink), at least 1.
    pub swap_only_cost: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            mode: Mode::Off,
            tick_ms: 1000,
            states: StateMarks::default(),
            tools: ToolSet::default(),
            rate_limits: RateLimits::default(),
            decisions_per_tick: 16,
            idle_tax: 0.75,
            cache_in_working_set: 0.5,
            headroom_pct: 10,
            headroom_min_mib: 16,
            deadband_mib: 16,
            balloon_deadline_ms: 10_000,
            hotplug_deadline_ms: 10_000,
            retry_after_ms: 60_000,
            swap_in_when_calm: true,
            calm_ticks: 10,
            stats_max_age_ms: 10_000,
            cold_after_samples: 4,
            pressure: PressureMarks::default(),
            page_out_window_ms: 10_000,
            floor_memory_ms: 120_000,
            grow_step_mib: 64,
            unplug_min_mib: 256,
            unplug_lasting_ticks: 5,
            merge_keep_mean_count: 1.2,
            merge_trial_ms: 30_000,
            swap_only_cost: 4.0,
        }
    }
}

/// Why a [`Policy`] is refused.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyValueError {
    /// A key's value is outside what it may be.
    #[error("policy key `{key}`: {why}")]
    Invalid {
        /// The key, dotted (`states.soft_pct`).
        key: &'static str,
        /// What is wrong, with the value.
        why: String,
    },
}

impl Policy {
    /// A policy with the scheduler on and every other key at its default.
    pub fn on() -> Self {
        Policy {
            mode: Mode::On,
            ..Policy::default()
        }
    }

    /// Checks every key; the first bad one is named in a one-line error.
    pub fn validate(&self) -> Result<(), PolicyValueError> {
        let bad = |key: &'static str, why: String| Err(PolicyValueError::Invalid { key, why });
        if self.tick_ms == 0 {
            return bad("tick_ms", "must be at least 1".into());
        }
        let s = &self.states;
        if !(s.clear_pct > s.soft_pct && s.soft_pct > s.hard_pct && s.hard_pct > s.low_pct) {
            return bad(
                "states",
                format!(
                    "marks must fall strictly: clear {} > soft {} > hard {} > low {}",
                    s.clear_pct, s.soft_pct, s.hard_pct, s.low_pct
                ),
            );
        }
        if s.low_pct == 0 {
            return bad("states.low_pct", "must be at least 1".into());
        }
        if s.leave_margin_pct > 100 {
            return bad(
                "states.leave_margin_pct",
                format!("{} is above 100", s.leave_margin_pct),
            );
        }
        let r = &self.rate_limits;
        for (key, v) in [
            ("rate_limits.balloon_mib", r.balloon_mib),
            ("rate_limits.hotplug_mib", r.hotplug_mib),
            ("rate_limits.swap_out_mib", r.swap_out_mib),
            ("rate_limits.swap_in_mib", r.swap_in_mib),
        ] {
            if v == 0 {
                return bad(
                    key,
                    "must be at least 1 (turn the tool off in `tools` instead)".into(),
                );
            }
        }
        if self.decisions_per_tick == 0 {
            return bad("decisions_per_tick", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.idle_tax) {
            return bad("idle_tax", format!("{} is not in [0, 1)", self.idle_tax));
        }
        if !(0.0..=1.0).contains(&self.cache_in_working_set) {
            return bad(
                "cache_in_working_set",
                format!("{} is not in [0, 1]", self.cache_in_working_set),
            );
        }
        for (key, v) in [
            (
                "pressure.major_faults_per_s",
                self.pressure.major_faults_per_s,
            ),
            (
                "pressure.swap_in_kib_per_s",
                self.pressure.swap_in_kib_per_s,
            ),
            (
                "pressure.host_swap_faults_per_s",
                self.pressure.host_swap_faults_per_s,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(key, format!("{v} is not a positive number"));
            }
        }
        if !(self.merge_keep_mean_count.is_finite() && self.merge_keep_mean_count >= 1.0) {
            return bad(
                "merge_keep_mean_count",
                format!(
                    "{} is below 1 (a mapped page has a count of 1)",
                    self.merge_keep_mean_count
                ),
            );
        }
        if !(self.swap_only_cost.is_finite() && self.swap_only_cost >= 1.0) {
            return bad(
                "swap_only_cost",
                format!("{} is below 1", self.swap_only_cost),
            );
        }
        if self.balloon_deadline_ms < self.tick_ms {
            return bad(
                "balloon_deadline_ms",
                format!(
                    "{} is shorter than one tick ({} ms)",
                    self.balloon_deadline_ms, self.tick_ms
                ),
            );
        }
        if self.hotplug_deadline_ms < self.tick_ms {
            return bad(
                "hotplug_deadline_ms",
                format!(
                    "{} is shorter than one tick ({} ms)",
                    self.hotplug_deadline_ms, self.tick_ms
                ),
            );
        }
        if self.grow_step_mib == 0 {
            return bad("grow_step_mib", "must be at least 1".into());
        }
        Ok(())
    }

    /// `1 / (1 - idle_tax)`: what an idle MiB costs relative to an active one.
    pub fn idle_cost(&self) -> f64 {
        1.0 / (1.0 - self.idle_tax.clamp(0.0, 0.99))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_is_valid_and_off() {
        let p = Policy::default();
        assert_eq!(p.validate(), Ok(()));
        assert_eq!(p.mode, Mode::Off);
        assert_eq!(p.idle_tax, 0.75);
        assert_eq!(p.idle_cost(), 4.0);
    }

    #[test]
    fn an_empty_table_is_the_default() {
        let p: Policy = serde_json::from_str("{}").expect("empty policy");
        assert_eq!(p, Policy::default());
        let p: Policy =
            serde_json::from_str(r#"{"mode": "on", "rate_limits": {"balloon_mib": 32}}"#)
                .expect("partial policy");
        assert_eq!(p.mode, Mode::On);
        assert_eq!(p.rate_limits.balloon_mib, 32);
        assert_eq!(
            p.rate_limits.swap_out_mib,
            RateLimits::default().swap_out_mib
        );
    }

    #[test]
    fn the_host_file_table_reads_as_toml() {
        // As `[host.policy]` of a host file carries it (the table's own keys).
        let text = r#"
            mode = "on"
            tick_ms = 500
            idle_tax = 0.5
            decisions_per_tick = 4
            [tools]
            swap = false
            [rate_limits]
            balloon_mib = 64
            [states]
            soft_pct = 50
            [pressure]
            major_faults_per_s = 1000.0
        "#;
        let p: Policy = toml::from_str(text).expect("a TOML policy");
        assert_eq!(p.mode, Mode::On);
        assert_eq!(p.tick_ms, 500);
        assert_eq!(p.idle_tax, 0.5);
        assert!(!p.tools.swap && p.tools.balloon);
        assert_eq!(p.rate_limits.balloon_mib, 64);
        assert_eq!(p.states.soft_pct, 50);
        assert_eq!(p.states.hard_pct, StateMarks::default().hard_pct);
        assert_eq!(p.pressure.major_faults_per_s, 1000.0);
        assert_eq!(p.validate(), Ok(()));
        let e = toml::from_str::<Policy>("[tools]\nballoons = true").expect_err("typo");
        assert!(e.to_string().contains("balloons"), "{e}");
    }

    #[test]
    fn unknown_keys_are_refused_by_name() {
        let e = serde_json::from_str::<Policy>(r#"{"idle_tx": 0.5}"#).expect_err("typo");
        assert!(e.to_string().contains("idle_tx"), "{e}");
        let e = serde_json::from_str::<Policy>(r#"{"states": {"soft": 50}}"#).expect_err("typo");
        assert!(e.to_string().contains("soft"), "{e}");
        let e = serde_json::from_str::<Policy>(r#"{"mode": "auto"}"#).expect_err("bad mode");
        assert!(e.to_string().contains("auto"), "{e}");
    }

    #[test]
    fn bad_values_are_named_in_one_line() {
        let cases: Vec<(Policy, &str)> = vec![
            (
                Policy {
                    idle_tax: 1.0,
                    ..Policy::default()
                },
                "idle_tax",
            ),
            (
                Policy {
                    tick_ms: 0,
                    ..Policy::default()
                },
                "tick_ms",
            ),
            (
                Policy {
                    decisions_per_tick: 0,
                    ..Policy::default()
                },
                "decisions_per_tick",
            ),
            (
                Policy {
                    states: StateMarks {
                        soft_pct: 120,
                        ..StateMarks::default()
                    },
                    ..Policy::default()
                },
                "states",
            ),
            (
                Policy {
                    rate_limits: RateLimits {
                        swap_in_mib: 0,
                        ..RateLimits::default()
                    },
                    ..Policy::default()
                },
                "rate_limits.swap_in_mib",
            ),
            (
                Policy {
                    merge_keep_mean_count: 0.5,
                    ..Policy::default()
                },
                "merge_keep_mean_count",
            ),
            (
                Policy {
                    balloon_deadline_ms: 10,
                    ..Policy::default()
                },
                "balloon_deadline_ms",
            ),
            (
                Policy {
                    cache_in_working_set: f64::NAN,
                    ..Policy::default()
                },
                "cache_in_working_set",
            ),
        ];
        for (policy, key) in cases {
            let e = policy.validate().expect_err(key).to_string();
            assert!(e.contains(key), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
