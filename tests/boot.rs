//! Boots the default guest through KVM and checks the boot milestone.

mod common;

use std::time::Duration;

use common::{boot, default_guest};
use vmm::VmExit;

/// Generous: the milestone comes in under a minute on hosts that emulate guest kernel code, but
/// tests run in parallel on two cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

#[test]
fn default_guest_reaches_its_boot_milestone() {
    memory::require!(Kvm, Guest);
    let config = default_guest();
    let outcome = boot(&config, BOOT_TIMEOUT);
    assert!(
        outcome.milestone.is_some(),
        "no boot milestone within {BOOT_TIMEOUT:?}; exit {:?}; last console lines:\n{}",
        outcome.exit,
        outcome.tail_text()
    );
    assert!(
        !matches!(outcome.exit, Some(VmExit::Error(_))),
        "VM failed: {:?}; last console lines:\n{}",
        outcome.exit,
        outcome.tail_text()
    );
    eprintln!("milestone after {:?}", outcome.milestone);
}
