//! Usage classes: where one VM's memory is, estimated from its signals.
//!
//! The idea is VMware's ("tracking guest memory characteristics for memory scheduling"): a
//! scheduler that knows how much of a VM's memory is free in the guest, is cache, is cold or is
//! already shared decides better than one that knows only how much is resident. Every tick the
//! host turns a VM's [`VmMemorySignals`] into [`UsageClasses`]: the VM's largest size (boot RAM
//! plus the hotplug region) split into disjoint classes that always sum to that size.
//!
//! The classes are assigned in a fixed order, each taking at most what the earlier ones left,
//! so none is negative and they always partition the VM:
//!
//! | class | from | exact or estimated |
//! |---|---|---|
//! | `unplugged` | virtio-mem region minus plugged memory | exact |
//! | `ballooned` | the balloon's actual size | exact |
//! | `swapped` | the swapper's swapped pages | exact |
//! | `zero` | guest-visible memory the host has not backed (not resident, not swapped) | exact at the sample |
//! | `shared` | resident pages whose host frame is mapped twice or more | **sampled**: the sharing sampler's shared fraction times the resident pages |
//! | `guest_free` | the guest's free memory (balloon statistics), minus the `zero` pages | estimate: assumes the never-touched pages are among the guest's free ones |
//! | `guest_cache` | the guest's page cache (balloon statistics) | as reported by the guest, capped |
//! | `cold` | pages not written for `cold_after_samples` dirty-log samples, minus the classes above that are never written (ballooned, zero, swapped, guest-free) | **sampled** by KVM's dirty log at its interval |
//! | `active` | the rest | what remains |
//!
//! Dirty logging sees writes only: a page read every tick but never written ages like an
//! unused one, so `cold` means "not written", not "not read". Guest statistics arrive when the
//! guest sends them (`stats_age_ms` in the signals); a VM without a balloon has no `guest_free`
//! or `guest_cache`, and one without age tracking has no `cold`: those pages count as `active`.

use serde::{Deserialize, Serialize};

use crate::signals::VmMemorySignals;

/// 4 KiB pages per MiB.
const PAGES_PER_MIB: u64 = 256;

/// One VM's pages by class. The classes are disjoint and sum to [`UsageClasses::total_pages`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageClasses {
    /// The VM's largest size: boot RAM plus the hotplug region, pages.
    pub total_pages: u64,
    /// Hotplug-region pages not plugged.
    pub unplugged_pages: u64,
    /// Pages in the balloon.
    pub ballooned_pages: u64,
    /// Pages in the VM's swap file.
    pub swapped_pages: u64,
    /// Guest-visible pages the host does not back (never touched or discarded).
    pub zero_pages: u64,
    /// Resident pages whose host frame is shared (map count >= 2), estimated from a sample.
    pub shared_pages: u64,
    /// Resident pages the guest reports free.
    pub guest_free_pages: u64,
    /// Pages of the guest's page cache.
    pub guest_cache_pages: u64,
    /// Pages not written for at least `cold_after_samples` dirty-log samples.
    pub cold_pages: u64,
    /// The rest: pages the guest uses and has written lately.
    pub active_pages: u64,
    /// The `cold` threshold used, in dirty-log samples.
    pub cold_after_samples: u32,
}

impl UsageClasses {
    /// Estimates the classes of one VM from its signals. `cold_after_samples` is the number of
    /// dirty-log samples a page must go unwritten to count as cold.
    pub fn estimate(signals: &VmMemorySignals, cold_after_samples: u32) -> Self {
        let mib = |v: u64| v.saturating_mul(PAGES_PER_MIB);
        let region_pages = signals.hotplug.as_ref().map_or(0, |h| mib(h.region_mib));
        let total = mib(signals.boot_mib).saturating_add(region_pages);
        let mut left = total;

        let plugged = signals.hotplug.as_ref().map_or(0, |h| mib(h.plugged_mib));
        let unplugged = take(&mut left, region_pages.saturating_sub(plugged));
        let ballooned = take(
            &mut left,
            signals.balloon.as_ref().map_or(0, |b| mib(b.actual_mib)),
        );
        let swapped = take(
            &mut left,
            signals.swap.as_ref().map_or(0, |s| s.swapped_pages),
        );
        // What is left is guest-visible and not swapped; the host backs `resident` of it.
        let resident = mib(signals.host.resident_mib);
        let not_backed = left.saturating_sub(resident);
        let zero = take(&mut left, not_backed);

        let shared = match &signals.sharing {
            Some(s) if s.pages_shared + s.pages_exclusive > 0 => {
                let fraction = s.pages_shared as f64 / (s.pages_shared + s.pages_exclusive) as f64;
                let want = (left as f64 * fraction).round() as u64;
                take(&mut left, want)
            }
            _ => 0,
        };

        let stats = signals.balloon.as_ref().and_then(|b| b.stats);
        let pages_of = |bytes: Option<u64>| bytes.map_or(0, |b| b / 4096);
        let free_reported = stats.map_or(0, |s| pages_of(s.free_bytes));
        let guest_free = take(&mut left, free_reported.saturating_sub(zero));
        let guest_cache = take(&mut left, stats.map_or(0, |s| pages_of(s.caches_bytes)));

        let cold = match &signals.ages {
            Some(ages) if ages.samples >= u64::from(cold_after_samples) => {
                let not_written = ages.pages_colder_than(cold_after_samples as usize);
                let never_written = ballooned + zero + swapped + guest_free;
                take(&mut left, not_written.saturating_sub(never_written))
            }
            _ => 0,
        };
        let active = take(&mut left, u64::MAX);

        UsageClasses {
            total_pages: total,
            unplugged_pages: unplugged,
            ballooned_pages: ballooned,
            swapped_pages: swapped,
            zero_pages: zero,
            shared_pages: shared,
            guest_free_pages: guest_free,
            guest_cache_pages: guest_cache,
            cold_pages: cold,
            active_pages: active,
            cold_after_samples,
        }
    }

    /// The sum of every class; equals `total_pages`.
    pub fn sum_pages(&self) -> u64 {
        self.unplugged_pages
            + self.ballooned_pages
            + self.swapped_pages
            + self.zero_pages
            + self.shared_pages
            + self.guest_free_pages
            + self.guest_cache_pages
            + self.cold_pages
            + self.active_pages
    }
}

/// Takes up to `want` pages from `left`.
fn take(left: &mut u64, want: u64) -> u64 {
    let got = want.min(*left);
    *left -= got;
    got
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signals::{
        BalloonSignals, GuestMemStats, HostSideSignals, HotplugSignals, PageAgeSignals,
        SharingSignals, SwapSignals,
    };
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn vm() -> VmMemorySignals {
        VmMemorySignals {
            boot_mib: 1024,
            balloon: Some(BalloonSignals {
                target_mib: 128,
                actual_mib: 128,
                stats: Some(GuestMemStats {
                    free_bytes: Some(300 * MIB),
                    caches_bytes: Some(100 * MIB),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            hotplug: Some(HotplugSignals {
                region_mib: 512,
                block_size_bytes: 128 * MIB,
                plugged_mib: 256,
                requested_mib: 256,
                driver_active: true,
            }),
            swap: Some(SwapSignals {
                swapped_pages: 64 * 256,
                ..Default::default()
            }),
            sharing: Some(SharingSignals {
                pages_sampled: 1000,
                pages_shared: 100,
                pages_exclusive: 900,
                ..Default::default()
            }),
            ages: Some(PageAgeSignals {
                interval_ms: 1000,
                samples: 10,
                not_written_for: vec![100 * 256, 0, 0, 0, 700 * 256],
            }),
            host: HostSideSignals {
                resident_mib: 888,
                plugged_mib: 256,
                charged_mib: 888,
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_typical_vm_is_split_in_order() {
        let c = UsageClasses::estimate(&vm(), 4);
        let p = |mib: u64| mib * 256;
        assert_eq!(c.total_pages, p(1536));
        assert_eq!(c.unplugged_pages, p(256));
        assert_eq!(c.ballooned_pages, p(128));
        assert_eq!(c.swapped_pages, p(64));
        // Visible 1152, minus swapped 64 = 1088, resident 888: 200 MiB zero.
        assert_eq!(c.zero_pages, p(200));
        // 10 % of the 888 resident MiB.
        assert_eq!(c.shared_pages, (p(888) as f64 * 0.1).round() as u64);
        // 300 MiB free, 200 of which are the zero pages.
        assert_eq!(c.guest_free_pages, p(100));
        assert_eq!(c.guest_cache_pages, p(100));
        // 700 MiB unwritten, minus ballooned, zero, swapped and free (128+200+64+100).
        assert_eq!(c.cold_pages, p(700 - 492));
        assert_eq!(c.sum_pages(), c.total_pages);
    }

    #[test]
    fn without_balloon_or_ages_the_rest_is_active() {
        let s = VmMemorySignals {
            boot_mib: 256,
            host: HostSideSignals {
                resident_mib: 200,
                ..Default::default()
            },
            ..Default::default()
        };
        let c = UsageClasses::estimate(&s, 4);
        assert_eq!(c.zero_pages, 56 * 256);
        assert_eq!(c.active_pages, 200 * 256);
        assert_eq!(c.cold_pages + c.guest_free_pages + c.guest_cache_pages, 0);
    }

    #[test]
    fn ages_younger_than_the_threshold_give_no_cold_pages() {
        let mut s = vm();
        s.ages.as_mut().expect("ages").samples = 2;
        assert_eq!(UsageClasses::estimate(&s, 4).cold_pages, 0);
    }

    #[test]
    fn classes_serialise_by_name() {
        let json = serde_json::to_value(UsageClasses::estimate(&vm(), 4)).expect("serialises");
        assert!(json.get("guest_cache_pages").is_some(), "{json}");
        let back: UsageClasses = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, UsageClasses::estimate(&vm(), 4));
    }

    prop_compose! {
        fn any_signals()(
            boot in 0u64..4096, region in 0u64..4096, plugged in 0u64..5000,
            balloon in proptest::option::of(0u64..5000), swapped in 0u64..2_000_000,
            resident in 0u64..10_000, shared in 0u64..5000, exclusive in 0u64..5000,
            free in proptest::option::of(0u64..(8 << 30)), cache in proptest::option::of(0u64..(8 << 30)),
            ages in proptest::option::of(proptest::collection::vec(0u64..1_000_000, 0..8)),
            samples in 0u64..20,
        ) -> VmMemorySignals {
            VmMemorySignals {
                boot_mib: boot,
                balloon: balloon.map(|b| BalloonSignals {
                    actual_mib: b,
                    target_mib: b,
                    stats: Some(GuestMemStats { free_bytes: free, caches_bytes: cache, ..Default::default() }),
                    ..Default::default()
                }),
                hotplug: (region > 0).then_some(HotplugSignals {
                    region_mib: region, plugged_mib: plugged, requested_mib: plugged, ..Default::default()
                }),
                swap: Some(SwapSignals { swapped_pages: swapped, ..Default::default() }),
                sharing: Some(SharingSignals { pages_shared: shared, pages_exclusive: exclusive, ..Default::default() }),
                ages: ages.map(|not_written_for| PageAgeSignals { interval_ms: 1000, samples, not_written_for }),
                host: HostSideSignals { resident_mib: resident, plugged_mib: plugged, charged_mib: resident },
                ..Default::default()
            }
        }
    }

    proptest! {
        #[test]
        fn classes_always_partition_the_vm(s in any_signals(), cold_after in 0u32..10) {
            let c = UsageClasses::estimate(&s, cold_after);
            prop_assert_eq!(c.sum_pages(), c.total_pages);
            let region = s.hotplug.as_ref().map_or(0, |h| h.region_mib);
            prop_assert_eq!(c.total_pages, (s.boot_mib + region) * 256);
        }
    }
}
