//! The swapper's explicit state machine.
//!
//! ```text
//!            swap_out(t > swapped)              done
//!   Idle ─────────────────────────▶ SwappingOut ─────▶ Active
//!    ▲                                  ▲                │ │
//!    │            swap_out(t > swapped) └────────────────┘ │ swap_out(t < swapped)
//!    │ nothing left in swap                                ▼
//!    └──────────────────────────────────────────────── SwappingIn ──▶ Active (pages left)
//!
//!   any state ──(fault thread died, fatal I/O error)──▶ Failed   (terminal)
//! ```
//!
//! Every transition is recorded with its wall-clock time, how long the state it leaves lasted,
//! the pages moved in that state and the pages in swap afterwards.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// The swapper's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SwapState {
    /// Nothing is in swap.
    Idle,
    /// Pages are being written out.
    SwappingOut,
    /// Some pages are in swap; guest accesses bring them back one by one.
    Active,
    /// Pages are being brought back proactively.
    SwappingIn,
    /// The fault-handling thread is gone or swapped data cannot be read: the VM must stop.
    Failed,
}

impl SwapState {
    /// A stable number for metrics: Idle 0, SwappingOut 1, Active 2, SwappingIn 3, Failed 4.
    pub fn code(self) -> u64 {
        match self {
            SwapState::Idle => 0,
            SwapState::SwappingOut => 1,
            SwapState::Active => 2,
            SwapState::SwappingIn => 3,
            SwapState::Failed => 4,
        }
    }

    /// Whether `self -> to` is a transition of the machine.
    pub fn can_go_to(self, to: SwapState) -> bool {
        use SwapState::*;
        matches!(
            (self, to),
            (Idle, SwappingOut)
                | (Active, SwappingOut)
                | (Active, SwappingIn)
                | (SwappingOut, Active)
                | (SwappingOut, Idle)
                | (SwappingIn, Active)
                | (SwappingIn, Idle)
                | (Idle | SwappingOut | Active | SwappingIn, Failed)
        )
    }
}

impl fmt::Display for SwapState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            SwapState::Idle => "idle",
            SwapState::SwappingOut => "swapping_out",
            SwapState::Active => "active",
            SwapState::SwappingIn => "swapping_in",
            SwapState::Failed => "failed",
        };
        f.write_str(s)
    }
}

/// One recorded transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Transition {
    /// State left.
    pub from: SwapState,
    /// State entered.
    pub to: SwapState,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// How long `from` lasted, in microseconds.
    pub duration_us: u64,
    /// Pages moved (written out or brought back) while in `from`.
    pub pages_moved: u64,
    /// Pages in swap after the transition.
    pub swapped_pages: u64,
}

/// The current state plus a bounded history of transitions.
#[derive(Debug)]
pub struct StateMachine {
    state: SwapState,
    since: Instant,
    history: VecDeque<Transition>,
    failure: Option<String>,
}

/// Transitions kept in the history.
pub const HISTORY_LEN: usize = 64;

impl Default for StateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl StateMachine {
    /// Starts in `Idle`.
    pub fn new() -> Self {
        StateMachine {
            state: SwapState::Idle,
            since: Instant::now(),
            history: VecDeque::new(),
            failure: None,
        }
    }

    /// The current state.
    pub fn state(&self) -> SwapState {
        self.state
    }

    /// Why the machine failed, once it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// The recorded transitions, oldest first (at most [`HISTORY_LEN`]).
    pub fn history(&self) -> impl Iterator<Item = &Transition> {
        self.history.iter()
    }

    /// Moves to `to`, recording the transition. Returns false (and changes nothing) when the
    /// machine has no such transition, e.g. out of `Failed`.
    pub fn go(&mut self, to: SwapState, pages_moved: u64, swapped_pages: u64) -> bool {
        if !self.state.can_go_to(to) {
            return false;
        }
        let now = Instant::now();
        let t = Transition {
            from: self.state,
            to,
            at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            duration_us: now.duration_since(self.since).as_micros() as u64,
            pages_moved,
            swapped_pages,
        };
        tracing::info!(
            "swap: {} -> {} after {} us, {} pages moved, {} in swap",
            t.from,
            t.to,
            t.duration_us,
            t.pages_moved,
            t.swapped_pages
        );
        if self.history.len() == HISTORY_LEN {
            self.history.pop_front();
        }
        self.history.push_back(t);
        self.state = to;
        self.since = now;
        true
    }

    /// Enters `Failed` with `reason`; returns false if it had already failed.
    pub fn fail(&mut self, reason: String, swapped_pages: u64) -> bool {
        if self.go(SwapState::Failed, 0, swapped_pages) {
            self.failure = Some(reason);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SwapState::*;

    #[test]
    fn a_full_cycle_is_recorded_with_pages() {
        let mut m = StateMachine::new();
        assert!(m.go(SwappingOut, 0, 0));
        assert!(m.go(Active, 100, 100));
        assert!(m.go(SwappingIn, 0, 100));
        assert!(m.go(Idle, 100, 0));
        let h: Vec<_> = m.history().map(|t| (t.from, t.to, t.pages_moved)).collect();
        assert_eq!(
            h,
            vec![
                (Idle, SwappingOut, 0),
                (SwappingOut, Active, 100),
                (Active, SwappingIn, 0),
                (SwappingIn, Idle, 100)
            ]
        );
        assert!(m.history().all(|t| t.at_unix_ms > 0));
    }

    #[test]
    fn failed_is_terminal_and_keeps_the_first_reason() {
        let mut m = StateMachine::new();
        assert!(m.fail("thread died".into(), 3));
        assert!(!m.fail("again".into(), 3));
        assert!(!m.go(Idle, 0, 0));
        assert!(!m.go(SwappingOut, 0, 0));
        assert_eq!(m.state(), Failed);
        assert_eq!(m.failure(), Some("thread died"));
    }

    #[test]
    fn impossible_transitions_are_refused() {
        let mut m = StateMachine::new();
        assert!(!m.go(SwappingIn, 0, 0), "nothing to swap in from idle");
        assert!(!m.go(Active, 0, 0));
        assert_eq!(m.state(), Idle);
        assert_eq!(m.history().count(), 0);
    }

    #[test]
    fn history_is_bounded() {
        let mut m = StateMachine::new();
        for _ in 0..HISTORY_LEN {
            m.go(SwappingOut, 0, 0);
            m.go(Active, 0, 0);
            m.go(SwappingIn, 0, 0);
            m.go(Idle, 0, 0);
        }
        assert_eq!(m.history().count(), HISTORY_LEN);
    }
}
