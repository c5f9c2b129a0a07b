//! Per-VM hypervisor swap with userfaultfd.
//!
//! A [`Swapper`] owns one swap file for one VM. [`Swapper::swap_out`] writes the least recently
//! written guest pages to the file and frees them on the host (`MADV_DONTNEED`); guest RAM is
//! registered with userfaultfd, so a later access to such a page blocks in the kernel until the
//! swapper's fault-handling thread installs it again from the file (`UFFDIO_COPY`). Pages that
//! are all zero are not written: they come back as the zero page (`UFFDIO_ZEROPAGE`).
//!
//! A write racing a swap-out is never lost: pages are write-protected (userfaultfd
//! write-protect) before they are copied, and a page written to before it is dropped stays in
//! RAM. See `docs/swap.md` for the design, the state machine and failure handling.
//!
//! A swap-out of more than one batch writes the file on a second thread (`swap-out-writer`,
//! alive for the call) while the calling thread write-protects the next batch and commits the
//! previous one; the writer never takes the page table.
//!
//! Lock order: the state machine before the page table; guest memory is never touched by the
//! swapper while it holds the page table (a fault on it would need the table to be served).

pub mod age;
pub mod file;
pub mod metrics;
pub mod state;
pub(crate) mod uffd;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Serialize;
use vm_memory::GuestAddress;

use crate::{DiscardRam, GuestRam, Metric, RamError, PAGE_SIZE};

pub use age::{Ages, DirtyLog};
pub use file::{GuestPieces, SlotAllocator, SwapBacking, SwapFile, WriteMode};
pub use metrics::{LatencyHistogram, SwapMetrics};
pub use state::{StateMachine, SwapState, Transition};

use uffd::{Resolve, Uffd};

/// A VM's swapper once armed (empty before), shared between its owner and whoever routes
/// discards to it ([`crate::discard::GuestDiscard`]).
pub type SwapperCell = Arc<std::sync::RwLock<Option<Arc<Swapper>>>>;

/// Errors of the swap subsystem.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    /// No userfaultfd for this process.
    #[error("userfaultfd is not available")]
    Userfaultfd(#[source] io::Error),
    /// The kernel cannot write-protect anonymous memory through userfaultfd (Linux < 5.7).
    #[error("this kernel has no userfaultfd write-protect for anonymous memory (Linux 5.7+)")]
    NoWriteProtect,
    /// Guest RAM could not be registered with userfaultfd.
    #[error("cannot register guest RAM with userfaultfd")]
    Register(#[source] io::Error),
    /// The swap file could not be created.
    #[error("cannot create a swap file in {dir}")]
    CreateFile {
        /// The swap directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The fault-handling thread could not be started.
    #[error("cannot start the swap fault-handling thread")]
    Thread(#[source] io::Error),
    /// A range given to the swapper is not page aligned or not inside one guest RAM range.
    #[error("guest range {addr:#x}+{len:#x} is not page-aligned guest RAM")]
    BadRange {
        /// Guest physical address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A host call on guest RAM failed (`mincore`, `madvise`, write-protect).
    #[error("{op} failed on guest RAM")]
    Host {
        /// Which call.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The swapper has failed (see [`SwapState::Failed`]); the VM must be stopped.
    #[error("swap failed: {0}")]
    Failed(String),
}

/// Why a swapper failed, as passed to [`SwapOptions::on_failure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapFailure {
    /// A one-line reason.
    pub reason: String,
}

/// Called once, from whichever thread detects it, when the swapper enters
/// [`SwapState::Failed`]. The VMM stops the VM from here (e.g. sends on a channel or signals an
/// eventfd its event loop waits on); it must not call back into the swapper.
pub type FailureCallback = Arc<dyn Fn(&SwapFailure) + Send + Sync>;

/// How a [`Swapper`] works.
#[derive(Clone)]
pub struct SwapOptions {
    /// Pages write-protected, copied and written per step of a swap-out (default 1024 = 4 MiB).
    /// With more than one batch to go, batches are written on a second thread while the next
    /// is prepared and the previous committed, so up to two batches are write-protected at a
    /// time.
    pub batch_pages: usize,
    /// Told when the swapper fails (see [`FailureCallback`]).
    pub on_failure: Option<FailureCallback>,
}

impl Default for SwapOptions {
    fn default() -> Self {
        SwapOptions {
            batch_pages: 1024,
            on_failure: None,
        }
    }
}

impl fmt::Debug for SwapOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwapOptions")
            .field("batch_pages", &self.batch_pages)
            .field("on_failure", &self.on_failure.is_some())
            .finish()
    }
}

/// What one [`Swapper::swap_out`] call did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SwapReport {
    /// Pages in swap after the call.
    pub swapped_pages: u64,
    /// Pages written to the file by this call.
    pub pages_written: u64,
    /// All-zero pages dropped without being written.
    pub zero_pages: u64,
    /// Pages kept in RAM because the guest wrote them during the swap-out.
    pub raced_pages: u64,
    /// Pages brought back by this call.
    pub pages_swapped_in: u64,
    /// Write errors (those pages stayed in RAM).
    pub write_errors: u64,
    /// Wall time of the call in microseconds.
    pub elapsed_us: u64,
}

/// What `GET /api/v1/vms/{id}/swap` reports.
#[derive(Debug, Clone, Serialize)]
pub struct SwapStatus {
    /// Current state.
    pub state: SwapState,
    /// Why the swapper failed, if it did.
    pub failure: Option<String>,
    /// Guest pages not in RAM because of swap (written to the file, or all-zero).
    pub swapped_pages: u64,
    /// Of those, the all-zero pages (no slot in the file).
    pub zero_pages: u64,
    /// The swap file.
    pub file_path: Option<PathBuf>,
    /// The swap file's length in bytes (never more than guest RAM).
    pub file_size_bytes: u64,
    /// Missing faults served from the file.
    pub faults_served: u64,
    /// Missing faults served with the zero page.
    pub zero_faults: u64,
    /// Write-protect faults (writes racing a swap-out).
    pub wp_faults: u64,
    /// Median time from reading a fault to waking the faulting thread, in µs.
    pub fault_latency_p50_us: u64,
    /// 99th percentile of the same, in µs.
    pub fault_latency_p99_us: u64,
    /// Bytes written to the file.
    pub bytes_written: u64,
    /// Bytes read back from the file.
    pub bytes_read: u64,
    /// Pages brought back by swap-in (not by faults).
    pub pages_swapped_in: u64,
    /// Pages kept in RAM because a write raced their swap-out.
    pub raced_pages: u64,
    /// Failed writes (pages stayed in RAM).
    pub write_errors: u64,
    /// Failed reads.
    pub read_errors: u64,
    /// Pages whose bytes read back did not match their checksum (the swapper then fails).
    pub checksum_errors: u64,
    /// All errors.
    pub errors: u64,
    /// Dirty-log intervals sampled into page ages.
    pub age_samples: u64,
    /// Recent state transitions, oldest first.
    pub transitions: Vec<Transition>,
}

// Page table entries: a slot number, or one of these.
const IN_RAM: u32 = u32::MAX;
const ZERO: u32 = u32::MAX - 1;
/// Write-protected and being copied out.
const OUTGOING: u32 = u32::MAX - 2;
/// Was `OUTGOING`, then written to (or discarded): it stays in RAM.
const RACED: u32 = u32::MAX - 3;
const MAX_PAGES: u64 = RACED as u64;

#[derive(Debug)]
struct Table {
    pages: Vec<u32>,
    slots: SlotAllocator,
    /// Per slot: the CRC32C of the page stored in it, checked when the page comes back.
    sums: Vec<u32>,
    /// Per slot: bumped whenever the slot is given up by its page, so that a reader who let go
    /// of the table while reading the slot can tell whether it still holds what it read.
    generations: Vec<u32>,
    /// Pages in a slot or `ZERO`.
    swapped: u64,
    zero: u64,
}

impl Table {
    /// Marks page `g` as back in RAM, giving up whatever it held.
    fn release(&mut self, g: usize) {
        match self.pages[g] {
            IN_RAM | OUTGOING | RACED => {}
            ZERO => {
                self.zero -= 1;
                self.swapped -= 1;
            }
            slot => {
                self.slots.free(slot);
                self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
                self.swapped -= 1;
            }
        }
        self.pages[g] = IN_RAM;
    }
}

/// What page `g` held when a reader took it out of the table to read it without the lock.
#[derive(Debug, Clone, Copy)]
struct SlotRead {
    slot: u32,
    generation: u32,
    sum: u32,
}

#[derive(Debug, Clone, Copy)]
struct RangeInfo {
    guest: u64,
    host: u64,
    len: u64,
    first_page: usize,
}

struct Shared {
    uffd: Uffd,
    /// Keeps the mappings alive for as long as the fd, the handler and the writes use them.
    _ram: GuestRam,
    ranges: Vec<RangeInfo>,
    table: Mutex<Table>,
    backing: Box<dyn SwapBacking>,
    file_len: AtomicU64,
    metrics: SwapMetrics,
    latency: LatencyHistogram,
    machine: Mutex<StateMachine>,
    on_failure: Option<FailureCallback>,
    stopping: AtomicBool,
    /// Guest RAM was unregistered from the userfaultfd after a failure.
    released: AtomicBool,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("ranges", &self.ranges)
            .field("backing", &self.backing)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a swap lock is already reported as a failure (the thread guard);
    // the data stays consistent enough to report status and shut down.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn locate(&self, host_addr: u64) -> Option<(usize, u64)> {
        self.ranges.iter().find_map(|r| {
            (host_addr >= r.host && host_addr < r.host + r.len).then(|| {
                let page = (host_addr - r.host) / PAGE_SIZE;
                (r.first_page + page as usize, r.host + page * PAGE_SIZE)
            })
        })
    }

    /// The guest physical address of page `g`.
    fn guest_addr(&self, g: usize) -> u64 {
        let r = self
            .ranges
            .iter()
            .rev()
            .find(|r| r.first_page <= g)
            .expect("page index inside guest RAM");
        r.guest + (g - r.first_page) as u64 * PAGE_SIZE
    }

    fn host_addr(&self, g: usize) -> u64 {
        let r = self
            .ranges
            .iter()
            .rev()
            .find(|r| r.first_page <= g)
            .expect("page index inside guest RAM");
        r.host + (g - r.first_page) as u64 * PAGE_SIZE
    }

    fn runs(&self, sorted: &[usize]) -> Vec<(usize, u64)> {
        let breaks: Vec<usize> = self.ranges.iter().map(|r| r.first_page).collect();
        runs_within(sorted, &breaks)
    }

    fn swapped(&self) -> u64 {
        lock(&self.table).swapped
    }

    /// Whether page `g` is mapped (`false` if that cannot be told).
    fn resident(&self, g: usize) -> bool {
        let mut v = Vec::with_capacity(1);
        uffd::mincore(self.host_addr(g), PAGE_SIZE, &mut v).is_ok_and(|()| v[0] & 1 != 0)
    }

    /// Enters `Failed` and tells the VMM, once.
    fn fail(&self, reason: String) {
        let swapped = self.swapped();
        let newly = lock(&self.machine).fail(reason.clone(), swapped);
        if newly {
            tracing::error!("swap failed: {reason}");
            if let Some(cb) = &self.on_failure {
                cb(&SwapFailure { reason });
            }
        }
    }

    /// After a failure: unregisters guest RAM from the userfaultfd, which wakes every thread
    /// blocked on a fault nobody will serve now (a vCPU, the event loop emulating a device, a
    /// swap worker) so that the VM can stop. What was in swap is lost: those pages fault as
    /// zero pages from here on, which is why only a failed swapper, whose VM is stopping, does
    /// it. Once.
    fn release_faults(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        for r in &self.ranges {
            if let Err(e) = self.uffd.unregister(r.host, r.len) {
                tracing::error!("cannot unregister guest RAM from the userfaultfd: {e}");
            }
        }
        tracing::warn!("swap failed: guest RAM released from userfaultfd, blocked faults woken");
    }

    /// The end of the fault-handling thread after a failure: gives the VMM
    /// [`FAILED_RELEASE_GRACE`] to stop the VM (and its vCPUs) the ordinary way, then releases
    /// the faults itself, in case the thread that would stop the VM is one of those blocked.
    fn release_after_grace(&self, stop: &uffd::EventFd) {
        if !self.stopping.load(Ordering::Acquire) {
            let ms = i32::try_from(FAILED_RELEASE_GRACE.as_millis()).unwrap_or(i32::MAX);
            uffd::poll_readable(stop.raw_fd(), ms);
        }
        self.release_faults();
    }

    fn failed(&self) -> Option<String> {
        let m = lock(&self.machine);
        (m.state() == SwapState::Failed).then(|| m.failure().unwrap_or("failed").to_string())
    }

    fn read_slot(&self, slot: u32, buf: &mut [u8]) -> io::Result<()> {
        let mut last = None;
        for _ in 0..3 {
            match self.backing.read_at(buf, file::slot_offset(slot)) {
                Ok(()) => {
                    SwapMetrics::add(&self.metrics.bytes_read, buf.len() as u64);
                    return Ok(());
                }
                Err(e) => {
                    SwapMetrics::add(&self.metrics.read_errors, 1);
                    last = Some(e);
                }
            }
        }
        Err(last.expect("three attempts were made"))
    }

    /// Reads page `g`'s slot and installs it, without holding the table across the read (a
    /// slow disk must not stall the API, swap-outs or discards, which all need the table).
    ///
    /// Takes the table, notes the slot and its generation, lets go, reads the slot into
    /// `buf`, takes the table again and installs the page only if the page still holds that
    /// slot in that generation (else looks again: the page was brought back, forgotten or
    /// swapped anew meanwhile) and the bytes match the slot's checksum. Returns what the page
    /// held when acted on (`IN_RAM`, `ZERO`, `OUTGOING`, `RACED`, or the slot now in `buf`),
    /// with the table still held so the caller installs the page under it. An error is fatal:
    /// the bytes on disk are unreadable or not the ones written.
    fn bring_in<'a>(
        &'a self,
        g: usize,
        buf: &mut PageBuf,
    ) -> Result<(MutexGuard<'a, Table>, u32), String> {
        loop {
            let t = lock(&self.table);
            let read = match t.pages[g] {
                held @ (IN_RAM | ZERO | OUTGOING | RACED) => return Ok((t, held)),
                slot => SlotRead {
                    slot,
                    generation: t.generations[slot as usize],
                    sum: t.sums[slot as usize],
                },
            };
            drop(t);
            self.read_slot(read.slot, &mut buf.0)
                .map_err(|e| format!("cannot read swap slot {}: {e}", read.slot))?;
            let t = lock(&self.table);
            if t.pages[g] != read.slot || t.generations[read.slot as usize] != read.generation {
                continue;
            }
            let sum = crc32c::crc32c(&buf.0);
            if sum != read.sum {
                SwapMetrics::add(&self.metrics.checksum_errors, 1);
                let gpa = self.guest_addr(g);
                return Err(format!(
                    "swap slot {} (guest page {gpa:#x}) failed its checksum: stored {:#010x}, \
                     read {sum:#010x}",
                    read.slot, read.sum
                ));
            }
            return Ok((t, read.slot));
        }
    }

    /// Brings page `g` back into RAM if it is in swap (a proactive swap-in).
    fn swap_in_page(&self, g: usize, buf: &mut PageBuf) -> Result<bool, String> {
        let addr = self.host_addr(g);
        let (mut t, held) = self.bring_in(g, buf)?;
        match held {
            IN_RAM | OUTGOING | RACED => return Ok(false),
            ZERO => {
                self.uffd
                    .zeropage(addr, PAGE_SIZE)
                    .map_err(|e| format!("UFFDIO_ZEROPAGE at {addr:#x} failed: {e}"))?;
            }
            _slot => {
                self.uffd
                    .copy(addr, &buf.0)
                    .map_err(|e| format!("UFFDIO_COPY at {addr:#x} failed: {e}"))?;
            }
        }
        t.release(g);
        Ok(true)
    }

    /// Serves one fault. An error is fatal: a faulting thread may stay blocked.
    fn handle_fault(
        &self,
        f: uffd::Fault,
        buf: &mut PageBuf,
        start: Instant,
    ) -> Result<(), String> {
        let Some((g, addr)) = self.locate(f.address) else {
            // Not ours (cannot happen: only guest RAM is registered); do not leave it blocked.
            let page = f.address & !(PAGE_SIZE - 1);
            return self
                .uffd
                .wake(page, PAGE_SIZE)
                .map_err(|e| format!("UFFDIO_WAKE at {page:#x} failed: {e}"));
        };
        if f.is_wp() {
            let mut t = lock(&self.table);
            SwapMetrics::add(&self.metrics.wp_faults, 1);
            if t.pages[g] == OUTGOING {
                t.pages[g] = RACED;
            }
            // Clearing the protection wakes the writer; it runs once we drop the table, and a
            // page already dropped by the swap-out simply faults again as missing.
            return self
                .uffd
                .write_protect(addr, PAGE_SIZE, false)
                .map_err(|e| format!("clearing write protection at {addr:#x} failed: {e}"));
        }
        let (mut t, held) = self.bring_in(g, buf)?;
        match held {
            IN_RAM | ZERO | OUTGOING | RACED => {
                // Never touched, discarded, or swapped out as zero: a zero page is the content.
                if t.pages[g] == OUTGOING {
                    t.pages[g] = RACED;
                }
                if t.pages[g] == ZERO {
                    t.release(g);
                }
                self.uffd
                    .zeropage(addr, PAGE_SIZE)
                    .map_err(|e| format!("UFFDIO_ZEROPAGE at {addr:#x} failed: {e}"))?;
                SwapMetrics::add(&self.metrics.zero_faults, 1);
            }
            _slot => {
                let r = self
                    .uffd
                    .copy(addr, &buf.0)
                    .map_err(|e| format!("UFFDIO_COPY at {addr:#x} failed: {e}"))?;
                debug_assert_eq!(r, Resolve::Done, "a swapped page was mapped");
                t.release(g);
                SwapMetrics::add(&self.metrics.faults_served, 1);
                self.latency
                    .record_us(start.elapsed().as_micros().try_into().unwrap_or(u64::MAX));
            }
        }
        Ok(())
    }

    /// Step 5 of a swap-out batch: checksums each page and writes each run of consecutive
    /// slots with one `pwritev` straight from guest RAM (stable: write-protected; a page written
    /// meanwhile is kept in RAM by the commit anyway, and its checksum thrown away). A write
    /// returns once the bytes are on the device (see [`SwapBacking::write_pages_at`]), so a
    /// failed one is seen here, before the commit drops anything. Stops at the first failure.
    fn write_batch(&self, b: &mut Batch) {
        let mut scratch = [0u64; (PAGE_SIZE / 8) as usize];
        let mut k = 0;
        while k < b.slots.len() {
            let mut e = k + 1;
            while e < b.slots.len() && e - k < WRITE_PAGES && b.slots[e] == b.slots[e - 1] + 1 {
                e += 1;
            }
            let mut run = GuestPieces::default();
            for (j, i) in b.nonzero[k..e].iter().enumerate() {
                let addr = self.host_addr(b.pages[*i]);
                b.sums[k + j] = uffd::page_crc32c(addr, &mut scratch);
                run.push(addr, PAGE_SIZE as usize);
            }
            let offset = file::slot_offset(b.slots[k]);
            match self.backing.write_pages_at(&run, offset) {
                Ok(()) => {
                    b.written[k..e].iter_mut().for_each(|w| *w = true);
                    SwapMetrics::add(&self.metrics.bytes_written, run.len_bytes());
                    SwapMetrics::add(&self.metrics.pages_written, (e - k) as u64);
                    self.file_len
                        .fetch_max(offset + run.len_bytes(), Ordering::Relaxed);
                }
                Err(err) => {
                    SwapMetrics::add(&self.metrics.write_errors, 1);
                    tracing::warn!("swap file write failed, pages stay in RAM: {err}");
                    b.write_failed = true;
                    return;
                }
            }
            k = e;
        }
    }

    /// The swap-out writer thread: writes the batches it is handed, in order, and hands them
    /// back. After a failed write it writes nothing more (the rest of the call's batches go back
    /// to RAM unwritten, as the inline writer does). Never takes the page table.
    fn run_writer(&self, queued: &mpsc::Receiver<Batch>, written: &mpsc::Sender<Batch>) {
        let mut failed = false;
        for mut b in queued {
            if !failed {
                self.write_batch(&mut b);
                failed = b.write_failed;
            }
            if written.send(b).is_err() {
                return;
            }
        }
    }

    fn run_handler(&self, stop: &uffd::EventFd) -> Result<(), String> {
        let mut faults = Vec::with_capacity(16);
        let mut buf = PageBuf([0; PAGE_SIZE as usize]);
        loop {
            let ready = uffd::poll2(self.uffd.raw_fd(), stop.raw_fd())
                .map_err(|e| format!("poll on userfaultfd failed: {e}"))?;
            if ready.stop {
                return Ok(());
            }
            if !ready.uffd {
                continue;
            }
            self.uffd
                .read_faults(&mut faults)
                .map_err(|e| format!("reading userfaultfd failed: {e}"))?;
            let start = Instant::now();
            for f in faults.iter() {
                self.handle_fault(*f, &mut buf, start)?;
            }
        }
    }
}

/// A page-aligned page buffer (the source of `UFFDIO_COPY`).
#[repr(C, align(4096))]
struct PageBuf([u8; PAGE_SIZE as usize]);

/// How long a failed fault-handling thread leaves the VMM to stop the VM before it wakes the
/// threads blocked on faults itself (see `Shared::release_after_grace`).
pub const FAILED_RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Reports the fault-handling thread's end, however it ends, and then makes sure no thread
/// stays blocked on a fault nobody serves.
struct HandlerGuard(Arc<Shared>, Arc<uffd::EventFd>);

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0
                .fail("the swap fault-handling thread panicked".to_string());
        } else if !self.0.stopping.load(Ordering::Acquire) {
            self.0
                .fail("the swap fault-handling thread exited".to_string());
        }
        if self.0.failed().is_some() {
            self.0.release_after_grace(&self.1);
        }
    }
}

/// Per-VM swap: see the module documentation.
pub struct Swapper {
    shared: Arc<Shared>,
    handler: Mutex<Option<JoinHandle<()>>>,
    stop: Arc<uffd::EventFd>,
    /// Serializes swap-out and swap-in calls.
    op: Mutex<()>,
    ages: Mutex<Ages>,
    batch_pages: usize,
    /// Set by [`Swapper::cancel`]: swap-outs and swap-ins stop after their current batch.
    cancelled: AtomicBool,
}

impl fmt::Debug for Swapper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Swapper")
            .field("shared", &self.shared)
            .field("batch_pages", &self.batch_pages)
            .finish_non_exhaustive()
    }
}

impl Swapper {
    /// Creates a swap file with a unique name in `dir`, registers all of `ram` with userfaultfd
    /// and starts the fault-handling thread. Nothing is swapped until [`Swapper::swap_out`].
    pub fn new(ram: &GuestRam, dir: &Path, options: SwapOptions) -> Result<Self, SwapError> {
        let file = SwapFile::create(dir).map_err(|source| SwapError::CreateFile {
            dir: dir.to_path_buf(),
            source,
        })?;
        Self::with_backing(ram, Box::new(file), options)
    }

    /// Like [`Swapper::new`] with the given storage (tests inject failures through it).
    pub fn with_backing(
        ram: &GuestRam,
        backing: Box<dyn SwapBacking>,
        options: SwapOptions,
    ) -> Result<Self, SwapError> {
        let features = uffd::probe_features().map_err(SwapError::Userfaultfd)?;
        if features & uffd::FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(SwapError::NoWriteProtect);
        }
        let uffd = Uffd::new(uffd::FEATURE_PAGEFAULT_FLAG_WP).map_err(SwapError::Userfaultfd)?;
        let mut ranges = Vec::new();
        let mut total = 0usize;
        for (range, ptr) in ram.host_ranges() {
            ranges.push(RangeInfo {
                guest: range.start.0,
                host: ptr as u64,
                len: range.size,
                first_page: total,
            });
            total += (range.size / PAGE_SIZE) as usize;
        }
        if total as u64 >= MAX_PAGES {
            return Err(SwapError::BadRange {
                addr: 0,
                len: ram.size_bytes(),
            });
        }
        // Bits of the ioctls the kernel must allow on the range: COPY (3), ZEROPAGE (4) and
        // WRITEPROTECT (6).
        const NEEDED: u64 = (1 << 3) | (1 << 4) | (1 << 6);
        for r in &ranges {
            let allowed = uffd
                .register(r.host, r.len, true)
                .map_err(SwapError::Register)?;
            if allowed & NEEDED != NEEDED {
                return Err(SwapError::NoWriteProtect);
            }
        }
        let pages_per_range: Vec<usize> = ranges
            .iter()
            .map(|r| (r.len / PAGE_SIZE) as usize)
            .collect();
        let shared = Arc::new(Shared {
            uffd,
            _ram: ram.clone(),
            ranges,
            table: Mutex::new(Table {
                pages: vec![IN_RAM; total],
                slots: SlotAllocator::new(total as u32),
                sums: vec![0; total],
                generations: vec![0; total],
                swapped: 0,
                zero: 0,
            }),
            backing,
            file_len: AtomicU64::new(0),
            metrics: SwapMetrics::default(),
            latency: LatencyHistogram::new(),
            machine: Mutex::new(StateMachine::new()),
            on_failure: options.on_failure,
            stopping: AtomicBool::new(false),
            released: AtomicBool::new(false),
        });
        let stop = Arc::new(uffd::EventFd::new().map_err(SwapError::Thread)?);
        let thread_shared = Arc::clone(&shared);
        let thread_stop = Arc::clone(&stop);
        let handler = std::thread::Builder::new()
            .name("swap-faults".into())
            .spawn(move || {
                let guard = HandlerGuard(thread_shared, thread_stop.clone());
                if let Err(reason) = guard.0.run_handler(&thread_stop) {
                    guard.0.fail(reason);
                }
            })
            .map_err(SwapError::Thread)?;
        Ok(Swapper {
            shared,
            handler: Mutex::new(Some(handler)),
            stop,
            op: Mutex::new(()),
            ages: Mutex::new(Ages::new(&pages_per_range)),
            batch_pages: options.batch_pages.max(1),
            cancelled: AtomicBool::new(false),
        })
    }

    /// For teardown: a running swap-out or swap-in stops after its current batch (its report
    /// says what it did), and later calls move nothing. Faults are still served.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// For the teardown of a failed swapper: wakes every thread blocked on a fault (see
    /// [`FAILED_RELEASE_GRACE`]; the fault-handling thread does it by itself after that long).
    /// Does nothing unless the swapper has failed.
    pub fn release_faults(&self) {
        if self.shared.failed().is_some() {
            self.shared.release_faults();
        }
    }

    /// Fails the swapper if the fault-handling thread is gone; returns the failure, if any.
    fn check_alive(&self) -> Result<(), SwapError> {
        let finished = lock(&self.handler).as_ref().is_none_or(|h| h.is_finished());
        if finished && !self.shared.stopping.load(Ordering::Acquire) {
            self.shared
                .fail("the swap fault-handling thread is gone".to_string());
        }
        match self.shared.failed() {
            Some(reason) => Err(SwapError::Failed(reason)),
            None => Ok(()),
        }
    }

    /// Samples one interval of the dirty log into the page ages (call it periodically, e.g. on
    /// every scheduler tick).
    pub fn sample_ages(&self, log: &mut dyn DirtyLog) -> io::Result<()> {
        lock(&self.ages).sample(log)
    }

    /// A copy of the current page ages.
    pub fn ages(&self) -> Ages {
        lock(&self.ages).clone()
    }

    /// Swaps out, oldest pages first, until `target_bytes` of guest RAM are in swap, or brings
    /// pages back until no more than that is; `0` brings everything back. Pages that are not
    /// resident cost the host nothing and are skipped, so the target may not be reached.
    pub fn swap_out(&self, target_bytes: u64) -> Result<SwapReport, SwapError> {
        let _op = lock(&self.op);
        self.check_alive()?;
        let start = Instant::now();
        let total = lock(&self.shared.table).pages.len() as u64;
        let target = target_bytes.div_ceil(PAGE_SIZE).min(total);
        let swapped = self.shared.swapped();
        let mut report = SwapReport::default();
        if target != swapped && !self.is_cancelled() {
            let going = if target > swapped {
                SwapState::SwappingOut
            } else {
                SwapState::SwappingIn
            };
            lock(&self.shared.machine).go(going, 0, swapped);
            let outcome = if going == SwapState::SwappingOut {
                self.do_swap_out(target - swapped, &mut report)
            } else {
                self.do_swap_in(swapped - target, &mut report)
            };
            let now_swapped = self.shared.swapped();
            let moved = report.pages_written + report.zero_pages + report.pages_swapped_in;
            let next = if now_swapped == 0 {
                SwapState::Idle
            } else {
                SwapState::Active
            };
            // Refused (and harmless) if the swapper failed meanwhile.
            lock(&self.shared.machine).go(next, moved, now_swapped);
            outcome?;
        }
        self.shrink_file();
        report.swapped_pages = self.shared.swapped();
        report.elapsed_us = start.elapsed().as_micros() as u64;
        self.check_alive()?;
        Ok(report)
    }

    fn shrink_file(&self) {
        let len = u64::from(lock(&self.shared.table).slots.high_water()) * PAGE_SIZE;
        if len < self.shared.file_len.load(Ordering::Relaxed) {
            match self.shared.backing.set_len(len) {
                Ok(()) => self.shared.file_len.store(len, Ordering::Relaxed),
                Err(e) => {
                    SwapMetrics::add(&self.shared.metrics.other_errors, 1);
                    tracing::warn!("cannot shrink the swap file: {e}");
                }
            }
        }
    }

    fn do_swap_out(&self, want: u64, report: &mut SwapReport) -> Result<(), SwapError> {
        let sh = &self.shared;
        let mut resident: Vec<Vec<u8>> = Vec::with_capacity(sh.ranges.len());
        for r in &sh.ranges {
            let mut v = Vec::new();
            uffd::mincore(r.host, r.len, &mut v).map_err(|source| SwapError::Host {
                op: "mincore",
                source,
            })?;
            resident.push(v);
        }
        let candidates: Vec<usize> = {
            let ages = lock(&self.ages);
            let t = lock(&sh.table);
            ages.oldest_first(|r, p| {
                resident[r][p] & 1 != 0 && t.pages[sh.ranges[r].first_page + p] == IN_RAM
            })
        }
        .into_iter()
        .map(|(r, p)| sh.ranges[r].first_page + p)
        .collect();
        drop(resident);
        // More than one batch to go: write on a second thread while this one prepares the next
        // batch and commits the previous one (see `Pipeline`).
        if want > self.batch_pages as u64 && candidates.len() > self.batch_pages {
            let spawned = std::thread::scope(|scope| {
                let (to_writer, queued) = mpsc::channel::<Batch>();
                let (to_caller, written) = mpsc::channel::<Batch>();
                let spawned = std::thread::Builder::new()
                    .name("swap-out-writer".into())
                    .spawn_scoped(scope, move || sh.run_writer(&queued, &to_caller));
                match spawned {
                    Ok(_) => {
                        let mut pipe = Pipeline::Thread { to_writer, written };
                        Some(self.run_batches(&candidates, want, &mut pipe, report))
                    }
                    Err(e) => {
                        tracing::warn!(
                            "cannot start the swap-out writer thread ({e}); writing inline"
                        );
                        None
                    }
                }
                // Dropping the pipeline closes the writer's queue; the scope joins it.
            });
            if let Some(outcome) = spawned {
                return outcome;
            }
        }
        self.run_batches(
            &candidates,
            want,
            &mut Pipeline::Inline(VecDeque::new(), false),
            report,
        )
    }

    /// Swaps out `candidates` (page indices, in the order to take them) in batches until `want`
    /// pages are in swap: prepares a batch, hands it to `pipe` to be written, and commits the
    /// written batches in order, with up to `pipe.depth()` batches in flight.
    fn run_batches(
        &self,
        candidates: &[usize],
        want: u64,
        pipe: &mut Pipeline,
        report: &mut SwapReport,
    ) -> Result<(), SwapError> {
        let sh = &self.shared;
        let mut done = 0u64;
        let mut next = 0usize;
        let mut in_flight = 0usize;
        // Claimed pages of the batches in flight: counted as going, so no more are claimed than
        // needed; those that do not make it (raced, write failed) are made up for later.
        let mut going = 0u64;
        let mut stop = false;
        let mut error = None;
        loop {
            while !stop
                && !self.is_cancelled()
                && in_flight < pipe.depth()
                && done + going < want
                && next < candidates.len()
            {
                let n = (self.batch_pages as u64).min(want - done - going) as usize;
                let end = (next + n).min(candidates.len());
                let mut pages = candidates[next..end].to_vec();
                next = end;
                pages.sort_unstable();
                match self.prepare_batch(pages) {
                    Ok(b) if b.pages.is_empty() => {}
                    Ok(b) => {
                        going += b.pages.len() as u64;
                        in_flight += 1;
                        pipe.submit(sh, b);
                    }
                    Err(e) => {
                        error = Some(e);
                        stop = true;
                    }
                }
            }
            if in_flight == 0 {
                break;
            }
            let b = pipe.next_written();
            in_flight -= 1;
            going -= b.pages.len() as u64;
            if b.write_failed {
                report.write_errors += 1;
                stop = true;
            }
            match self.commit_batch(b) {
                Ok(out) => {
                    done += out.swapped;
                    report.pages_written += out.written;
                    report.zero_pages += out.zero;
                    report.raced_pages += out.raced;
                }
                Err(e) => {
                    // The batches still in flight are committed all the same (each keeps its
                    // pages in RAM if it cannot drop them); the first error is returned.
                    error.get_or_insert(e);
                    stop = true;
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Steps 1–4 of a swap-out batch (sorted page indices): claims the pages, write-protects
    /// them, finds the zero pages and gives the others slots.
    fn prepare_batch(&self, batch: Vec<usize>) -> Result<Batch, SwapError> {
        let sh = &self.shared;
        // 1. Claim the pages.
        let mut pages = batch;
        {
            let mut t = lock(&sh.table);
            pages.retain(|g| {
                let free = t.pages[*g] == IN_RAM;
                if free {
                    t.pages[*g] = OUTGOING;
                }
                free
            });
        }
        if pages.is_empty() {
            return Ok(Batch::default());
        }
        // 2. Write-protect them: from here on a write faults to the handler, which marks the
        //    page RACED before letting the write through.
        for (first, count) in sh.runs(&pages) {
            let addr = sh.host_addr(first);
            if let Err(source) = sh.uffd.write_protect(addr, count * PAGE_SIZE, true) {
                SwapMetrics::add(&sh.metrics.other_errors, 1);
                self.abandon(&pages);
                return Err(SwapError::Host {
                    op: "UFFDIO_WRITEPROTECT",
                    source,
                });
            }
        }
        // 3. Find the zero pages (no lock held: reading may fault).
        let mut nonzero: Vec<usize> = Vec::with_capacity(pages.len());
        let mut is_zero = vec![false; pages.len()];
        for (i, g) in pages.iter().enumerate() {
            if uffd::page_is_zero(sh.host_addr(*g)) {
                is_zero[i] = true;
            } else {
                nonzero.push(i);
            }
        }
        // 4. Slots, lowest first, in page order.
        let slots: Vec<u32> = {
            let mut t = lock(&sh.table);
            nonzero
                .iter()
                .map(|_| t.slots.alloc().expect("one slot per guest page at most"))
                .collect()
        };
        Ok(Batch {
            written: vec![false; nonzero.len()],
            sums: vec![0; nonzero.len()],
            pages,
            is_zero,
            nonzero,
            slots,
            write_failed: false,
        })
    }

    /// Step 6 of a swap-out batch: under the table, drops the pages not written to since step 2
    /// (the handler cannot let a write through meanwhile, as it needs the table to do so) and
    /// gives the others back to RAM. Goes [`COMMIT_PAGES`] pages at a time, so that the fault
    /// handler never waits for the table longer than it takes to drop that many.
    fn commit_batch(&self, b: Batch) -> Result<BatchOut, SwapError> {
        let sh = &self.shared;
        let mut out = BatchOut::default();
        let mut slot_of: Vec<Option<(u32, u32)>> = vec![None; b.pages.len()];
        let mut unwritten: Vec<u32> = Vec::new();
        for (j, i) in b.nonzero.iter().enumerate() {
            if b.written[j] {
                slot_of[*i] = Some((b.slots[j], b.sums[j]));
            } else {
                unwritten.push(b.slots[j]);
            }
        }
        let mut failed_drop = None;
        let mut drop_list = Vec::with_capacity(COMMIT_PAGES.min(b.pages.len()));
        let mut unprotect = Vec::new();
        let mut dropped = Vec::with_capacity(COMMIT_PAGES.min(b.pages.len()));
        let mut first = 0;
        while first < b.pages.len() {
            let end = (first + COMMIT_PAGES).min(b.pages.len());
            drop_list.clear();
            unprotect.clear();
            let mut t = lock(&sh.table);
            if first == 0 {
                for slot in &unwritten {
                    t.slots.free(*slot);
                }
            }
            let chunk = b.pages[first..end]
                .iter()
                .zip(&b.is_zero[first..end])
                .zip(&slot_of[first..end]);
            for ((&g, &is_zero), &slot) in chunk {
                match (t.pages[g], is_zero, slot) {
                    (RACED, _, slot) => {
                        if let Some((s, _)) = slot {
                            t.slots.free(s);
                        }
                        t.pages[g] = IN_RAM;
                        out.raced += 1;
                    }
                    (OUTGOING, true, _) => drop_list.push((g, ZERO)),
                    (OUTGOING, false, Some((s, sum))) => {
                        t.sums[s as usize] = sum;
                        drop_list.push((g, s));
                    }
                    (OUTGOING, false, None) => {
                        t.pages[g] = IN_RAM;
                        unprotect.push(g);
                    }
                    (other, _, _) => unreachable!("claimed page in state {other:#x}"),
                }
            }
            if failed_drop.is_none() {
                dropped.clear();
                dropped.extend(drop_list.iter().map(|(g, _)| *g));
                for (run, count) in sh.runs(&dropped) {
                    if let Err(e) = uffd::dontneed(sh.host_addr(run), count * PAGE_SIZE) {
                        SwapMetrics::add(&sh.metrics.other_errors, 1);
                        failed_drop = Some(e);
                        break;
                    }
                }
            }
            for (g, s) in &drop_list {
                // After a failed drop, a page still mapped goes back to RAM; one that is gone
                // (or whose residency is unknown) keeps its slot: its content is there, and
                // should it still be mapped, the next swap-in finds it so and keeps it.
                if failed_drop.is_some() && sh.resident(*g) {
                    if *s != ZERO {
                        t.slots.free(*s);
                    }
                    t.pages[*g] = IN_RAM;
                    unprotect.push(*g);
                    continue;
                }
                t.pages[*g] = *s;
                t.swapped += 1;
                out.swapped += 1;
                if *s == ZERO {
                    t.zero += 1;
                    out.zero += 1;
                } else {
                    out.written += 1;
                }
            }
            unprotect.sort_unstable();
            self.unprotect_locked(&unprotect);
            drop(t);
            first = end;
        }
        SwapMetrics::add(&sh.metrics.raced_pages, out.raced);
        match failed_drop {
            Some(source) => Err(SwapError::Host {
                op: "MADV_DONTNEED",
                source,
            }),
            None => Ok(out),
        }
    }

    /// Clears write protection on sorted pages (the caller holds the table).
    fn unprotect_locked(&self, pages: &[usize]) {
        for (first, count) in self.shared.runs(pages) {
            let addr = self.shared.host_addr(first);
            if let Err(e) = self
                .shared
                .uffd
                .write_protect(addr, count * PAGE_SIZE, false)
            {
                // A write to these pages will fault and the handler clears it then.
                SwapMetrics::add(&self.shared.metrics.other_errors, 1);
                tracing::warn!("clearing write protection failed: {e}");
            }
        }
    }

    /// Returns claimed pages to RAM after an aborted batch.
    fn abandon(&self, pages: &[usize]) {
        let mut t = lock(&self.shared.table);
        for g in pages {
            t.pages[*g] = IN_RAM;
        }
        self.unprotect_locked(pages);
    }

    fn do_swap_in(&self, want: u64, report: &mut SwapReport) -> Result<(), SwapError> {
        let sh = &self.shared;
        let candidates: Vec<usize> = {
            let t = lock(&sh.table);
            (0..t.pages.len())
                .filter(|g| !matches!(t.pages[*g], IN_RAM | OUTGOING | RACED))
                .take(want as usize)
                .collect()
        };
        let mut buf = PageBuf([0; PAGE_SIZE as usize]);
        for chunk in candidates.chunks(64) {
            if self.is_cancelled() {
                break;
            }
            for g in chunk {
                match sh.swap_in_page(*g, &mut buf) {
                    Ok(true) => report.pages_swapped_in += 1,
                    Ok(false) => {}
                    Err(reason) => {
                        sh.fail(reason.clone());
                        return Err(SwapError::Failed(reason));
                    }
                }
            }
        }
        SwapMetrics::add(&sh.metrics.pages_swapped_in, report.pages_swapped_in);
        Ok(())
    }

    /// Forgets the pages of a guest range (the balloon discarded them): they give up their swap
    /// slot, their host pages are dropped, and they read as zero afterwards.
    pub fn forget(&self, addr: GuestAddress, len: u64) -> Result<(), SwapError> {
        let sh = &self.shared;
        let bad = || SwapError::BadRange { addr: addr.0, len };
        if !addr.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(bad());
        }
        let r = sh
            .ranges
            .iter()
            .find(|r| addr.0 >= r.guest && addr.0 + len <= r.guest + r.len)
            .ok_or_else(bad)?;
        let first = r.first_page + ((addr.0 - r.guest) / PAGE_SIZE) as usize;
        let count = (len / PAGE_SIZE) as usize;
        let host = r.host + (addr.0 - r.guest);
        let mut t = lock(&sh.table);
        for g in first..first + count {
            if t.pages[g] == OUTGOING {
                t.pages[g] = RACED;
            } else if t.pages[g] != RACED {
                t.release(g);
            }
        }
        if len > 0 {
            uffd::dontneed(host, len).map_err(|source| SwapError::Host {
                op: "MADV_DONTNEED",
                source,
            })?;
        }
        Ok(())
    }

    /// The state and counters (`GET /api/v1/vms/{id}/swap`).
    pub fn status(&self) -> SwapStatus {
        let _ = self.check_alive();
        let sh = &self.shared;
        let m = &sh.metrics;
        let (swapped, zero) = {
            let t = lock(&sh.table);
            (t.swapped, t.zero)
        };
        let (state, failure, transitions) = {
            let mach = lock(&sh.machine);
            (
                mach.state(),
                mach.failure().map(str::to_string),
                mach.history().cloned().collect(),
            )
        };
        let write_errors = SwapMetrics::get(&m.write_errors);
        let read_errors = SwapMetrics::get(&m.read_errors);
        let checksum_errors = SwapMetrics::get(&m.checksum_errors);
        SwapStatus {
            state,
            failure,
            swapped_pages: swapped,
            zero_pages: zero,
            file_path: sh.backing.path().map(Path::to_path_buf),
            file_size_bytes: sh.file_len.load(Ordering::Relaxed),
            faults_served: SwapMetrics::get(&m.faults_served),
            zero_faults: SwapMetrics::get(&m.zero_faults),
            wp_faults: SwapMetrics::get(&m.wp_faults),
            fault_latency_p50_us: sh.latency.quantile_us(0.50),
            fault_latency_p99_us: sh.latency.quantile_us(0.99),
            bytes_written: SwapMetrics::get(&m.bytes_written),
            bytes_read: SwapMetrics::get(&m.bytes_read),
            pages_swapped_in: SwapMetrics::get(&m.pages_swapped_in),
            raced_pages: SwapMetrics::get(&m.raced_pages),
            write_errors,
            read_errors,
            checksum_errors,
            errors: write_errors
                + read_errors
                + checksum_errors
                + SwapMetrics::get(&m.other_errors),
            age_samples: lock(&self.ages).samples(),
            transitions,
        }
    }

    /// The status as metrics for `GET /metrics` (the exporter adds its prefix and the VM
    /// label): levels (state, sizes, latency quantiles) are gauges, the rest counters. A flat
    /// table, one entry per metric: its length is the number of metrics, not logic.
    pub fn metrics(&self) -> Vec<Metric> {
        let s = self.status();
        vec![
            Metric::level(
                "swap_state",
                "Swap state (0 idle, 1 swapping out, 2 active, 3 swapping in, 4 failed).",
                s.state.code(),
            ),
            Metric::level(
                "swap_swapped_pages",
                "Guest pages in swap.",
                s.swapped_pages,
            ),
            Metric::level(
                "swap_zero_pages",
                "Swapped-out pages that were zero (no file space).",
                s.zero_pages,
            ),
            Metric::level(
                "swap_file_size_bytes",
                "Size of the swap file.",
                s.file_size_bytes,
            ),
            Metric::counter(
                "swap_faults_served",
                "Guest faults served from the swap file.",
                s.faults_served,
            ),
            Metric::counter(
                "swap_zero_faults",
                "Guest faults served with a zero page.",
                s.zero_faults,
            ),
            Metric::counter(
                "swap_wp_faults",
                "Write-protect faults (a write raced a swap-out).",
                s.wp_faults,
            ),
            Metric::level(
                "swap_fault_latency_p50_us",
                "Median fault service time, microseconds.",
                s.fault_latency_p50_us,
            ),
            Metric::level(
                "swap_fault_latency_p99_us",
                "99th percentile fault service time, microseconds.",
                s.fault_latency_p99_us,
            ),
            Metric::counter(
                "swap_bytes_written",
                "Bytes written to the swap file.",
                s.bytes_written,
            ),
            Metric::counter(
                "swap_bytes_read",
                "Bytes read from the swap file.",
                s.bytes_read,
            ),
            Metric::counter(
                "swap_pages_swapped_in",
                "Pages brought back by a swap-in.",
                s.pages_swapped_in,
            ),
            Metric::counter(
                "swap_raced_pages",
                "Pages a write kept in RAM during a swap-out.",
                s.raced_pages,
            ),
            Metric::counter(
                "swap_write_errors",
                "Failed writes to the swap file.",
                s.write_errors,
            ),
            Metric::counter(
                "swap_read_errors",
                "Failed reads from the swap file.",
                s.read_errors,
            ),
            Metric::counter(
                "swap_checksum_errors",
                "Swapped pages whose checksum did not match on fault-in.",
                s.checksum_errors,
            ),
            Metric::counter("swap_errors", "All swap errors.", s.errors),
        ]
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        if let Err(e) = self.stop.signal() {
            tracing::error!("cannot stop the swap fault-handling thread: {e}");
            return;
        }
        if let Some(h) = lock(&self.handler).take() {
            // A panic there was already reported through the failure callback.
            let _ = h.join();
        }
        // Closing the userfaultfd (with `shared`) unregisters guest RAM and wakes any thread
        // still blocked on it.
    }
}

impl DiscardRam for Swapper {
    fn discard_range(&self, addr: GuestAddress, len: u64) -> Result<(), RamError> {
        self.forget(addr, len).map_err(|e| match e {
            SwapError::Host { op, source } => RamError::Madvise { advice: op, source },
            _ => RamError::BadRange {
                addr: addr.0,
                size: len,
            },
        })
    }
}

#[derive(Debug, Default)]
struct BatchOut {
    swapped: u64,
    written: u64,
    zero: u64,
    raced: u64,
}

/// One swap-out batch between its steps: claimed (`OUTGOING`) and write-protected, zero pages
/// found, slots given to the others; then written.
#[derive(Debug, Default)]
struct Batch {
    /// The claimed pages, sorted.
    pages: Vec<usize>,
    /// Per page of `pages`: all zero (not written).
    is_zero: Vec<bool>,
    /// Indices into `pages` of the non-zero pages, in order.
    nonzero: Vec<usize>,
    /// The slot of each non-zero page (ascending).
    slots: Vec<u32>,
    /// Per non-zero page: the CRC32C of what was written.
    sums: Vec<u32>,
    /// Per non-zero page: its slot was written.
    written: Vec<bool>,
    /// A write failed.
    write_failed: bool,
}

/// Batches in flight (write-protected, not yet committed), at most, with a writer thread: one
/// being written while the one before it is committed and the one after it prepared. (A third
/// measured no faster and keeps more pages write-protected.)
const PIPELINE_DEPTH: usize = 2;

/// Most pages written by one `pwritev`: 1 MiB, the size of the baseline's writes in
/// `bench/swap`. Larger writes make the kernel use larger page-cache folios, which on the
/// development VM often land on memory its host has to fault in again: 4 MiB writes were 3–10
/// times slower in about one run in four, 1 MiB ones rarely (see `docs/swap.md`).
const WRITE_PAGES: usize = 256;

/// Most pages committed (checked and dropped) per hold of the page table, which bounds how long
/// the fault handler can wait for it (about 80 µs for 256 pages here).
const COMMIT_PAGES: usize = 256;

/// Where swap-out batches are written.
///
/// With a writer thread, the file write of batch `i` (most of the time: the kernel copies the
/// pages into the page cache) overlaps the write-protect ioctl and zero scan of batch `i + 1`
/// and the commit (`MADV_DONTNEED`) of batch `i - 1` on the calling thread. Every step keeps
/// its place in the no-lost-write argument: a batch is write-protected before it is written
/// and committed only after, under the table, and the writer never takes the table.
enum Pipeline {
    /// Written on the calling thread as soon as submitted (one batch in flight); the flag is
    /// set after a failed write.
    Inline(VecDeque<Batch>, bool),
    /// Written on a `swap-out-writer` thread (see `Shared::run_writer`).
    Thread {
        to_writer: mpsc::Sender<Batch>,
        written: mpsc::Receiver<Batch>,
    },
}

impl Pipeline {
    fn depth(&self) -> usize {
        match self {
            Pipeline::Inline(..) => 1,
            Pipeline::Thread { .. } => PIPELINE_DEPTH,
        }
    }

    fn submit(&mut self, sh: &Shared, mut b: Batch) {
        match self {
            Pipeline::Inline(done, failed) => {
                if !*failed {
                    sh.write_batch(&mut b);
                    *failed = b.write_failed;
                }
                done.push_back(b);
            }
            Pipeline::Thread { to_writer, .. } => {
                // The writer only stops when this sender is dropped.
                to_writer
                    .send(b)
                    .expect("the swap-out writer thread is running");
            }
        }
    }

    /// The oldest submitted batch, written (or not, after a failure).
    fn next_written(&mut self) -> Batch {
        match self {
            Pipeline::Inline(done, _) => done.pop_front().expect("a batch was submitted"),
            // Ends only by panicking (the scope then re-raises it).
            Pipeline::Thread { written, .. } => written
                .recv()
                .expect("the swap-out writer thread is running"),
        }
    }
}

/// Runs of consecutive page indices in a sorted list, as (first, count). `breaks` holds the
/// first page of each guest RAM range: a run never crosses one, so it is contiguous on the host.
fn runs_within(sorted: &[usize], breaks: &[usize]) -> Vec<(usize, u64)> {
    let mut out: Vec<(usize, u64)> = Vec::new();
    for g in sorted {
        match out.last_mut() {
            Some((first, count))
                if *first + *count as usize == *g && breaks.binary_search(g).is_err() =>
            {
                *count += 1
            }
            _ => out.push((*g, 1)),
        }
    }
    out
}

#[cfg(test)]
mod tests;
