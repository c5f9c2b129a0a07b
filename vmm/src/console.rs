//! The guest console's output path: forwards bytes to the user's writer and watches the stream
//! for the boot milestone, keeping the last lines for error reports.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const TAIL_LINES: usize = 50;
const MAX_LINE: usize = 4096;

/// What the console has seen, shared with the VM's owner.
#[derive(Debug, Default)]
pub struct ConsoleState {
    milestone_at: OnceLock<Duration>,
    tail: Mutex<VecDeque<String>>,
}

impl ConsoleState {
    /// Time from VM start to the milestone line, once seen.
    pub fn milestone_reached(&self) -> Option<Duration> {
        self.milestone_at.get().copied()
    }

    /// The last complete lines of console output.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// A writer that forwards to `inner` and records milestone and tail.
pub struct ConsoleTap {
    inner: Box<dyn Write + Send>,
    milestone: String,
    start: Instant,
    line: Vec<u8>,
    state: Arc<ConsoleState>,
}

impl std::fmt::Debug for ConsoleTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleTap")
            .field("milestone", &self.milestone)
            .finish_non_exhaustive()
    }
}

impl ConsoleTap {
    /// A tap looking for `milestone`, timing from `start`.
    pub fn new(
        inner: Box<dyn Write + Send>,
        milestone: &str,
        start: Instant,
    ) -> (Self, Arc<ConsoleState>) {
        let state = Arc::new(ConsoleState::default());
        let tap = ConsoleTap {
            inner,
            milestone: milestone.to_string(),
            start,
            line: Vec::with_capacity(256),
            state: state.clone(),
        };
        (tap, state)
    }

    fn end_line(&mut self) {
        let text = String::from_utf8_lossy(&self.line)
            .trim_end_matches('\r')
            .to_string();
        self.line.clear();
        if self.state.milestone_at.get().is_none() && text.contains(&self.milestone) {
            let elapsed = self.start.elapsed();
            if self.state.milestone_at.set(elapsed).is_ok() {
                tracing::info!(
                    "boot milestone '{}' reached after {} ms",
                    self.milestone,
                    elapsed.as_millis()
                );
            }
        }
        if let Ok(mut tail) = self.state.tail.lock() {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text);
        }
    }
}

impl Write for ConsoleTap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        // The console must never stall the guest: output errors (a closed stdout) are dropped.
        if self.inner.write_all(buf).is_ok() {
            let _ = self.inner.flush();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.inner.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestone_is_found_across_writes_and_tail_is_kept() {
        let (mut tap, state) = ConsoleTap::new(Box::new(io::sink()), "Run /init", Instant::now());
        tap.write_all(b"hello\r\n[ 1.0] Ru").expect("write");
        assert!(state.milestone_reached().is_none());
        tap.write_all(b"n /init as init process\nnext")
            .expect("write");
        assert!(state.milestone_reached().is_some());
        assert_eq!(
            state.tail(),
            vec![
                "hello".to_string(),
                "[ 1.0] Run /init as init process".to_string()
            ]
        );
    }

    #[test]
    fn tail_is_bounded() {
        let (mut tap, state) = ConsoleTap::new(Box::new(io::sink()), "x-never", Instant::now());
        for i in 0..200 {
            writeln!(tap, "line {i}").expect("write");
        }
        let tail = state.tail();
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.last().map(String::as_str), Some("line 199"));
    }
}
