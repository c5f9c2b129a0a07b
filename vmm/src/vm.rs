//! A running VM: started on vCPU threads, driven by its event loop, stopped and torn down.
//!
//! How a VM is built from a [`VmConfig`] is [`crate::builder`]'s list of steps; how it answers
//! an [`crate::action::Action`] is in `actions` (one function per action).

use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use balloon::Balloon;
use devices::legacy::Serial;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use hotplug::VirtioMem;
use kvm_ioctls::{Kvm, VmFd};
use memory::GuestRam;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::action::{BalloonInfo, MemoryInfo, VmInfo, VmState};
use crate::arch::regs;
use crate::boot::BootError;
use crate::compat::HostCompat;
use crate::config::{ConfigError, VmConfig};
use crate::console::ConsoleState;
use crate::controller::{Request, VmHandle, WakeSubscriber};
use crate::swap::VmSwap;
use crate::vcpu::{install_kick_handler, kick_signal, Vcpu, VmExit, VmShared};

mod actions;

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `/dev/kvm` is missing or not accessible.
    #[error("cannot open /dev/kvm (is KVM available, and may this user use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks a capability memvisor needs.
    #[error("KVM lacks the {0} capability")]
    MissingCap(&'static str),
    /// More vCPUs than KVM allows.
    #[error("{got} vCPUs requested, KVM allows at most {max}")]
    TooManyCpus {
        /// Requested.
        got: u8,
        /// KVM's limit.
        max: usize,
    },
    /// A KVM VM-level call failed.
    #[error("KVM refused to {what}")]
    Kvm {
        /// What was attempted.
        what: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be set up.
    #[error(transparent)]
    Ram(#[from] memory::RamError),
    /// Loading or configuring the guest failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU's registers could not be set.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A host resource (eventfd, thread, signal) could not be created.
    #[error("cannot create {what}")]
    Host {
        /// What was attempted.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM was already started.
    #[error("the VM was already started")]
    AlreadyStarted,
    /// A device could not be created or wired.
    #[error("cannot set up the {device} device")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why.
        #[source]
        source: DeviceError,
    },
    /// The event loop failed.
    #[error("the VM's event loop failed")]
    EventLoop(#[source] event_manager::Error),
    /// The vCPUs did not park in time.
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
}

pub(crate) fn host_err<E: Into<std::io::Error>>(what: &'static str) -> impl FnOnce(E) -> VmError {
    move |e| VmError::Host {
        what,
        source: e.into(),
    }
}

/// Why a device could not be created or wired into the VM.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Every IOAPIC pin for virtio-mmio devices is taken.
    #[error("no free interrupt line")]
    NoInterruptLine,
    /// The virtio-mmio transport could not be created.
    #[error(transparent)]
    Transport(#[from] devices::virtio::MmioError),
    /// KVM refused the device's interrupt eventfd.
    #[error("cannot wire the interrupt (irqfd)")]
    Irqfd(#[source] kvm_ioctls::Error),
    /// KVM refused a queue-notification eventfd.
    #[error("cannot wire a queue notification (ioeventfd)")]
    Ioeventfd(#[source] kvm_ioctls::Error),
    /// The device's window on the MMIO bus is taken.
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    /// The virtio-mem device refused its configuration.
    #[error(transparent)]
    VirtioMem(#[from] hotplug::VirtioMemError),
    /// The balloon device refused its configuration.
    #[error(transparent)]
    Balloon(#[from] balloon::BalloonError),
    /// The hotplug region ends beyond what the guest's CPU can address.
    #[error(
        "the hotplug region would end at {end:#x}, beyond the guest's {bits}-bit physical \
         address space"
    )]
    BeyondAddressWidth {
        /// One past the region's last byte.
        end: u64,
        /// The guest's physical address width.
        bits: u32,
    },
    /// The hotplug region cannot go where it was asked to, or anywhere.
    #[error(transparent)]
    Placement(#[from] crate::arch::layout::PlacementError),
    /// The hotplug region's memory could not be mapped.
    #[error("cannot map the hotplug region")]
    RegionMemory(#[source] memory::RamError),
    /// The hotplug region's memory could not be joined to what devices see.
    #[error("cannot give devices the hotplug region's memory")]
    JoinRegion(#[source] memory::RamError),
}

/// How long a stopping VM waits for its buffered console output to be written.
const CONSOLE_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// What the event loop's subscribers are.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Devices attached to the VM, as the VMM needs to reach them.
#[derive(Default)]
pub(crate) struct Devices {
    pub(crate) balloon: Option<Arc<Mutex<Balloon>>>,
    pub(crate) mem: Option<Arc<Mutex<VirtioMem>>>,
}

impl Devices {
    /// The balloon's metrics, if there is a balloon.
    pub(crate) fn balloon_metrics(&self) -> Option<Vec<memory::Metric>> {
        Some(self.balloon.as_ref()?.lock().ok()?.metrics().list())
    }

    /// The virtio-mem device's metrics, if there is one.
    pub(crate) fn mem_metrics(&self) -> Option<Vec<memory::Metric>> {
        Some(self.mem.as_ref()?.lock().ok()?.metrics().list())
    }

    /// The virtio-mem region's memory, if there is a virtio-mem device.
    pub(crate) fn hotplug_ram(&self) -> Option<GuestRam> {
        Some(self.mem.as_ref()?.lock().ok()?.ram().clone())
    }
}

/// The VM's I/O with its owner.
pub struct VmIo {
    /// Where the guest console's output goes.
    pub console_out: Box<dyn Write + Send>,
}

impl std::fmt::Debug for VmIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmIo").finish_non_exhaustive()
    }
}

/// A handle that feeds host input to the guest's serial console.
#[derive(Clone, Debug)]
pub struct ConsoleInput(Arc<Mutex<Serial>>);

impl ConsoleInput {
    /// Queues `bytes` for the guest, waiting while the UART's FIFO is full. Returns false if
    /// the UART refused input.
    pub fn send(&self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let n = match self.0.lock() {
                Ok(mut s) => match s.enqueue_input(bytes) {
                    Ok(n) => n,
                    Err(_) => return false,
                },
                Err(_) => return false,
            };
            bytes = &bytes[n..];
            if n == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        true
    }
}

/// A running VM: its vCPU threads, event loop, devices and memory, from start to teardown.
/// [`crate::builder`] makes it ([`Vm::new`], [`Vm::with_compat`]).
pub struct Vm {
    pub(crate) config: VmConfig,
    pub(crate) compat: Arc<HostCompat>,
    pub(crate) _kvm: Kvm,
    pub(crate) vm_fd: Arc<VmFd>,
    pub(crate) ram: GuestRam,
    pub(crate) shared: Arc<VmShared>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) console: Arc<ConsoleState>,
    pub(crate) pending_vcpus: Vec<Vcpu>,
    pub(crate) threads: Vec<JoinHandle<()>>,
    pub(crate) created: Instant,
    pub(crate) events: EventManager<Subscriber>,
    pub(crate) devices: Devices,
    pub(crate) exit: Option<VmExit>,
    pub(crate) id: String,
    pub(crate) requests: Option<mpsc::Receiver<Request>>,
    pub(crate) sharing: crate::sharing::SharingWorker,
    pub(crate) _ksm_guard: Option<memory::ksm::KsmUser>,
    pub(crate) swap: Arc<VmSwap>,
    pub(crate) age_sampler: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// The VM's name in the API (`vm0` unless set).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Names the VM.
    pub fn set_id(&mut self, id: impl Into<String>) {
        self.id = id.into();
    }

    /// A handle through which other threads (the API server) send [`Action`]s to this VM's
    /// event loop. Call before [`Vm::wait`]; each call replaces the previous channel.
    pub fn handle(&mut self) -> Result<VmHandle, VmError> {
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("the action eventfd"))?;
        let loop_side = wake.try_clone().map_err(host_err("the action eventfd"))?;
        self.events
            .add_subscriber(Arc::new(Mutex::new(WakeSubscriber(loop_side))));
        let (tx, rx) = mpsc::channel();
        self.requests = Some(rx);
        Ok(VmHandle::new(self.id.clone(), tx, wake))
    }

    fn drain_requests(&mut self) {
        let Some(rx) = self.requests.take() else {
            return;
        };
        while let Ok(request) = rx.try_recv() {
            // Sampling sleeps to keep to its page budget: the `sharing` thread answers it.
            if request.action == crate::action::Action::GetSharing
                && self.state() != VmState::Stopped
            {
                self.sharing.submit(self.ram.clone(), request);
                continue;
            }
            // A request whose asker stopped waiting is answered with an error, not carried out.
            request.answer(|action| self.handle_action(action));
        }
        self.requests = Some(rx);
    }

    fn state(&self) -> VmState {
        if self.exit.is_some() || self.shared.stop.load(std::sync::atomic::Ordering::SeqCst) {
            VmState::Stopped
        } else if !self.started() {
            VmState::Created
        } else if self.paused() {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// The VM as the API shows it.
    pub fn info(&self) -> VmInfo {
        let boot_mib = self.config.memory.mib();
        let ballooned_mib = self.balloon_info().map_or(0, |b| b.actual_mib);
        let plugged_mib = self.memory_status().map_or(0, |m| m.plugged_mib);
        VmInfo {
            id: self.id.clone(),
            config: self.config.clone(),
            state: self.state(),
            memory: MemoryInfo {
                boot_mib,
                guest_visible_mib: (boot_mib + plugged_mib).saturating_sub(ballooned_mib),
                host_resident_mib: self.resident_bytes() >> 20,
                ballooned_mib,
                plugged_mib,
                swapped_mib: self
                    .swap
                    .swapper()
                    .map_or(0, |s| (s.status().swapped_pages * memory::PAGE_SIZE) >> 20),
            },
        }
    }

    /// Host memory resident for the guest: RAM and the hotplug region.
    fn resident_bytes(&self) -> u64 {
        let region = self.devices.hotplug_ram();
        let hp = region.map_or(0, |r| r.resident_bytes().unwrap_or(0));
        self.ram.resident_bytes().unwrap_or(0) + hp
    }

    fn memory_status(&self) -> Option<hotplug::VirtioMemStatus> {
        Some(self.devices.mem.as_ref()?.lock().ok()?.status())
    }

    /// The virtio-mem device, if the VM has one.
    pub fn virtio_mem(&self) -> Option<&Arc<Mutex<VirtioMem>>> {
        self.devices.mem.as_ref()
    }

    /// The VM's swap (armed at the first swap request).
    pub fn swap(&self) -> &Arc<VmSwap> {
        &self.swap
    }

    fn balloon_info(&self) -> Option<BalloonInfo> {
        let balloon = self.devices.balloon.as_ref()?.lock().ok()?;
        Some(BalloonInfo {
            target_mib: balloon.target_mib(),
            actual_mib: balloon.actual_mib(),
        })
    }

    /// Prometheus text of this VM's and the VMM's metrics, each rendered as its owner
    /// reports it.
    pub fn metrics_text(&self) -> String {
        let mut text = crate::metrics::PromText::new();
        text.vmm_resident();
        text.guest_ram_resident(&self.id, self.resident_bytes());
        text.exit_counters(&self.id, &self.shared.exits);
        let vm = [("vm", self.id.as_str())];
        text.counter(
            "memvisor_console_dropped_bytes_total",
            "Guest console bytes dropped because the console's reader did not keep up.",
            &vm,
            self.console.dropped_bytes(),
        );
        if let Some(stats) = &self.sharing.last() {
            // From the latest `GET /vms/{id}/sharing` sample (sampling has a cost, so a scrape
            // does not trigger one).
            text.metrics("memvisor_sharing_", &vm, &stats.metrics());
        }
        if let Ok(c) = memory::ksm::Ksm::open().and_then(|k| k.counters()) {
            text.metrics("memvisor_host_ksm_", &[], &c.metrics());
        }
        let device = |name| [("vm", self.id.as_str()), ("device", name)];
        if let Some(metrics) = self.devices.balloon_metrics() {
            text.metrics("memvisor_device_", &device("balloon0"), &metrics);
        }
        if let Some(metrics) = self.devices.mem_metrics() {
            text.metrics("memvisor_device_", &device("mem0"), &metrics);
        }
        text.metrics("memvisor_device_", &device("swap"), &self.swap.metrics());
        text.finish()
    }

    /// Samples page sharing with `sampler` from now on (e.g. another page budget).
    pub fn set_sharing_sampler(
        &mut self,
        sampler: memory::sharing::SharingSampler,
    ) -> Result<(), VmError> {
        self.sharing = crate::sharing::SharingWorker::spawn(sampler)
            .map_err(host_err("the sharing sampler thread"))?;
        Ok(())
    }

    /// The balloon device, if the VM has one.
    pub fn balloon(&self) -> Option<&Arc<Mutex<Balloon>>> {
        self.devices.balloon.as_ref()
    }

    /// Whether the vCPUs have been started.
    pub fn started(&self) -> bool {
        self.pending_vcpus.is_empty()
    }

    /// Whether the VM has stopped.
    pub fn exited(&self) -> Option<&VmExit> {
        self.exit.as_ref()
    }

    /// Whether the vCPUs are paused.
    pub fn paused(&self) -> bool {
        self.shared.pause_requested()
    }

    /// Parks every vCPU outside the guest; returns once all are parked.
    pub fn pause(&mut self) -> Result<(), VmError> {
        const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
        self.shared.request_pause();
        let running: Vec<&JoinHandle<()>> =
            self.threads.iter().filter(|h| !h.is_finished()).collect();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        loop {
            for h in &running {
                let _ = h.kill(kick_signal());
            }
            if self
                .shared
                .wait_parked(running.len(), Duration::from_millis(5))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.shared.resume();
                return Err(VmError::PauseTimeout(PAUSE_TIMEOUT));
            }
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&mut self) {
        self.shared.resume();
    }

    /// Runs the event loop once, for up to `timeout` (`None`: until something happens).
    /// Returns the VM's exit once it has stopped.
    pub fn run_events(&mut self, timeout: Option<Duration>) -> Result<Option<VmExit>, VmError> {
        if self.exit.is_some() {
            return Ok(self.exit.clone());
        }
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        self.events
            .run_with_timeout(ms)
            .map_err(VmError::EventLoop)?;
        self.drain_requests();
        if self.shared.stop.load(std::sync::atomic::Ordering::SeqCst) {
            let reason = self
                .shared
                .exit_reason
                .lock()
                .ok()
                .and_then(|mut r| r.take())
                .unwrap_or(VmExit::Reset);
            self.stop_vcpus();
            self.exit = Some(reason);
        }
        Ok(self.exit.clone())
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The host compatibility decision in force.
    pub fn compat(&self) -> &HostCompat {
        &self.compat
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// What the console has seen (milestone, last lines).
    pub fn console(&self) -> &Arc<ConsoleState> {
        &self.console
    }

    /// A handle to feed input to the guest console.
    pub fn console_input(&self) -> ConsoleInput {
        ConsoleInput(self.serial.clone())
    }

    /// Shared exit state and exit counters.
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// When the VM object was created.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.pending_vcpus.is_empty() {
            return Err(VmError::AlreadyStarted);
        }
        install_kick_handler().map_err(|e| VmError::Host {
            what: "the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        for vcpu in self.pending_vcpus.drain(..) {
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .spawn(move || vcpu.run_loop())
                .map_err(host_err("a vCPU thread"))?;
            self.threads.push(handle);
        }
        Ok(())
    }

    /// Runs the event loop until the VM stops, and tears the vCPUs down.
    pub fn wait(&mut self) -> VmExit {
        loop {
            match self.run_events(None) {
                Ok(Some(exit)) => return exit,
                Ok(None) => {}
                Err(e) => return self.fail(e),
            }
        }
    }

    /// Runs the event loop for up to `timeout`; `None` if the VM is still running then.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<VmExit> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.run_events(Some(left)) {
                Ok(Some(exit)) => return Some(exit),
                Ok(None) if left.is_zero() => return None,
                Ok(None) => {}
                Err(e) => return Some(self.fail(e)),
            }
        }
    }

    /// Stops the VM because its event loop failed. The loop may fail again on every call, so
    /// this must not go back to it.
    fn fail(&mut self, e: VmError) -> VmExit {
        let exit = VmExit::Error(crate::swap::chain(&e));
        self.shared.request_exit_quiet(exit.clone());
        self.stop_vcpus();
        self.exit = Some(exit.clone());
        exit
    }

    /// Asks the VM to stop (as a shutdown request would) and tears the vCPUs down.
    pub fn stop(&mut self) -> VmExit {
        self.shared.request_exit(VmExit::Stopped);
        self.wait()
    }

    /// Starts the VM and waits for it to stop.
    pub fn run(mut self) -> Result<VmExit, VmError> {
        self.start()?;
        Ok(self.wait())
    }

    fn stop_vcpus(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // A vCPU blocked on a page fault of a failed swapper only gets out once it lets go.
        self.swap.shutdown();
        for handle in self.threads.drain(..) {
            // A kick can land just before the thread enters KVM_RUN; repeat until it leaves.
            while !handle.is_finished() {
                let _ = handle.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = handle.join();
        }
        // What the guest printed last reaches the user, unless the user's writer is stuck.
        self.console.drain(CONSOLE_DRAIN_TIMEOUT);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shared
            .stop
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop_vcpus();
    }
}
