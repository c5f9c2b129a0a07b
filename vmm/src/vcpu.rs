//! vCPU threads: the `KVM_RUN` loop and the dispatch of exits to the buses.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Duration;

use devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::compat::{emulation_failure_bytes, HostCompat};

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted (i8042 reset, triple fault, or a KVM reset event).
    Reset,
    /// The guest powered off or halted for good.
    Shutdown,
    /// The VMM stopped the VM (shutdown request or teardown).
    Stopped,
    /// A vCPU hit an error the VMM cannot handle.
    Error(String),
}

/// VM exits by reason, counted by every vCPU.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// Port reads.
    pub io_in: AtomicU64,
    /// Port writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// Accesses to ports or MMIO addresses where no device sits.
    pub unhandled_access: AtomicU64,
    /// Emulation failures handled by the compatibility module.
    pub compat_int3: AtomicU64,
    /// Signals that interrupted `KVM_RUN`.
    pub interrupted: AtomicU64,
}

/// State shared between the VM's owner and its vCPU threads.
#[derive(Debug)]
pub struct VmShared {
    /// Written once when the VM must stop; the owner waits on it.
    pub exit_evt: EventFd,
    /// The first reason to stop wins.
    pub exit_reason: Mutex<Option<VmExit>>,
    /// Set when vCPUs must leave their loops.
    pub stop: AtomicBool,
    /// VM exits by reason.
    pub exits: ExitCounters,
    pause: Mutex<PauseState>,
    pause_cv: Condvar,
}

#[derive(Debug, Default)]
struct PauseState {
    requested: bool,
    parked: usize,
}

impl VmShared {
    /// Fresh shared state.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmShared {
            exit_evt: EventFd::new(0)?,
            exit_reason: Mutex::new(None),
            stop: AtomicBool::new(false),
            exits: ExitCounters::default(),
            pause: Mutex::new(PauseState::default()),
            pause_cv: Condvar::new(),
        })
    }

    fn lock_pause(&self) -> std::sync::MutexGuard<'_, PauseState> {
        // The pause state is two plain fields: a panicked holder cannot leave it inconsistent.
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks vCPUs to park before their next `KVM_RUN`. The caller kicks them out of the guest
    /// and waits with [`VmShared::wait_parked`].
    pub fn request_pause(&self) {
        self.lock_pause().requested = true;
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock_pause().requested = false;
        self.pause_cv.notify_all();
    }

    /// Waits up to `timeout` until `count` vCPUs are parked; true if they are.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let guard = self.lock_pause();
        let (guard, _) = self
            .pause_cv
            .wait_timeout_while(guard, timeout, |st| st.parked < count)
            .unwrap_or_else(|e| e.into_inner());
        guard.parked >= count
    }

    /// Whether a pause is requested.
    pub fn pause_requested(&self) -> bool {
        self.lock_pause().requested
    }

    /// Called by a vCPU thread between runs: parks while a pause is requested.
    fn park_if_paused(&self) {
        let mut st = self.lock_pause();
        if !st.requested {
            return;
        }
        st.parked += 1;
        self.pause_cv.notify_all();
        while st.requested && !self.stop.load(Ordering::SeqCst) {
            st = self.pause_cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
        self.pause_cv.notify_all();
    }

    /// Wakes parked vCPUs so they see the stop flag.
    pub fn wake_parked(&self) {
        let _guard = self.lock_pause();
        self.pause_cv.notify_all();
    }

    /// Records why the VM stops (unless a reason is already recorded) and wakes the owner.
    pub fn request_exit(&self, reason: VmExit) {
        if let Ok(mut r) = self.exit_reason.lock() {
            r.get_or_insert(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.wake_parked();
        if let Err(e) = self.exit_evt.write(1) {
            tracing::error!("cannot signal the VM exit: {e}");
        }
    }

    /// Like [`VmShared::request_exit`] without waking the event loop (it is the one asking).
    pub fn request_exit_quiet(&self, reason: VmExit) {
        if let Ok(mut r) = self.exit_reason.lock() {
            r.get_or_insert(reason);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.wake_parked();
    }
}

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for [`kick_signal`] once per process, so that the signal only
/// interrupts `KVM_RUN` with `EINTR`.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler);
    });
    result
}

/// One vCPU and what it needs to run.
pub struct Vcpu {
    /// Index (and APIC ID).
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port-I/O bus.
    pub io_bus: Arc<Bus>,
    /// MMIO bus.
    pub mmio_bus: Arc<Bus>,
    /// Host compatibility steps.
    pub compat: Arc<HostCompat>,
    /// Shared stop/exit state.
    pub shared: Arc<VmShared>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// What the loop does after one exit.
enum Next {
    Continue,
    Exit(VmExit),
}

impl Vcpu {
    /// Runs the guest until the VM stops.
    pub fn run_loop(mut self) {
        tracing::info!("vcpu{}: entering the guest", self.index);
        while !self.shared.stop.load(Ordering::SeqCst) {
            self.shared.park_if_paused();
            if self.shared.stop.load(Ordering::SeqCst) {
                break;
            }
            match self.run_once() {
                Next::Continue => {}
                Next::Exit(reason) => {
                    self.shared.request_exit(reason);
                    break;
                }
            }
        }
    }

    fn run_once(&mut self) -> Next {
        let exits = &self.shared.exits;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                exits.interrupted.fetch_add(1, Ordering::Relaxed);
                return Next::Continue;
            }
            Err(e) => {
                return Next::Exit(VmExit::Error(format!(
                    "vcpu{}: KVM_RUN failed: {e}",
                    self.index
                )))
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                exits.io_in.fetch_add(1, Ordering::Relaxed);
                if !self.io_bus.read(u64::from(port), data) {
                    exits.unhandled_access.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => {
                exits.io_out.fetch_add(1, Ordering::Relaxed);
                if !self.io_bus.write(u64::from(port), data) {
                    exits.unhandled_access.fetch_add(1, Ordering::Relaxed);
                }
                Next::Continue
            }
            VcpuExit::MmioRead(addr, data) => {
                exits.mmio_read.fetch_add(1, Ordering::Relaxed);
                if !self.mmio_bus.read(addr, data) {
                    exits.unhandled_access.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                exits.mmio_write.fetch_add(1, Ordering::Relaxed);
                if !self.mmio_bus.write(addr, data) {
                    exits.unhandled_access.fetch_add(1, Ordering::Relaxed);
                }
                Next::Continue
            }
            VcpuExit::Hlt => Next::Exit(VmExit::Shutdown),
            VcpuExit::Shutdown => Next::Exit(VmExit::Reset),
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Exit(VmExit::Shutdown),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Exit(VmExit::Reset),
                other => Next::Exit(VmExit::Error(format!(
                    "vcpu{}: guest system event {other} (crash)",
                    self.index
                ))),
            },
            VcpuExit::InternalError => self.internal_error(),
            VcpuExit::FailEntry(reason, cpu) => Next::Exit(VmExit::Error(format!(
                "vcpu{}: KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                self.index
            ))),
            other => Next::Exit(VmExit::Error(format!(
                "vcpu{}: unexpected VM exit {other:?}",
                self.index
            ))),
        }
    }

    fn internal_error(&mut self) -> Next {
        match self.compat.handle_internal_error(&mut self.fd) {
            Ok(true) => {
                self.shared
                    .exits
                    .compat_int3
                    .fetch_add(1, Ordering::Relaxed);
                return Next::Continue;
            }
            Ok(false) => {}
            Err(e) => {
                return Next::Exit(VmExit::Error(format!(
                    "vcpu{}: cannot resume after an emulation failure: {e}",
                    self.index
                )))
            }
        }
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live member.
        let (suberror, ndata, data) = unsafe {
            let internal = &self.fd.get_kvm_run().__bindgen_anon_1.internal;
            (internal.suberror, internal.ndata, internal.data)
        };
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or_default();
        Next::Exit(VmExit::Error(format!(
            "vcpu{}: KVM internal error {suberror} at rip {rip:#x} (instruction bytes: {})",
            self.index,
            emulation_failure_bytes(ndata, &data)
        )))
    }
}
