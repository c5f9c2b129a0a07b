//! Targets: how much memory each VM should have when the VMs together want more than the host
//! can give.
//!
//! Each VM starts from its *natural size* (what it would have on an uncontended host: its boot
//! size, or more if its working set needs it) and memory is taken back, a chunk at a time, from
//! the VM that pays least for its memory. "Pays" is Waldspurger's shares-per-page ratio with the
//! idle-memory tax ("Memory Resource Management in VMware ESX Server", OSDI 2002, §5.2):
//!
//! ```text
//! rho = shares / (active + k * idle),   k = 1 / (1 - tax)
//! ```
//!
//! where `active` is the part of the VM's allocation inside its working-set estimate and `idle`
//! the rest. With the default tax of 0.75 an idle MiB costs four active ones, so idle memory is
//! taken first, from the VMs with the fewest shares per MiB. The ratio is multiplied by the
//! VM's mean page-map count: a VM whose pages are mostly shared frees little host memory per
//! MiB taken (VMware's sharing-count patent), so it is asked last; and by the VM's reclaim
//! cost: a VM that only hypervisor swap can shrink (no balloon, no plugged virtio-mem) pays in
//! swap faults for every MiB taken, so it is asked after the VMs whose guests can give memory
//! themselves (cheapest tool first, host-wide).
//!
//! Two passes: first only idle memory of VMs that are not under pressure (pressed VMs "get
//! memory first", and nobody's working set is touched while someone else still holds idle
//! memory), then everything down to each VM's floor (`max(min, reservation)`, or a floor
//! remembered after a guest paged out). A target never leaves `[floor, max]`: the floor wins
//! when even the floors do not fit (the host is then in its hard or low state, and admission
//! control should not have let that happen).

/// One VM's claim on memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Claim {
    /// Where reclaim starts: the natural size, within `[floor, max]`.
    pub natural_mib: u64,
    /// Never below this.
    pub floor_mib: u64,
    /// The working-set estimate.
    pub working_set_mib: u64,
    /// Shares.
    pub shares: u32,
    /// Under pressure now.
    pub pressed: bool,
    /// Mean page-map count (1 when nothing is shared or nothing is known).
    pub mean_count: f64,
    /// How much dearer taking a MiB from this VM is than ballooning (1: balloon or
    /// virtio-mem; `swap_only_cost` when only hypervisor swap can take memory from it).
    pub reclaim_cost: f64,
}

/// The targets for `claims` when the VMs together may have `pool_mib` (may be negative when
/// the host is far over budget).
pub(crate) fn allocate(claims: &[Claim], pool_mib: i64, idle_cost: f64) -> Vec<u64> {
    let mut t: Vec<u64> = claims
        .iter()
        .map(|c| c.natural_mib.max(c.floor_mib))
        .collect();
    let total: u64 = t.iter().sum();
    let mut excess = i64::try_from(total)
        .unwrap_or(i64::MAX)
        .saturating_sub(pool_mib);
    if excess <= 0 || claims.is_empty() {
        return t;
    }
    let n = claims.len() as i64;
    for pass in [Pass::IdleOfUnpressed, Pass::DownToFloor] {
        while excess > 0 {
            let stop = |i: usize| match pass {
                Pass::IdleOfUnpressed if claims[i].pressed => t[i],
                Pass::IdleOfUnpressed => claims[i].floor_mib.max(claims[i].working_set_mib),
                Pass::DownToFloor => claims[i].floor_mib,
            };
            let victim = (0..claims.len())
                .filter(|&i| t[i] > stop(i))
                .min_by(|&a, &b| {
                    rho(&claims[a], t[a], idle_cost)
                        .total_cmp(&rho(&claims[b], t[b], idle_cost))
                        .then(a.cmp(&b))
                });
            let Some(i) = victim else { break };
            let chunk = (excess / (4 * n)).clamp(1, 256) as u64;
            let got = chunk.min(t[i] - stop(i)).min(excess as u64);
            t[i] -= got;
            excess -= got as i64;
        }
    }
    t
}

#[derive(Clone, Copy)]
enum Pass {
    IdleOfUnpressed,
    DownToFloor,
}

/// Shares per MiB with the idle-memory tax, weighted by sharing.
fn rho(c: &Claim, size_mib: u64, idle_cost: f64) -> f64 {
    let active = size_mib.min(c.working_set_mib) as f64;
    let idle = size_mib.saturating_sub(c.working_set_mib) as f64;
    let cost = (active + idle_cost * idle).max(1.0);
    f64::from(c.shares) * c.mean_count.max(1.0) * c.reclaim_cost.max(1.0) / cost
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn claim(natural: u64, floor: u64, ws: u64) -> Claim {
        Claim {
            natural_mib: natural,
            floor_mib: floor,
            working_set_mib: ws,
            shares: 1000,
            pressed: false,
            mean_count: 1.0,
            reclaim_cost: 1.0,
        }
    }

    #[test]
    fn enough_memory_gives_everyone_its_natural_size() {
        let c = [claim(1024, 0, 100), claim(512, 0, 500)];
        assert_eq!(allocate(&c, 2000, 4.0), vec![1024, 512]);
    }

    #[test]
    fn idle_memory_goes_first() {
        // Both 1024, one idle (ws 100), one busy (ws 900); 400 MiB to take back.
        let c = [claim(1024, 0, 100), claim(1024, 0, 900)];
        let t = allocate(&c, 1648, 4.0);
        assert_eq!(t.iter().sum::<u64>(), 1648);
        assert_eq!(t[1], 1024, "the busy VM keeps everything: {t:?}");
        assert_eq!(t[0], 624);
    }

    #[test]
    fn working_sets_are_cut_by_shares_once_idle_memory_is_gone() {
        let mut a = claim(1000, 0, 1000);
        a.shares = 3000;
        let b = claim(1000, 0, 1000);
        let t = allocate(&[a, b], 1200, 4.0);
        assert_eq!(t.iter().sum::<u64>(), 1200);
        // Three times the shares: about three times the memory.
        assert!((880..=920).contains(&t[0]), "{t:?}");
    }

    #[test]
    fn a_pressed_vm_keeps_its_idle_memory_while_others_have_some() {
        let mut pressed = claim(1024, 0, 200);
        pressed.pressed = true;
        let t = allocate(&[pressed, claim(1024, 0, 500)], 1648, 4.0);
        assert_eq!(t[0], 1024, "{t:?}");
    }

    #[test]
    fn a_mostly_shared_vm_is_asked_last() {
        let mut shared = claim(1024, 0, 100);
        shared.mean_count = 8.0;
        let t = allocate(&[shared, claim(1024, 0, 100)], 1848, 4.0);
        assert_eq!(t, vec![1024, 824]);
    }

    #[test]
    fn a_vm_only_swap_can_shrink_is_asked_after_the_others() {
        let mut bare = claim(1024, 0, 100);
        bare.reclaim_cost = 4.0;
        let t = allocate(&[bare, claim(1024, 0, 300)], 1648, 4.0);
        assert_eq!(t, vec![1024, 624]);
    }

    #[test]
    fn floors_win_when_nothing_fits() {
        let t = allocate(&[claim(1024, 512, 900), claim(1024, 256, 900)], -100, 4.0);
        assert_eq!(t, vec![512, 256]);
    }

    proptest! {
        #[test]
        fn targets_stay_within_floor_and_natural_and_meet_the_pool(
            vms in proptest::collection::vec(
                (0u64..4096, 0u64..4096, 0u64..4096, 1u32..5000, any::<bool>(), 1.0f64..10.0), 1..8),
            pool in -1000i64..20_000,
        ) {
            let claims: Vec<Claim> = vms.iter().map(|&(natural, floor, ws, shares, pressed, mean)| Claim {
                natural_mib: natural.max(floor), floor_mib: floor.min(natural.max(floor)),
                working_set_mib: ws, shares, pressed, mean_count: mean, reclaim_cost: 1.0,
            }).collect();
            let t = allocate(&claims, pool, 4.0);
            for (c, &t) in claims.iter().zip(&t) {
                prop_assert!(t >= c.floor_mib && t <= c.natural_mib);
            }
            let floors: u64 = claims.iter().map(|c| c.floor_mib).sum();
            let sum: u64 = t.iter().sum();
            if (floors as i64) <= pool {
                prop_assert!(sum as i64 <= pool, "{} > {}", sum, pool);
            } else {
                prop_assert_eq!(sum, floors);
            }
        }
    }
}
