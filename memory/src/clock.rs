//! Time as a dependency: code that reads the clock or waits takes a [`Clock`], so that tests can
//! move time forward instead of sleeping and assert exact durations instead of wall-clock
//! ranges. [`MonotonicClock`] is the real one; `test_utils::FakeClock` (feature `test-utils`)
//! moves only when told.

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// A monotonic clock that can also wait.
pub trait Clock: Send + Sync + Debug {
    /// The current instant.
    fn now(&self) -> Instant;
    /// Waits for `duration` (a fake clock moves forward by it instead).
    fn sleep(&self, duration: Duration);
}

/// The host's monotonic clock ([`Instant::now`], [`std::thread::sleep`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}
