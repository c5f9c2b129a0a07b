//! What the host knows about each VM's memory, and what each VM is promised.
//!
//! These types are the contract between the places where memory data is made (the balloon's
//! statistics queue, the virtio-mem device, the swapper, the sharing sampler, KVM's dirty log),
//! the host that gathers them every tick, and the scheduler that decides from them. They are
//! plain values: no handles, no clocks, no `serde_json::Value`. They serialise as the API shows
//! them (`GET /api/v1/vms/{id}/signals`), and deserialise so that recorded samples can be
//! replayed.
//!
//! Sizes of memory levels are in MiB (`*_mib`, as the API's requests are); page counts are in
//! 4 KiB pages (`*_pages`); guest statistics keep the units the guest reported them in.

use serde::{Deserialize, Serialize};

/// A VM's memory policy: the bounds the host and its scheduler keep, in MiB.
///
/// `min <= reservation`-style relations are not implied: each bound is checked on its own
/// ([`VmPolicy::validate`]). The scheduler never takes a VM below `max(min, reservation)` and
/// never grows it above `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPolicy {
    /// Never reclaim below this much guest memory.
    pub min_mib: u64,
    /// Never grow above this (boot RAM plus the hotplug region at most).
    pub max_mib: u64,
    /// Host memory guaranteed to the VM; admission control keeps the sum of reservations
    /// within the host's budget.
    pub reservation_mib: u64,
    /// Relative weight for memory above the reservations.
    pub shares: u32,
}

/// Why a [`VmPolicy`] is not acceptable for a VM.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `min` above `max`.
    #[error("min {min_mib} MiB is above max {max_mib} MiB")]
    MinAboveMax {
        /// The minimum asked for.
        min_mib: u64,
        /// The maximum asked for.
        max_mib: u64,
    },
    /// `reservation` above `max`.
    #[error("reservation {reservation_mib} MiB is above max {max_mib} MiB")]
    ReservationAboveMax {
        /// The reservation asked for.
        reservation_mib: u64,
        /// The maximum asked for.
        max_mib: u64,
    },
    /// `max` above what the VM can ever have.
    #[error("max {max_mib} MiB is above the VM's largest size, {limit_mib} MiB")]
    MaxAboveSize {
        /// The maximum asked for.
        max_mib: u64,
        /// Boot RAM plus the hotplug region.
        limit_mib: u64,
    },
    /// Zero shares.
    #[error("shares must be at least 1")]
    ZeroShares,
}

impl VmPolicy {
    /// Default shares, as a VM gets when its policy does not name any.
    pub const DEFAULT_SHARES: u32 = 1000;

    /// The policy of a VM that is promised nothing: no reservation, no floor, may grow to
    /// `limit_mib`.
    pub fn unreserved(limit_mib: u64) -> Self {
        VmPolicy {
            min_mib: 0,
            max_mib: limit_mib,
            reservation_mib: 0,
            shares: Self::DEFAULT_SHARES,
        }
    }

    /// Checks the policy for a VM whose largest possible size is `limit_mib`.
    pub fn validate(&self, limit_mib: u64) -> Result<(), PolicyError> {
        if self.max_mib > limit_mib {
            return Err(PolicyError::MaxAboveSize {
                max_mib: self.max_mib,
                limit_mib,
            });
        }
        if self.min_mib > self.max_mib {
            return Err(PolicyError::MinAboveMax {
                min_mib: self.min_mib,
                max_mib: self.max_mib,
            });
        }
        if self.reservation_mib > self.max_mib {
            return Err(PolicyError::ReservationAboveMax {
                reservation_mib: self.reservation_mib,
                max_mib: self.max_mib,
            });
        }
        if self.shares == 0 {
            return Err(PolicyError::ZeroShares);
        }
        Ok(())
    }

    /// The size the scheduler never goes below: `max(min, reservation)`.
    pub fn floor_mib(&self) -> u64 {
        self.min_mib.max(self.reservation_mib)
    }
}

/// One VM's memory signals, sampled at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmMemorySignals {
    /// When the sample was taken, in ms since the host started (the host's clock; the
    /// scheduler derives rates from two samples).
    pub sampled_at_ms: u64,
    /// Boot RAM, MiB.
    pub boot_mib: u64,
    /// The balloon, if the VM has one.
    pub balloon: Option<BalloonSignals>,
    /// The virtio-mem device, if the VM has one.
    pub hotplug: Option<HotplugSignals>,
    /// The swapper, once swap is armed for the VM.
    pub swap: Option<SwapSignals>,
    /// The latest page-sharing sample, if one was taken.
    pub sharing: Option<SharingSignals>,
    /// Page ages from KVM's dirty log, when age tracking is on.
    pub ages: Option<PageAgeSignals>,
    /// What the host sees of the VM's memory.
    pub host: HostSideSignals,
}

impl VmMemorySignals {
    /// Guest-visible memory: boot RAM minus the balloon plus plugged virtio-mem memory, MiB.
    pub fn guest_visible_mib(&self) -> u64 {
        let ballooned = self.balloon.as_ref().map_or(0, |b| b.actual_mib);
        let plugged = self.hotplug.as_ref().map_or(0, |h| h.plugged_mib);
        self.boot_mib.saturating_sub(ballooned) + plugged
    }
}

/// The balloon's levels and the guest's latest statistics.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BalloonSignals {
    /// What the host asked the guest to give, MiB.
    pub target_mib: u64,
    /// What the guest has given, MiB.
    pub actual_mib: u64,
    /// Whether the guest may take pages back from the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// The guest's latest statistics, if it has sent any.
    pub stats: Option<GuestMemStats>,
    /// How old those statistics are, ms.
    pub stats_age_ms: Option<u64>,
}

/// The guest's own view of its memory, as the virtio-balloon statistics carry it. A guest
/// reports what its driver knows; any field may be missing. Counters are cumulative since the
/// guest booted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMemStats {
    /// Total memory the guest kernel manages, bytes.
    pub total_bytes: Option<u64>,
    /// Free memory, bytes.
    pub free_bytes: Option<u64>,
    /// Memory available to new work without swapping (free + reclaimable), bytes.
    pub available_bytes: Option<u64>,
    /// Page cache the guest can drop, bytes.
    pub caches_bytes: Option<u64>,
    /// Bytes the guest swapped in (cumulative).
    pub swap_in_bytes: Option<u64>,
    /// Bytes the guest swapped out (cumulative).
    pub swap_out_bytes: Option<u64>,
    /// Major page faults (cumulative).
    pub major_faults: Option<u64>,
    /// Minor page faults (cumulative).
    pub minor_faults: Option<u64>,
    /// Processes the guest's OOM killer killed (cumulative).
    pub oom_kills: Option<u64>,
    /// Allocation stalls (cumulative).
    pub alloc_stalls: Option<u64>,
    /// Bytes the guest reclaimed in direct reclaim (cumulative).
    pub direct_reclaim_bytes: Option<u64>,
}

/// The virtio-mem device's levels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HotplugSignals {
    /// The hotplug region's size, MiB.
    pub region_mib: u64,
    /// Block size, bytes.
    pub block_size_bytes: u64,
    /// Memory the guest has plugged, MiB.
    pub plugged_mib: u64,
    /// Memory the host asks the guest to have plugged, MiB.
    pub requested_mib: u64,
    /// Whether a driver has activated the device.
    pub driver_active: bool,
}

/// The swapper's state, once swap is armed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SwapSignals {
    /// The swap state machine's state (`idle`, `swapping_out`, `active`, `swapping_in`,
    /// `failed`).
    pub state: String,
    /// Whether a swap-out or swap-in is running.
    pub busy: bool,
    /// The last target asked for, MiB.
    pub target_mib: u64,
    /// Guest pages not in RAM because of swap.
    pub swapped_pages: u64,
    /// Faults served from the swap file or with the zero page (cumulative).
    pub faults: u64,
    /// Median fault latency, µs.
    pub fault_latency_p50_us: u64,
    /// Errors (cumulative).
    pub errors: u64,
}

/// The latest page-sharing sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SharingSignals {
    /// Pages sampled.
    pub pages_sampled: u64,
    /// Resident sampled pages whose host frame is mapped twice or more.
    pub pages_shared: u64,
    /// Resident sampled pages whose host frame is mapped once.
    pub pages_exclusive: u64,
    /// Arithmetic mean of the map counts of resident pages.
    pub mean_count: Option<f64>,
    /// Median of the same.
    pub median_count: Option<f64>,
    /// Harmonic mean of the same.
    pub harmonic_mean_count: Option<f64>,
    /// Host memory that reclaiming the VM's pages would free, MiB.
    pub reclaimable_mib: u64,
    /// How old the sample is, ms.
    pub age_ms: u64,
}

/// Guest RAM pages by how long ago they were last written, from KVM's dirty log.
///
/// `not_written_for[i]` counts pages not written for exactly `i` samples; the last bucket
/// counts pages not written for that many samples or more. Dirty logging sees writes only: a
/// page read every tick but never written ages all the same ("cold" means "not written").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageAgeSignals {
    /// Milliseconds between two dirty-log samples.
    pub interval_ms: u64,
    /// Samples taken since age tracking started.
    pub samples: u64,
    /// Pages per age bucket.
    pub not_written_for: Vec<u64>,
}

impl PageAgeSignals {
    /// Pages not written for at least `samples` samples.
    pub fn pages_colder_than(&self, samples: usize) -> u64 {
        self.not_written_for.iter().skip(samples).sum()
    }
}

/// What the host itself measures of a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSideSignals {
    /// Guest RAM resident in host memory (boot RAM and the hotplug region), MiB.
    pub resident_mib: u64,
    /// Plugged virtio-mem memory, MiB (resident or not).
    pub plugged_mib: u64,
    /// Memory the host's budget counts for the VM, MiB: resident guest RAM, swapped-out
    /// pages not included.
    pub charged_mib: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_checks_each_bound() {
        let ok = VmPolicy {
            min_mib: 64,
            max_mib: 256,
            reservation_mib: 128,
            shares: 1000,
        };
        assert_eq!(ok.validate(256), Ok(()));
        assert_eq!(ok.floor_mib(), 128);
        assert!(matches!(
            ok.validate(128),
            Err(PolicyError::MaxAboveSize { .. })
        ));
        let min_above = VmPolicy { min_mib: 300, ..ok };
        assert!(matches!(
            min_above.validate(512),
            Err(PolicyError::MinAboveMax { .. })
        ));
        let res_above = VmPolicy {
            reservation_mib: 300,
            ..ok
        };
        assert!(matches!(
            res_above.validate(512),
            Err(PolicyError::ReservationAboveMax { .. })
        ));
        assert_eq!(
            VmPolicy { shares: 0, ..ok }.validate(256),
            Err(PolicyError::ZeroShares)
        );
    }

    #[test]
    fn guest_visible_counts_balloon_and_plugged_memory() {
        let s = VmMemorySignals {
            boot_mib: 256,
            balloon: Some(BalloonSignals {
                actual_mib: 64,
                ..Default::default()
            }),
            hotplug: Some(HotplugSignals {
                plugged_mib: 128,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(s.guest_visible_mib(), 320);
    }

    #[test]
    fn colder_than_sums_the_tail() {
        let ages = PageAgeSignals {
            interval_ms: 1000,
            samples: 5,
            not_written_for: vec![10, 20, 30, 40],
        };
        assert_eq!(ages.pages_colder_than(2), 70);
        assert_eq!(ages.pages_colder_than(9), 0);
    }
}
