//! A simulator of guests under the scheduler: model guests whose memory demand follows a
//! trace, a balloon driver, a virtio-mem driver, hypervisor swap and page merging, advanced one
//! host tick at a time. It produces each VM's [`VmMemorySignals`] every tick and applies the
//! scheduler's [`Decision`]s the way the host would, so scenarios run the real [`decide`] end
//! to end without KVM. The scenario tests and `bench/overcommit` use it.
//!
//! The model, per guest (sizes in MiB, one tick = `tick_ms`):
//! - **Demand**: a hot working set of anonymous memory from a [`Trace`] (steady, growing, a
//!   phase shift, idle, a spike), plus cold anonymous memory touched rarely, plus page cache
//!   that the guest fills up to what it wants (of which a hot part is read often).
//! - **Guest reclaim**: when guest-visible memory is short, the guest drops cache, then pages
//!   anonymous memory out to its own swap, coldest first; paged-out hot pages fault back every
//!   tick (thrashing), paged-out cold ones rarely. Each page-out and fault is in the guest's
//!   statistics, as a real balloon driver reports them. Below `oom_floor_mib` of visible
//!   memory the guest's OOM killer runs (counted every tick it stays there).
//! - **Balloon**: the driver moves toward its target at `balloon_rate_mib` per tick; a guest
//!   without a driver never moves.
//! - **virtio-mem**: plugs and unplugs whole blocks after `hotplug_delay_ticks`; every
//!   `refuse_unplug_every`-th unplug request is refused, and an unplug never takes more than the
//!   guest has free or cache.
//! - **Hypervisor swap**: swaps out pages "not written lately" first, as the dirty log sees
//!   them: touched free pages, then page cache (read, not written: the host cannot tell it is
//!   hot), then cold anonymous memory, then hot. Swapped pages the guest touches fault back.
//! - **Merging**: VMs of one content group that all merge share their identical pages; KSM
//!   merges `merge_rate_mib` per tick.
//! - **Cost** (the modelled slowdown): stall time per tick from guest major faults
//!   (`guest_fault_ms`, a virtual-disk read), guest page-outs (`page_out_ms`) and hypervisor
//!   swap faults (`host_fault_ms`, as `bench/swap` measured fault-in here), capped at the tick.
//!
//! What it leaves out is listed in docs/scheduler.md.

use serde::{Deserialize, Serialize};

use super::{decide, Decision, DecisionAction, HostView, Policy, SchedulerState, VmTools, VmView};
use crate::signals::{
    BalloonSignals, GuestMemStats, HostSideSignals, HotplugSignals, PageAgeSignals, SharingSignals,
    SwapSignals, VmMemorySignals, VmPolicy,
};

const PAGES_PER_MIB: f64 = 256.0;
const MIB: u64 = 1 << 20;

/// A guest's hot working set over time, MiB.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Trace {
    /// The same all along.
    Steady(u64),
    /// From `from` to `to` over `over_ticks` ticks, then stays.
    Growing {
        /// Start.
        from: u64,
        /// End.
        to: u64,
        /// Ticks to get there.
        over_ticks: u64,
    },
    /// `first` until `at_tick`, then `then`.
    Shift {
        /// Before.
        first: u64,
        /// After.
        then: u64,
        /// When.
        at_tick: u64,
    },
    /// `base`, and `peak` from `at_tick` for `for_ticks`.
    Spike {
        /// Normal.
        base: u64,
        /// During the spike.
        peak: u64,
        /// Start of the spike.
        at_tick: u64,
        /// Length of the spike.
        for_ticks: u64,
    },
}

impl Trace {
    /// The hot working set at `tick`.
    pub fn at(&self, tick: u64) -> u64 {
        match *self {
            Trace::Steady(v) => v,
            Trace::Growing {
                from,
                to,
                over_ticks,
            } => {
                if tick >= over_ticks || over_ticks == 0 {
                    to
                } else {
                    let f = tick as f64 / over_ticks as f64;
                    (from as f64 + (to as f64 - from as f64) * f).round() as u64
                }
            }
            Trace::Shift {
                first,
                then,
                at_tick,
            } => {
                if tick < at_tick {
                    first
                } else {
                    then
                }
            }
            Trace::Spike {
                base,
                peak,
                at_tick,
                for_ticks,
            } => {
                if tick >= at_tick && tick < at_tick + for_ticks {
                    peak
                } else {
                    base
                }
            }
        }
    }
}

/// One model guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestSpec {
    /// VM id.
    pub id: String,
    /// Boot RAM.
    pub boot_mib: u64,
    /// virtio-mem region (0: no device).
    pub region_mib: u64,
    /// virtio-mem block size.
    pub block_mib: u64,
    /// Plugged at start.
    pub plugged_mib: u64,
    /// A balloon device.
    pub balloon: bool,
    /// ... with a working driver.
    pub balloon_driver: bool,
    /// Every n-th unplug request is refused (0: never).
    pub refuse_unplug_every: u32,
    /// A swap directory.
    pub swap: bool,
    /// Mergeable RAM.
    pub merge: bool,
    /// Hot anonymous working set.
    pub trace: Trace,
    /// Cold anonymous memory.
    pub cold_anon_mib: u64,
    /// Page cache the guest fills up to.
    pub cache_mib: u64,
    /// The part of the cache that is read often.
    pub hot_cache_mib: u64,
    /// Pages identical across the VMs of `content_group`.
    pub identical_mib: u64,
    /// Content group (VMs of one group have `identical_mib` in common).
    pub content_group: Option<u32>,
    /// The VM's policy.
    pub policy: VmPolicy,
    /// Guest-visible memory below which the guest's OOM killer runs.
    pub oom_floor_mib: u64,
}

impl GuestSpec {
    /// A guest with a balloon driver and a swap directory, no virtio-mem, no merging; policy
    /// min = OOM floor + 64 MiB, no reservation, max = boot.
    pub fn new(id: &str, boot_mib: u64, trace: Trace) -> Self {
        let oom_floor_mib = boot_mib / 8;
        GuestSpec {
            id: id.into(),
            boot_mib,
            region_mib: 0,
            block_mib: 128,
            plugged_mib: 0,
            balloon: true,
            balloon_driver: true,
            refuse_unplug_every: 0,
            swap: true,
            merge: false,
            trace,
            cold_anon_mib: boot_mib / 16,
            cache_mib: boot_mib / 4,
            hot_cache_mib: boot_mib / 16,
            identical_mib: 0,
            content_group: None,
            policy: VmPolicy {
                min_mib: oom_floor_mib + 64,
                max_mib: boot_mib,
                reservation_mib: 0,
                shares: VmPolicy::DEFAULT_SHARES,
            },
            oom_floor_mib,
        }
    }
}

/// The model's costs and rates.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimParams {
    /// Balloon driver speed, MiB per tick.
    pub balloon_rate_mib: u64,
    /// virtio-mem online/offline delay, ticks.
    pub hotplug_delay_ticks: u64,
    /// Hypervisor swap-out/in speed, MiB per tick.
    pub swap_rate_mib: u64,
    /// KSM merge speed, MiB per tick.
    pub merge_rate_mib: u64,
    /// Page cache fill speed, MiB per tick.
    pub cache_fill_mib: u64,
    /// Fraction of cold pages touched per tick.
    pub cold_touch: f64,
    /// Fraction of missing hot cache re-read per tick.
    pub cache_reread: f64,
    /// Stall per guest major fault, ms.
    pub guest_fault_ms: f64,
    /// Stall per guest page-out, ms.
    pub page_out_ms: f64,
    /// Stall per hypervisor swap fault, ms.
    pub host_fault_ms: f64,
    /// Guest major faults per tick with no memory shortage (file reads).
    pub base_major_faults: u64,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            balloon_rate_mib: 256,
            hotplug_delay_ticks: 2,
            swap_rate_mib: 512,
            merge_rate_mib: 64,
            cache_fill_mib: 16,
            cold_touch: 0.01,
            cache_reread: 0.2,
            guest_fault_ms: 0.1,
            page_out_ms: 0.02,
            host_fault_ms: 0.05,
            base_major_faults: 20,
        }
    }
}

/// One simulated VM's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimVm {
    /// Its description.
    pub spec: GuestSpec,
    /// Balloon target / actual.
    pub balloon_target_mib: u64,
    /// Balloon actual.
    pub balloon_actual_mib: u64,
    /// virtio-mem requested.
    pub requested_mib: u64,
    /// virtio-mem plugged.
    pub plugged_mib: u64,
    hotplug_wait: u64,
    unplug_requests: u32,
    unplug_refused: bool,
    /// Hypervisor swap target while a swap runs.
    pub swap_target_mib: Option<u64>,
    swap_armed: bool,
    /// Host-swapped MiB by what the guest uses them for: touched-free, cache, cold, hot.
    host_swapped: [f64; 4],
    /// Anonymous memory in guest RAM.
    pub anon_in_ram_mib: f64,
    /// Anonymous memory in the guest's own swap.
    pub guest_swapped_mib: f64,
    /// Page cache.
    pub cache_mib: f64,
    /// Guest memory the host has backed at some point (and not taken back).
    pub touched_mib: f64,
    used_mib: f64,
    /// Merging on.
    pub merging: bool,
    /// Identical pages merged.
    pub merged_mib: f64,
    saving_mib: f64,
    stats: GuestMemStats,
    /// Stall time so far, ms.
    pub stall_ms: f64,
    /// OOM kills so far.
    pub oom_kills: u64,
    /// Guest page-outs so far, pages.
    pub page_outs: u64,
    /// Hypervisor swap faults so far.
    pub host_swap_faults: u64,
    age_samples: u64,
}

impl SimVm {
    fn new(spec: GuestSpec) -> Self {
        SimVm {
            balloon_target_mib: 0,
            balloon_actual_mib: 0,
            requested_mib: spec.plugged_mib,
            plugged_mib: spec.plugged_mib,
            hotplug_wait: 0,
            unplug_requests: 0,
            unplug_refused: false,
            swap_target_mib: None,
            swap_armed: false,
            host_swapped: [0.0; 4],
            anon_in_ram_mib: 0.0,
            guest_swapped_mib: 0.0,
            cache_mib: 0.0,
            touched_mib: 0.0,
            used_mib: 0.0,
            merging: false,
            merged_mib: 0.0,
            saving_mib: 0.0,
            stats: GuestMemStats::default(),
            stall_ms: 0.0,
            oom_kills: 0,
            page_outs: 0,
            host_swap_faults: 0,
            age_samples: 0,
            spec,
        }
    }

    /// Its description.
    pub fn spec(&self) -> &GuestSpec {
        &self.spec
    }

    /// Guest-visible memory.
    pub fn visible_mib(&self) -> u64 {
        self.spec().boot_mib.saturating_sub(self.balloon_actual_mib) + self.plugged_mib
    }

    /// Hypervisor-swapped MiB.
    pub fn host_swapped_mib(&self) -> f64 {
        self.host_swapped.iter().sum()
    }

    /// Host memory charged: touched, not swapped, less what merging saves.
    pub fn charged_mib(&self) -> u64 {
        (self.touched_mib - self.host_swapped_mib() - self.saving_mib)
            .max(0.0)
            .round() as u64
    }

    /// What the scheduler's decisions leave the VM at most: visible memory once the balloon
    /// and virtio-mem reach their targets, less swap.
    pub fn planned_mib(&self) -> u64 {
        let s = self.spec();
        let swapped = self
            .swap_target_mib
            .unwrap_or(0)
            .max(self.host_swapped_mib() as u64);
        (s.boot_mib.saturating_sub(self.balloon_target_mib) + self.requested_mib)
            .saturating_sub(swapped)
    }

    /// One tick of the guest and its devices.
    fn step(&mut self, tick: u64, p: &SimParams) {
        let spec = self.spec().clone();
        // Devices.
        if spec.balloon && spec.balloon_driver {
            let t = self.balloon_target_mib;
            let a = self.balloon_actual_mib;
            self.balloon_actual_mib = if t > a {
                a + (t - a).min(p.balloon_rate_mib)
            } else {
                a - (a - t).min(p.balloon_rate_mib)
            };
        }
        if self.requested_mib != self.plugged_mib && !self.unplug_refused {
            self.hotplug_wait += 1;
            if self.hotplug_wait >= p.hotplug_delay_ticks {
                self.hotplug_wait = 0;
                if self.requested_mib > self.plugged_mib {
                    self.plugged_mib = self.requested_mib;
                } else {
                    // Offlining needs free (or droppable) memory in the guest.
                    let spare = (self.visible_mib() as f64 - self.anon_in_ram_mib).max(0.0) as u64;
                    let blocks =
                        (self.plugged_mib - self.requested_mib).min(spare) / spec.block_mib.max(1);
                    self.plugged_mib -= blocks * spec.block_mib.max(1);
                }
            }
        }
        let visible = self.visible_mib() as f64;

        // Guest memory.
        let hot = spec.trace.at(tick) as f64;
        let anon = hot + spec.cold_anon_mib as f64;
        let before_swapped = self.guest_swapped_mib;
        let fit = anon.min(visible);
        let must_swap = anon - fit;
        let mut major = p.base_major_faults as f64;
        let mut page_outs = 0.0;
        if must_swap > before_swapped {
            page_outs = must_swap - before_swapped;
            self.guest_swapped_mib = must_swap;
        } else {
            // Swapped pages come back when touched: hot ones at once, cold ones rarely.
            let hot_out = (before_swapped - spec.cold_anon_mib as f64).max(0.0);
            let cold_out = before_swapped - hot_out;
            let back = (hot_out + cold_out * p.cold_touch).min(before_swapped - must_swap);
            self.guest_swapped_mib = before_swapped - back;
            major += back * PAGES_PER_MIB;
            self.stats.swap_in_bytes =
                Some(self.stats.swap_in_bytes.unwrap_or(0) + (back * MIB as f64) as u64);
        }
        // Hot pages in the guest's swap fault every tick (thrashing), each pushing another out.
        let hot_thrash = (self.guest_swapped_mib - spec.cold_anon_mib as f64).max(0.0);
        if hot_thrash > 0.0 {
            major += hot_thrash * PAGES_PER_MIB;
            page_outs += hot_thrash;
            self.stats.swap_in_bytes =
                Some(self.stats.swap_in_bytes.unwrap_or(0) + (hot_thrash * MIB as f64) as u64);
            self.stats.alloc_stalls = Some(self.stats.alloc_stalls.unwrap_or(0) + 1);
        }
        self.anon_in_ram_mib = anon - self.guest_swapped_mib;
        let cache_room = (visible - self.anon_in_ram_mib).max(0.0);
        self.cache_mib = (self.cache_mib + p.cache_fill_mib as f64)
            .min(spec.cache_mib as f64)
            .min(cache_room);
        let missing_hot_cache = (spec.hot_cache_mib as f64 - self.cache_mib).max(0.0);
        major += missing_hot_cache * PAGES_PER_MIB * p.cache_reread;
        if visible < spec.oom_floor_mib as f64 {
            self.oom_kills += 1;
            self.stats.oom_kills = Some(self.oom_kills);
        }
        let free = (visible - self.anon_in_ram_mib - self.cache_mib).max(0.0);

        // Host side: touched memory, swap, merging. Pages the balloon or an unplug took are
        // dropped from swap without a fault (the swapper forgets discarded ranges).
        let used_before = self.used_mib;
        self.used_mib = self.anon_in_ram_mib + self.cache_mib;
        self.touched_mib = self.touched_mib.max(self.used_mib).min(visible);
        let hot_in_ram = (self.anon_in_ram_mib - spec.cold_anon_mib as f64)
            .max(0.0)
            .min(hot);
        let cold_in_ram = self.anon_in_ram_mib - hot_in_ram;
        let touched_free = (self.touched_mib - self.used_mib).max(0.0);
        let [hs_free, hs_cache, hs_cold, hs_hot] = &mut self.host_swapped;
        // Keep each bucket within what the guest has in that use now (the rest became free).
        for (b, cap) in [
            (&mut *hs_hot, hot_in_ram),
            (&mut *hs_cold, cold_in_ram),
            (&mut *hs_cache, self.cache_mib),
        ] {
            if *b > cap {
                *hs_free += *b - cap;
                *b = cap;
            }
        }
        *hs_free = hs_free.min(touched_free).max(0.0);
        // Faults: hot pages every tick, the hot part of the cache when re-read, cold rarely,
        // and free pages the guest writes as its use grows.
        let hot_cache_share = if self.cache_mib > 0.0 {
            (spec.hot_cache_mib as f64 / self.cache_mib).min(1.0)
        } else {
            0.0
        };
        let fault_hot = *hs_hot;
        let fault_cache = *hs_cache * hot_cache_share * p.cache_reread;
        let fault_cold = *hs_cold * p.cold_touch;
        let growth = (self.used_mib - used_before).max(0.0);
        let fault_free = if touched_free > 0.0 {
            (*hs_free * growth / (touched_free + growth)).min(*hs_free)
        } else {
            *hs_free
        };
        *hs_hot -= fault_hot;
        *hs_cache -= fault_cache;
        *hs_cold -= fault_cold;
        *hs_free -= fault_free;
        let host_faults =
            ((fault_hot + fault_cache + fault_cold + fault_free) * PAGES_PER_MIB).round() as u64;
        // A running swap-out or swap-in.
        if let Some(target) = self.swap_target_mib {
            let now = self.host_swapped_mib();
            let target = target as f64;
            if target > now {
                let mut left = (target - now).min(p.swap_rate_mib as f64);
                let caps = [
                    touched_free - self.host_swapped[0],
                    self.cache_mib - self.host_swapped[1],
                    cold_in_ram - self.host_swapped[2],
                    hot_in_ram - self.host_swapped[3],
                ];
                for (i, cap) in caps.into_iter().enumerate() {
                    let take = left.min(cap.max(0.0));
                    self.host_swapped[i] += take;
                    left -= take;
                }
                if left > 0.0 || (target - self.host_swapped_mib()).abs() < 0.5 {
                    self.swap_target_mib = None;
                }
            } else {
                let mut left = (now - target).min(p.swap_rate_mib as f64);
                for i in (0..4).rev() {
                    let take = left.min(self.host_swapped[i]);
                    self.host_swapped[i] -= take;
                    left -= take;
                }
                if (target - self.host_swapped_mib()).abs() < 0.5 {
                    self.swap_target_mib = None;
                }
            }
        }
        if self.merging && spec.content_group.is_some() {
            let can = (spec.identical_mib as f64).min(self.touched_mib - self.host_swapped_mib());
            self.merged_mib = (self.merged_mib + p.merge_rate_mib as f64).min(can.max(0.0));
        } else {
            self.merged_mib = 0.0;
        }

        // Statistics and costs.
        let major = major.round() as u64;
        let page_out_pages = (page_outs * PAGES_PER_MIB).round() as u64;
        let st = &mut self.stats;
        st.total_bytes = Some(visible as u64 * MIB);
        st.free_bytes = Some((free * MIB as f64) as u64);
        st.caches_bytes = Some((self.cache_mib * MIB as f64) as u64);
        st.available_bytes = Some(((free + self.cache_mib) * MIB as f64) as u64);
        st.major_faults = Some(st.major_faults.unwrap_or(0) + major);
        st.swap_out_bytes = Some(st.swap_out_bytes.unwrap_or(0) + page_out_pages * 4096);
        self.page_outs += page_out_pages;
        self.host_swap_faults += host_faults;
        let stall = (major - p.base_major_faults.min(major)) as f64 * p.guest_fault_ms
            + page_out_pages as f64 * p.page_out_ms
            + host_faults as f64 * p.host_fault_ms;
        self.stall_ms += stall;
        self.age_samples += 1;
    }

    /// Clamps `stall_ms` growth of the last tick to the tick's length.
    fn cap_stall(&mut self, before_ms: f64, tick_ms: u64) {
        self.stall_ms = self.stall_ms.min(before_ms + tick_ms as f64);
    }

    fn signals(&self, now_ms: u64, group_size: usize, cold_after: u32) -> VmMemorySignals {
        let spec = self.spec();
        let charged = self.charged_mib();
        let resident = (self.touched_mib - self.host_swapped_mib()).max(0.0);
        let shared = if group_size >= 2 {
            self.merged_mib
        } else {
            0.0
        };
        let resident_pages = (resident * PAGES_PER_MIB).round().max(1.0);
        let shared_pages = (shared * PAGES_PER_MIB).round();
        let mean =
            (shared_pages * group_size as f64 + (resident_pages - shared_pages)) / resident_pages;
        let hot = (self.anon_in_ram_mib - spec.cold_anon_mib as f64).max(0.0);
        let all_pages = ((spec.boot_mib + self.plugged_mib) as f64 * PAGES_PER_MIB) as u64;
        let written = ((hot + self.cache_mib * 0.05) * PAGES_PER_MIB) as u64;
        let mut buckets = vec![0u64; cold_after as usize + 1];
        buckets[0] = written.min(all_pages);
        buckets[cold_after as usize] += all_pages - buckets[0];
        VmMemorySignals {
            sampled_at_ms: now_ms,
            boot_mib: spec.boot_mib,
            balloon: spec.balloon.then(|| BalloonSignals {
                target_mib: self.balloon_target_mib,
                actual_mib: self.balloon_actual_mib,
                deflate_on_oom: false,
                stats: spec.balloon_driver.then_some(self.stats),
                stats_age_ms: spec.balloon_driver.then_some(0),
            }),
            hotplug: (spec.region_mib > 0).then(|| HotplugSignals {
                region_mib: spec.region_mib,
                block_size_bytes: spec.block_mib * MIB,
                plugged_mib: self.plugged_mib,
                requested_mib: self.requested_mib,
                driver_active: true,
            }),
            swap: self.swap_armed.then(|| SwapSignals {
                state: if self.swap_target_mib.is_some() {
                    "swapping_out".into()
                } else {
                    "active".into()
                },
                busy: self.swap_target_mib.is_some(),
                target_mib: self.swap_target_mib.unwrap_or(0),
                swapped_pages: (self.host_swapped_mib() * PAGES_PER_MIB).round() as u64,
                faults: self.host_swap_faults,
                fault_latency_p50_us: 50,
                errors: 0,
            }),
            sharing: spec.merge.then_some(SharingSignals {
                pages_sampled: 4096,
                pages_shared: shared_pages as u64,
                pages_exclusive: (resident_pages - shared_pages) as u64,
                mean_count: Some(mean),
                median_count: Some(if shared_pages * 2.0 > resident_pages {
                    group_size as f64
                } else {
                    1.0
                }),
                harmonic_mean_count: None,
                reclaimable_mib: (resident - shared) as u64,
                age_ms: 0,
            }),
            ages: Some(PageAgeSignals {
                interval_ms: 1000,
                samples: self.age_samples,
                not_written_for: buckets,
            }),
            host: HostSideSignals {
                resident_mib: resident.round() as u64,
                plugged_mib: self.plugged_mib,
                charged_mib: charged,
            },
        }
    }
}

/// A host of model guests.
#[derive(Clone, Debug)]
pub struct Sim {
    /// Tick length, ms.
    pub tick_ms: u64,
    /// Ticks so far.
    pub tick: u64,
    /// The budget, MiB.
    pub memory_budget_mib: u64,
    /// `min_free`, MiB.
    pub min_free_mib: u64,
    /// The guests.
    pub vms: Vec<SimVm>,
    /// The model's parameters.
    pub params: SimParams,
    /// Decisions the simulated host refused (a request the API would answer 400).
    pub refused: u64,
}

impl Sim {
    /// A host with `budget_mib`, `min_free_mib` and these guests, at tick 0. Each guest starts
    /// with its cache filled and its memory touched, as a guest that has run a while.
    pub fn new(budget_mib: u64, min_free_mib: u64, guests: Vec<GuestSpec>) -> Self {
        let mut sim = Sim {
            tick_ms: 1000,
            tick: 0,
            memory_budget_mib: budget_mib,
            min_free_mib,
            vms: Vec::new(),
            params: SimParams::default(),
            refused: 0,
        };
        for g in guests {
            sim.add(g);
        }
        sim
    }

    /// Adds a guest (a VM admitted now).
    pub fn add(&mut self, spec: GuestSpec) {
        let mut vm = SimVm::new(spec);
        let s = vm.spec().clone();
        let visible = vm.visible_mib() as f64;
        vm.anon_in_ram_mib = (s.trace.at(self.tick) as f64 + s.cold_anon_mib as f64).min(visible);
        vm.cache_mib = (s.cache_mib as f64).min(visible - vm.anon_in_ram_mib);
        vm.touched_mib = vm.anon_in_ram_mib + vm.cache_mib;
        vm.used_mib = vm.touched_mib;
        self.vms.push(vm);
    }

    /// The current time, ms.
    pub fn now_ms(&self) -> u64 {
        self.tick * self.tick_ms
    }

    /// Host memory charged to all VMs, MiB.
    pub fn charged_mib(&self) -> u64 {
        self.vms.iter().map(SimVm::charged_mib).sum()
    }

    /// The VM with this id.
    pub fn vm(&self, id: &str) -> &SimVm {
        self.vms
            .iter()
            .find(|v| v.spec().id == id)
            .expect("a VM with this id")
    }

    fn group_size(&self, vm: &SimVm) -> usize {
        match vm.spec().content_group {
            Some(g) => self
                .vms
                .iter()
                .filter(|o| o.spec().content_group == Some(g) && o.merging && o.merged_mib > 0.0)
                .count(),
            None => 0,
        }
    }

    /// The host as the scheduler sees it now.
    pub fn view(&self, policy: &Policy) -> HostView {
        HostView {
            now_ms: self.now_ms(),
            memory_budget_mib: self.memory_budget_mib,
            min_free_mib: self.min_free_mib,
            vms: self
                .vms
                .iter()
                .map(|vm| {
                    let s = vm.spec();
                    VmView {
                        id: s.id.clone(),
                        policy: s.policy,
                        signals: vm.signals(
                            self.now_ms(),
                            self.group_size(vm),
                            policy.cold_after_samples,
                        ),
                        tools: VmTools {
                            balloon: s.balloon,
                            hotplug: s.region_mib > 0,
                            swap: s.swap,
                            merge: s.merge,
                        },
                        merging: vm.merging,
                    }
                })
                .collect(),
        }
    }

    /// Applies decisions as the host's API would: a request the VM cannot take is refused
    /// (counted in `refused`) and changes nothing.
    pub fn apply(&mut self, decisions: &[Decision]) {
        for d in decisions {
            let Some(vm) = self.vms.iter_mut().find(|v| v.spec().id == d.vm) else {
                self.refused += 1;
                continue;
            };
            let s = vm.spec().clone();
            let ok = match d.action {
                DecisionAction::SetBalloon { target_mib }
                    if s.balloon && target_mib <= s.boot_mib =>
                {
                    vm.balloon_target_mib = target_mib;
                    true
                }
                DecisionAction::SetHotplug { requested_mib }
                    if s.region_mib > 0
                        && requested_mib <= s.region_mib
                        && requested_mib % s.block_mib == 0 =>
                {
                    if requested_mib < vm.plugged_mib {
                        vm.unplug_requests += 1;
                        vm.unplug_refused = s.refuse_unplug_every > 0
                            && vm.unplug_requests % s.refuse_unplug_every == 0;
                    } else {
                        vm.unplug_refused = false;
                    }
                    vm.requested_mib = requested_mib;
                    vm.hotplug_wait = 0;
                    true
                }
                DecisionAction::SwapOut { target_mib } | DecisionAction::SwapIn { target_mib }
                    if s.swap && target_mib <= s.boot_mib =>
                {
                    vm.swap_armed = true;
                    vm.swap_target_mib = Some(target_mib);
                    true
                }
                DecisionAction::SetMerge { on } if s.merge => {
                    vm.merging = on;
                    true
                }
                _ => false,
            };
            if !ok {
                self.refused += 1;
            }
        }
    }

    /// Advances one tick.
    pub fn step(&mut self) {
        self.tick += 1;
        let tick = self.tick;
        let params = self.params.clone();
        for vm in &mut self.vms {
            let before = vm.stall_ms;
            vm.step(tick, &params);
            vm.cap_stall(before, self.tick_ms);
        }
        let sizes: Vec<usize> = self.vms.iter().map(|v| self.group_size(v)).collect();
        for (vm, n) in self.vms.iter_mut().zip(sizes) {
            vm.saving_mib = if n >= 2 {
                vm.merged_mib * (n - 1) as f64 / n as f64
            } else {
                0.0
            };
        }
    }
}

/// A named scenario: a host, its guests, and how long to run.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Name.
    pub name: &'static str,
    /// Budget, MiB.
    pub memory_budget_mib: u64,
    /// `min_free`, MiB.
    pub min_free_mib: u64,
    /// Ticks to run.
    pub ticks: u64,
    /// The guests.
    pub guests: Vec<GuestSpec>,
}

impl Scenario {
    /// Sum of the guests' boot sizes over the budget.
    pub fn overcommit(&self) -> f64 {
        let sum: u64 = self.guests.iter().map(|g| g.boot_mib + g.plugged_mib).sum();
        sum as f64 / self.memory_budget_mib as f64
    }

    /// (a) Four 1 GiB VMs with different demands and full page caches, budget 60 % of their
    /// sum: over budget from the start.
    pub fn four_vms() -> Self {
        let mut guests = vec![
            GuestSpec::new("steady", 1024, Trace::Steady(400)),
            GuestSpec::new(
                "growing",
                1024,
                Trace::Growing {
                    from: 150,
                    to: 450,
                    over_ticks: 100,
                },
            ),
            GuestSpec::new("idle", 1024, Trace::Steady(80)),
            GuestSpec::new(
                "spiky",
                1024,
                Trace::Spike {
                    base: 200,
                    peak: 450,
                    at_tick: 120,
                    for_ticks: 40,
                },
            ),
        ];
        // Guests that have run a while: their page cache fills half their RAM.
        for g in &mut guests {
            g.cache_mib = 512;
        }
        Scenario {
            name: "four-vms",
            memory_budget_mib: 4096 * 6 / 10,
            min_free_mib: 64,
            ticks: 240,
            guests,
        }
    }

    /// (b) Demand moves from one VM to the other at tick 100.
    pub fn phase_shift() -> Self {
        let guests = vec![
            GuestSpec::new(
                "a",
                1024,
                Trace::Shift {
                    first: 650,
                    then: 120,
                    at_tick: 100,
                },
            ),
            GuestSpec::new(
                "b",
                1024,
                Trace::Shift {
                    first: 120,
                    then: 650,
                    at_tick: 100,
                },
            ),
        ];
        Scenario {
            name: "phase-shift",
            memory_budget_mib: 1400,
            min_free_mib: 32,
            ticks: 200,
            guests,
        }
    }

    /// (c) Three VMs, one of which has no balloon.
    pub fn no_balloon() -> Self {
        let mut bare = GuestSpec::new("bare", 1024, Trace::Steady(250));
        bare.balloon = false;
        let guests = vec![
            GuestSpec::new("b1", 1024, Trace::Steady(250)),
            GuestSpec::new("b2", 1024, Trace::Steady(250)),
            bare,
        ];
        Scenario {
            name: "no-balloon",
            memory_budget_mib: 1500,
            min_free_mib: 64,
            ticks: 150,
            guests,
        }
    }

    /// (d) Four identical VMs (one image: 400 MiB identical pages each).
    pub fn identical() -> Self {
        let guests = (0..4)
            .map(|i| {
                let mut g = GuestSpec::new(&format!("clone{i}"), 1024, Trace::Steady(350));
                g.merge = true;
                g.content_group = Some(1);
                g.identical_mib = 400;
                g
            })
            .collect();
        Scenario {
            name: "identical",
            memory_budget_mib: 2000,
            min_free_mib: 64,
            ticks: 150,
            guests,
        }
    }

    /// (f) Steady demand from the start.
    pub fn steady() -> Self {
        let guests = (0..4)
            .map(|i| GuestSpec::new(&format!("s{i}"), 1024, Trace::Steady(200 + 60 * i)))
            .collect();
        Scenario {
            name: "steady",
            memory_budget_mib: 2400,
            min_free_mib: 64,
            ticks: 300,
            guests,
        }
    }

    /// The mixed scenario of `bench/overcommit`: eight 1 GiB VMs on a 4 GiB budget (2x):
    /// steady, growing, a pair whose demand moves between them, idle, a spike, one without a
    /// balloon, three built from one image, one with part of its memory as virtio-mem.
    pub fn mixed() -> Self {
        let mut bare = GuestSpec::new("no-balloon", 1024, Trace::Steady(300));
        bare.balloon = false;
        let mut plug = GuestSpec::new(
            "hotplug",
            512,
            Trace::Growing {
                from: 150,
                to: 350,
                over_ticks: 200,
            },
        );
        plug.region_mib = 1024;
        plug.plugged_mib = 512;
        plug.policy.max_mib = 512 + 1024;
        let mut guests = vec![
            GuestSpec::new("steady", 1024, Trace::Steady(450)),
            GuestSpec::new(
                "phase-a",
                1024,
                Trace::Shift {
                    first: 550,
                    then: 150,
                    at_tick: 150,
                },
            ),
            GuestSpec::new(
                "phase-b",
                1024,
                Trace::Shift {
                    first: 150,
                    then: 550,
                    at_tick: 150,
                },
            ),
            GuestSpec::new("idle", 1024, Trace::Steady(60)),
            GuestSpec::new(
                "spike",
                1024,
                Trace::Spike {
                    base: 200,
                    peak: 500,
                    at_tick: 220,
                    for_ticks: 40,
                },
            ),
            bare,
            plug,
        ];
        for i in 0..2 {
            let mut g = GuestSpec::new(&format!("image{i}"), 1024, Trace::Steady(250));
            g.merge = true;
            g.content_group = Some(7);
            g.identical_mib = 300;
            guests.push(g);
        }
        Scenario {
            name: "mixed",
            memory_budget_mib: 4096 + 512,
            min_free_mib: 128,
            ticks: 400,
            guests,
        }
    }
}

/// The scheduling policy a run uses.
#[derive(Clone, Debug)]
pub enum RunPolicy {
    /// `decide` with this policy.
    Scheduler(Box<Policy>),
    /// Nothing is ever reclaimed.
    Static,
}

impl RunPolicy {
    /// memvisor's policy: every tool.
    pub fn memvisor() -> Self {
        RunPolicy::Scheduler(Box::new(Policy::on()))
    }

    /// The same rules with the balloon as the only tool.
    pub fn balloon_only() -> Self {
        let mut p = Policy::on();
        p.tools = super::ToolSet {
            merge: false,
            balloon: true,
            hotplug: false,
            swap: false,
        };
        RunPolicy::Scheduler(Box::new(p))
    }

    /// The same rules with hypervisor swap as the only tool.
    pub fn swap_only() -> Self {
        let mut p = Policy::on();
        p.tools = super::ToolSet {
            merge: false,
            balloon: false,
            hotplug: false,
            swap: true,
        };
        RunPolicy::Scheduler(Box::new(p))
    }
}

/// What one run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Sum of the guests' sizes over the host memory the run needed: the budget, or the 95th
    /// percentile of the charged memory once first within budget if that is higher (so a
    /// short excursion after a demand spike does not count, a lasting one does; over the
    /// whole run if never within budget).
    pub overcommit: f64,
    /// Stall time over VM time, all VMs.
    pub slowdown: f64,
    /// The worst VM's stall time over its time.
    pub worst_vm_slowdown: f64,
    /// OOM kills, all VMs.
    pub ooms: u64,
    /// Decisions made.
    pub decisions: u64,
    /// Ticks until the host was first within budget (`None`: never).
    pub ticks_to_budget: Option<u64>,
    /// Ticks over budget after that (a demand spike the scheduler has not caught up with).
    pub ticks_over_budget: u64,
    /// The longest run of consecutive ticks over budget after that.
    pub longest_over_budget: u64,
    /// Most host memory charged after `ticks_to_budget` (or over the whole run if never).
    pub peak_charged_mib: u64,
    /// Ticks on which some VM's target was outside `[max(min, reservation), max]`.
    pub target_violations: u64,
    /// Decisions that took a VM below `max(min, reservation)`.
    pub floor_violations: u64,
    /// Decisions the simulated host refused.
    pub refused: u64,
}

/// Runs `scenario` under `policy`; `each_tick` sees the sim, the scheduler state and the tick's
/// decisions after they were applied.
pub fn run_with(
    scenario: &Scenario,
    policy: &RunPolicy,
    mut each_tick: impl FnMut(&Sim, &SchedulerState, &[Decision]),
) -> RunReport {
    let mut sim = Sim::new(
        scenario.memory_budget_mib,
        scenario.min_free_mib,
        scenario.guests.clone(),
    );
    let mut state = SchedulerState::default();
    let mut report = RunReport::default();
    let mut charged_trace = Vec::with_capacity(scenario.ticks as usize);
    for _ in 0..scenario.ticks {
        let decisions = match policy {
            RunPolicy::Scheduler(p) => {
                let view = sim.view(p);
                let d = decide(p, &view, &mut state);
                for vm in &view.vms {
                    if let Some(r) = state.vm(&vm.id) {
                        let floor = vm.policy.floor_mib();
                        if r.target_mib < floor.min(vm.policy.max_mib)
                            || r.target_mib > vm.policy.max_mib.max(floor)
                        {
                            report.target_violations += 1;
                        }
                    }
                }
                d
            }
            RunPolicy::Static => Vec::new(),
        };
        let before: Vec<u64> = sim.vms.iter().map(SimVm::planned_mib).collect();
        sim.apply(&decisions);
        for (i, vm) in sim.vms.iter().enumerate() {
            let floor = vm.spec().policy.floor_mib();
            let after = vm.planned_mib();
            if after < before[i] && after < floor {
                report.floor_violations += 1;
            }
        }
        report.decisions += decisions.len() as u64;
        each_tick(&sim, &state, &decisions);
        sim.step();
        charged_trace.push(sim.charged_mib());
    }
    let budget = scenario.memory_budget_mib;
    let first = charged_trace.iter().position(|&c| c <= budget);
    report.ticks_to_budget = first.map(|t| t as u64);
    let after = &charged_trace[first.unwrap_or(0)..];
    report.ticks_over_budget = after.iter().filter(|&&c| c > budget).count() as u64;
    report.longest_over_budget = after
        .split(|&c| c <= budget)
        .map(|run| run.len() as u64)
        .max()
        .unwrap_or(0);
    report.peak_charged_mib = after.iter().copied().max().unwrap_or(0);
    let mut sorted = after.to_vec();
    sorted.sort_unstable();
    let p95 = sorted
        .get(sorted.len().saturating_sub(1) * 95 / 100)
        .copied()
        .unwrap_or(0);
    let sizes: u64 = scenario
        .guests
        .iter()
        .map(|g| g.boot_mib + g.plugged_mib)
        .sum();
    report.overcommit = sizes as f64 / p95.max(budget) as f64;
    let vm_ms = (scenario.ticks * sim.tick_ms) as f64;
    let stalls: Vec<f64> = sim.vms.iter().map(|v| v.stall_ms / vm_ms).collect();
    report.slowdown = stalls.iter().sum::<f64>() / stalls.len().max(1) as f64;
    report.worst_vm_slowdown = stalls.iter().copied().fold(0.0, f64::max);
    report.ooms = sim.vms.iter().map(|v| v.oom_kills).sum();
    report.refused = sim.refused;
    report
}

/// Runs `scenario` under `policy`.
pub fn run(scenario: &Scenario, policy: &RunPolicy) -> RunReport {
    run_with(scenario, policy, |_, _, _| {})
}
