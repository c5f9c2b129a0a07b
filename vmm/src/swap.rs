//! The VM's side of hypervisor swap: the [`memory::swap::Swapper`] is created at the first swap
//! request (registering guest RAM with userfaultfd costs every first touch of a page a trip
//! through the fault thread, so a VM that never swaps never pays it), swap-outs run on a
//! worker thread so the event loop keeps serving the guest's devices and the API, page ages
//! are sampled from KVM's dirty log once per [`AGE_INTERVAL`], and a failed swapper stops the
//! VM with its reason.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::VmFd;
use memory::swap::{SwapBacking, SwapFailure, SwapOptions, SwapReport, Swapper, SwapperCell};
use memory::GuestRam;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::action::ActionError;
use crate::memslots::{map_ram, KvmDirtyLog};
use crate::vcpu::{VmExit, VmShared};

/// How often page ages are sampled from the dirty log once swap is armed.
pub const AGE_INTERVAL: Duration = Duration::from_secs(1);

/// `TMPFS_MAGIC` from `linux/magic.h`: a swap file there would stay in RAM.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// What the last swap request did.
#[derive(Debug, Clone)]
enum LastRun {
    Done(SwapReport),
    Failed(String),
}

/// Swap for one VM.
pub struct VmSwap {
    dir: PathBuf,
    ram: GuestRam,
    vm_fd: Arc<VmFd>,
    shared: Arc<VmShared>,
    swapper: SwapperCell,
    worker: Mutex<Option<JoinHandle<()>>>,
    target_mib: Mutex<u64>,
    last: Arc<Mutex<Option<LastRun>>>,
    backing: Mutex<Option<Box<dyn SwapBacking>>>,
    /// The status of a failed swapper let go of at teardown, still reported.
    failed: Mutex<Option<memory::swap::SwapStatus>>,
}

impl std::fmt::Debug for VmSwap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSwap")
            .field("dir", &self.dir)
            .field("armed", &self.swapper().is_some())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl VmSwap {
    /// Swap for `ram` with its file in `dir` (current directory when `None`). Nothing happens
    /// until [`VmSwap::request`].
    pub fn new(dir: Option<&Path>, ram: GuestRam, vm_fd: Arc<VmFd>, shared: Arc<VmShared>) -> Self {
        VmSwap {
            dir: dir.map_or_else(|| PathBuf::from("."), Path::to_path_buf),
            ram,
            vm_fd,
            shared,
            swapper: Arc::new(RwLock::new(None)),
            worker: Mutex::new(None),
            target_mib: Mutex::new(0),
            last: Arc::new(Mutex::new(None)),
            backing: Mutex::new(None),
            failed: Mutex::new(None),
        }
    }

    /// Stores swapped pages in `backing` instead of a file in the swap directory (another
    /// VMM's storage, or a test's failing one). Only before swap is armed.
    pub fn set_backing(&self, backing: Box<dyn SwapBacking>) -> Result<(), ActionError> {
        if self.swapper().is_some() {
            return Err(ActionError::Conflict("swap is already armed".into()));
        }
        *lock(&self.backing) = Some(backing);
        Ok(())
    }

    /// The swapper cell, for [`memory::discard::GuestDiscard`].
    pub fn swapper_cell(&self) -> SwapperCell {
        self.swapper.clone()
    }

    /// The swapper, if a swap request armed it.
    pub fn swapper(&self) -> Option<Arc<Swapper>> {
        self.swapper
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether a swap-out or swap-in is running.
    pub fn busy(&self) -> bool {
        lock(&self.worker)
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    fn arm(&self) -> Result<Arc<Swapper>, ActionError> {
        if let Some(s) = self.swapper() {
            return Ok(s);
        }
        if on_tmpfs(&self.dir) {
            tracing::warn!(
                "swap directory {} is on tmpfs: swapped pages stay in host RAM",
                self.dir.display()
            );
        }
        let shared = self.shared.clone();
        let options = SwapOptions {
            on_failure: Some(Arc::new(move |f: &SwapFailure| {
                tracing::error!("swap failed, stopping the VM: {}", f.reason);
                shared.request_exit(VmExit::Error(format!("swap failed: {}", f.reason)));
            })),
            ..SwapOptions::default()
        };
        let swapper = match lock(&self.backing).take() {
            Some(backing) => Swapper::with_backing(&self.ram, backing, options),
            None => Swapper::new(&self.ram, &self.dir, options),
        }
        .map_err(|e| ActionError::Internal(format!("cannot start swap: {}", chain(&e))))?;
        // Page ages come from the dirty log; without it the swapper still works, oldest-first
        // degenerates to address order.
        if let Err(e) = map_ram(&self.vm_fd, &self.ram, true) {
            tracing::warn!("no KVM dirty log for page ages: {e}");
        }
        tracing::info!("swap armed, file in {}", self.dir.display());
        let swapper = Arc::new(swapper);
        *self
            .swapper
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(swapper.clone());
        Ok(swapper)
    }

    /// Starts moving the VM toward `target_mib` in swap. Refused while a request still runs.
    pub fn request(&self, target_mib: u64) -> Result<(), ActionError> {
        let boot_mib = self.ram.size_bytes() >> 20;
        if target_mib > boot_mib {
            return Err(ActionError::BadRequest(format!(
                "swap target {target_mib} MiB is larger than the VM's {boot_mib} MiB"
            )));
        }
        let mut worker = lock(&self.worker);
        if worker.as_ref().is_some_and(|h| !h.is_finished()) {
            return Err(ActionError::Conflict(
                "a swap request is still running".into(),
            ));
        }
        if target_mib == 0 && self.swapper().is_none() {
            *lock(&self.target_mib) = 0;
            return Ok(());
        }
        let swapper = self.arm()?;
        let last = self.last.clone();
        let handle = std::thread::Builder::new()
            .name("swap-out".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    swapper.swap_out(target_mib << 20)
                }))
                .unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(memory::swap::SwapError::Failed(format!(
                        "the swap worker panicked: {what}"
                    )))
                });
                let run = match outcome {
                    Ok(report) => {
                        tracing::info!(
                            "swap: {} pages swapped ({} written, {} zero, {} raced, {} back in) \
                             in {} ms",
                            report.swapped_pages,
                            report.pages_written,
                            report.zero_pages,
                            report.raced_pages,
                            report.pages_swapped_in,
                            report.elapsed_us / 1000
                        );
                        LastRun::Done(report)
                    }
                    Err(e) => {
                        tracing::warn!("swap request failed: {}", chain(&e));
                        LastRun::Failed(chain(&e))
                    }
                };
                *lock(&last) = Some(run);
            })
            .map_err(|e| ActionError::Internal(format!("cannot start the swap worker: {e}")))?;
        *worker = Some(handle);
        *lock(&self.target_mib) = target_mib;
        Ok(())
    }

    /// The state as `GET /api/v1/vms/{id}/swap` shows it: the swapper's status plus `armed`,
    /// `busy`, `target_mib`, `swap_dir` and `last` (the last request's report or error).
    pub fn status_json(&self) -> serde_json::Value {
        // `busy` first: if the worker had finished then, the report and the state read after
        // it are final, so a client that sees `busy: false` sees the finished request's state.
        let busy = self.busy();
        let last = match lock(&self.last).clone() {
            Some(LastRun::Done(r)) => serde_json::to_value(r).unwrap_or_default(),
            Some(LastRun::Failed(e)) => serde_json::json!({ "error": e }),
            None => serde_json::Value::Null,
        };
        let swapper = self.swapper();
        let failed = lock(&self.failed).clone();
        let armed = swapper.is_some() || failed.is_some();
        let mut v = match (&swapper, failed) {
            (Some(s), _) => serde_json::to_value(s.status()).unwrap_or_default(),
            (None, Some(status)) => serde_json::to_value(status).unwrap_or_default(),
            (None, None) => serde_json::json!({
                "state": "idle",
                "swapped_pages": 0,
                "file_size_bytes": 0,
            }),
        };
        if let Some(map) = v.as_object_mut() {
            map.insert("armed".into(), armed.into());
            map.insert("busy".into(), busy.into());
            map.insert("target_mib".into(), (*lock(&self.target_mib)).into());
            map.insert(
                "swap_dir".into(),
                self.dir.to_string_lossy().into_owned().into(),
            );
            map.insert("last".into(), last);
        }
        v
    }

    /// The swapper's metrics for `GET /metrics`, once armed (none before).
    pub fn metrics(&self) -> Vec<memory::Metric> {
        self.swapper().map(|s| s.metrics()).unwrap_or_default()
    }

    /// Samples one interval of KVM's dirty log into the page ages.
    pub fn sample_ages(&self) {
        if let Some(s) = self.swapper() {
            let mut log = KvmDirtyLog::new(self.vm_fd.clone(), &self.ram);
            if let Err(e) = s.sample_ages(&mut log) {
                tracing::debug!("dirty log sample failed: {e}");
            }
        }
    }

    /// For VM teardown: cancels and waits for a running request, then, if the swapper failed,
    /// lets go of its userfaultfd so vCPUs blocked on a fault nobody serves get out.
    pub fn shutdown(&self) {
        if let Some(s) = self.swapper() {
            // A long swap-out stops after its current batch instead of holding up the stop.
            s.cancel();
            // A failed swapper serves no more faults: wake whoever waits on one (the worker
            // joined below may be one of them).
            s.release_faults();
        }
        if let Some(h) = lock(&self.worker).take() {
            let _ = h.join();
        }
        let Some(status) = self.swapper().map(|s| s.status()) else {
            return;
        };
        if status.state == memory::swap::SwapState::Failed {
            *lock(&self.failed) = Some(status);
            // Dropping the swapper closes its userfaultfd once nobody else holds it.
            self.swapper
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
        }
    }
}

/// Samples page ages on the event loop every [`AGE_INTERVAL`].
#[derive(Debug)]
pub struct AgeSampler {
    swap: Arc<VmSwap>,
    timer: TimerFd,
}

impl AgeSampler {
    /// A sampler for `swap`; its timer starts when the event loop registers it.
    pub fn new(swap: Arc<VmSwap>) -> std::io::Result<Self> {
        Ok(AgeSampler {
            swap,
            timer: TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
        })
    }
}

impl MutEventSubscriber for AgeSampler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = self.timer.reset(AGE_INTERVAL, Some(AGE_INTERVAL)) {
            tracing::error!("cannot start the page-age timer: {e}");
            return;
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::error!("cannot watch the page-age timer: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.timer.wait();
        self.swap.sample_ages();
    }
}

/// An error with its sources, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn on_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a valid C string and `st` has room for a statfs.
    let ret = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: `st` was zeroed, and statfs filled it when it returned 0; all-zero is a valid
    // statfs either way.
    let st = unsafe { st.assume_init() };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type is not i64 on every architecture"
    )]
    let f_type = st.f_type as i64;
    ret == 0 && f_type == TMPFS_MAGIC
}
