//! The guest console's output path: forwards bytes to the user's writer and watches the stream
//! for the boot milestone, keeping the last lines for error reports.
//!
//! A vCPU writes the console while it holds the UART, so the user's writer (stdout: a pipe
//! nobody reads, a stopped terminal) must never block it. The tap writes into a
//! [`BufferedOutput`]: a bounded buffer ([`CONSOLE_BUFFER_BYTES`]) that a `console-out`
//! thread drains into the user's writer. What does not fit is dropped and counted
//! ([`ConsoleState::dropped_bytes`], the `memvisor_console_dropped_bytes_total` metric); the
//! milestone and the tail still see every byte. Written by hand: it is a `VecDeque` and a
//! condition variable, and the crates that offer a bounded byte pipe block the writer when full.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const TAIL_LINES: usize = 50;
const MAX_LINE: usize = 4096;

/// What the console has seen, shared with the VM's owner.
#[derive(Debug, Default)]
pub struct ConsoleState {
    milestone_at: OnceLock<Duration>,
    tail: Mutex<VecDeque<String>>,
    output: OnceLock<Arc<ConsoleOutput>>,
}

impl ConsoleState {
    /// Makes `output` the buffer whose drops and draining this state reports.
    pub fn attach_output(&self, output: Arc<ConsoleOutput>) {
        let _ = self.output.set(output);
    }

    /// Console bytes dropped because the user's writer did not keep up.
    pub fn dropped_bytes(&self) -> u64 {
        self.output.get().map_or(0, |o| o.dropped_bytes())
    }

    /// Waits up to `timeout` for buffered output to reach the user's writer (at VM stop).
    pub fn drain(&self, timeout: Duration) -> bool {
        self.output.get().is_none_or(|o| o.drain(timeout))
    }

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

/// Bytes of console output held for a slow writer; beyond that, output is dropped.
pub const CONSOLE_BUFFER_BYTES: usize = 256 * 1024;

/// Bytes the `console-out` thread takes out of the buffer per write.
const DRAIN_CHUNK: usize = 16 * 1024;

#[derive(Debug, Default)]
struct Pending {
    bytes: VecDeque<u8>,
    /// Bytes taken out and being written by the `console-out` thread.
    in_flight: usize,
    /// The writing side is gone: drain what is left, then end.
    closed: bool,
}

/// The buffer between a [`BufferedOutput`] and its `console-out` thread, with its counters.
#[derive(Debug)]
pub struct ConsoleOutput {
    pending: Mutex<Pending>,
    /// Signalled when bytes arrive, when the writer closes, and when the buffer empties.
    changed: Condvar,
    capacity_bytes: usize,
    dropped_bytes: AtomicU64,
    written_bytes: AtomicU64,
    /// A drain timed out once: the writer is stuck, later drains do not wait again.
    stuck: AtomicBool,
}

impl ConsoleOutput {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes dropped because the buffer was full.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes.load(Ordering::Relaxed)
    }

    /// Bytes handed to the user's writer.
    pub fn written_bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` until everything buffered was handed to the user's writer;
    /// returns whether it was. Once a drain has timed out, later ones return at once.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut p = self.lock();
        while !p.bytes.is_empty() || p.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stuck.load(Ordering::Relaxed) {
                self.stuck.store(true, Ordering::Relaxed);
                return false;
            }
            p = self
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Takes what fits into the buffer; returns the bytes dropped.
    fn push(&self, buf: &[u8]) -> usize {
        let mut p = self.lock();
        let room = self
            .capacity_bytes
            .saturating_sub(p.bytes.len() + p.in_flight);
        let taken = room.min(buf.len());
        p.bytes.extend(&buf[..taken]);
        drop(p);
        if taken > 0 {
            self.changed.notify_all();
        }
        let dropped = buf.len() - taken;
        if dropped > 0 {
            self.dropped_bytes
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        dropped
    }

    /// The `console-out` thread: writes what arrives until the writing side closes.
    fn run(&self, mut inner: Box<dyn Write + Send>) {
        let mut chunk = Vec::with_capacity(DRAIN_CHUNK);
        loop {
            {
                let mut p = self.lock();
                p.in_flight = 0;
                self.changed.notify_all();
                while p.bytes.is_empty() && !p.closed {
                    p = self
                        .changed
                        .wait(p)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if p.bytes.is_empty() {
                    return;
                }
                let n = p.bytes.len().min(DRAIN_CHUNK);
                chunk.clear();
                chunk.extend(p.bytes.drain(..n));
                p.in_flight = n;
            }
            // Output errors (a closed stdout) drop the bytes: the guest must not notice.
            match inner.write_all(&chunk).and_then(|()| inner.flush()) {
                Ok(()) => self
                    .written_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed),
                Err(_) => self
                    .dropped_bytes
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed),
            };
        }
    }
}

/// A writer that never blocks: see the module documentation.
#[derive(Debug)]
pub struct BufferedOutput {
    output: Arc<ConsoleOutput>,
}

impl BufferedOutput {
    /// Starts a `console-out` thread writing to `inner` through a buffer of `capacity_bytes`.
    /// The thread ends once this writer is dropped and the buffer is drained; a writer that
    /// blocks forever keeps it (and only it) blocked.
    pub fn spawn(
        inner: Box<dyn Write + Send>,
        capacity_bytes: usize,
    ) -> io::Result<(Self, Arc<ConsoleOutput>)> {
        let output = Arc::new(ConsoleOutput {
            pending: Mutex::new(Pending::default()),
            changed: Condvar::new(),
            capacity_bytes,
            dropped_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            stuck: AtomicBool::new(false),
        });
        let thread_output = output.clone();
        std::thread::Builder::new()
            .name("console-out".into())
            .spawn(move || thread_output.run(inner))?;
        Ok((
            BufferedOutput {
                output: output.clone(),
            },
            output,
        ))
    }
}

impl Write for BufferedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.push(buf);
        Ok(buf.len())
    }

    /// Does not wait (the `console-out` thread flushes after every write it makes); see
    /// [`ConsoleOutput::drain`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BufferedOutput {
    fn drop(&mut self) {
        self.output.lock().closed = true;
        self.output.changed.notify_all();
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

    /// A writer that blocks forever on its first write (a pipe nobody reads).
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Stuck {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            let (m, c) = &*self.0;
            let mut entered = m.lock().expect("lock");
            *entered = true;
            c.notify_all();
            loop {
                entered = c.wait(entered).expect("wait");
            }
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_console_writer_never_blocks_the_guest_and_drops_are_counted() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (out, output) =
            BufferedOutput::spawn(Box::new(Stuck(gate.clone())), 4096).expect("spawn");
        let (mut tap, state) = ConsoleTap::new(Box::new(out), "READY", Instant::now());
        state.attach_output(output.clone());
        let started = Instant::now();
        tap.write_all(b"first line\n").expect("write");
        // Wait until the writer thread is stuck inside the user's writer.
        let (m, c) = &*gate;
        let mut entered = m.lock().expect("lock");
        while !*entered {
            entered = c.wait(entered).expect("wait");
        }
        drop(entered);
        for _ in 0..1000 {
            tap.write_all(&[b'x'; 1023]).expect("write");
            tap.write_all(b"\n").expect("write");
        }
        tap.write_all(b"READY\n").expect("write");

        assert!(
            started.elapsed() < Duration::from_secs(2),
            "writes never wait"
        );
        assert!(
            state.milestone_reached().is_some(),
            "the tap saw every byte"
        );
        let dropped = state.dropped_bytes();
        assert!(
            (1_024_000 - 4096..=1_024_006).contains(&dropped),
            "{dropped} bytes dropped"
        );
        let t = Instant::now();
        assert!(!state.drain(Duration::from_millis(100)), "stuck");
        assert!(!state.drain(Duration::from_secs(10)), "stuck, known");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a known stuck writer is not waited for"
        );
        drop(tap);
    }

    #[test]
    fn buffered_output_reaches_the_writer_in_order() {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let (mut out, output) =
            BufferedOutput::spawn(Box::new(sink.clone()), 1 << 20).expect("spawn");
        let mut expected = Vec::new();
        for i in 0..5000u32 {
            let line = format!("line {i}\n");
            out.write_all(line.as_bytes()).expect("write");
            expected.extend_from_slice(line.as_bytes());
        }
        assert!(output.drain(Duration::from_secs(10)));
        assert_eq!(*sink.0.lock().expect("lock"), expected);
        assert_eq!(output.dropped_bytes(), 0);
        assert_eq!(output.written_bytes(), expected.len() as u64);
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
