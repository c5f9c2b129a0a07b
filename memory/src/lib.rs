//! memvisor's memory manager.
//!
//! This crate owns guest RAM ([`ram`]): anonymous private mappings that are handed to KVM as
//! memslots by the `vmm` crate, and that stay usable with KSM (`MADV_MERGEABLE`), userfaultfd
//! and `MADV_DONTNEED`. Page-sharing counts ([`sharing`], [`ksm`]), per-VM swap ([`swap`]),
//! the typed memory signals ([`signals`]), guest memory usage classes ([`classes`]) and the
//! scheduler that moves memory between VMs, with its simulator ([`scheduler`]), live here too.
//! The crate knows nothing about KVM: an action that needs KVM goes through a small trait
//! implemented in `vmm`.
//!
//! With the `test-utils` feature, [`test_utils`] (not in release builds) holds what the whole
//! workspace's tests share: the one rule for a test that needs KVM, root, userfaultfd
//! write-protect or the built guest ([`require!`]), and a recording [`DiscardRam`] fake.

pub mod classes;
pub mod clock;
pub mod discard;
pub mod ksm;
pub mod metrics;
pub mod ram;
pub mod scheduler;
pub mod sharing;
pub mod signals;
pub mod size;
pub mod swap;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use discard::GuestDiscard;
pub use metrics::{Metric, MetricKind, MetricValue};
pub use ram::{DiscardRam, GuestRam, RamError, RamRange, HUGE_PAGE_SIZE, PAGE_SIZE};
pub use signals::{VmMemorySignals, VmPolicy};
pub use size::{parse_size, ByteSize, SizeError};
