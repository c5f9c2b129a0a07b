//! A VM: built from a [`VmConfig`], run on vCPU threads, stopped and torn down.

use std::io::Write;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use balloon::Balloon;
use devices::legacy::{Serial, COM1_BASE, COM1_IRQ, I8042};
use devices::virtio::mmio::{MMIO_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{mmio_cmdline_fragment, MmioTransport, VirtioDevice};
use devices::{Bus, EventFdTrigger};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use hotplug::VirtioMem;
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use memory::GuestRam;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::action::{
    Action, ActionError, ActionReply, BalloonInfo, BalloonStatsInfo, MemoryInfo, RunState, VmInfo,
    VmList, VmState,
};
use crate::arch::{cpuid, layout, regs};
use crate::boot::{self, BootError};
use crate::compat::HostCompat;
use crate::config::{host_memory_bytes, ConfigError, VmConfig};
use crate::console::{ConsoleState, ConsoleTap};
use crate::controller::{Reply, Request, VmHandle, WakeSubscriber};
use crate::memslots::{map_ram, GuestDiscard, KvmMemslots};
use crate::swap::{AgeSampler, VmSwap};
use crate::vcpu::{install_kick_handler, kick_signal, Vcpu, VmExit, VmShared};

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
    #[error("cannot set up the {device} device: {reason}")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why (one line).
        reason: String,
    },
    /// The event loop failed.
    #[error("the VM's event loop failed: {0}")]
    EventLoop(String),
    /// The vCPUs did not park in time.
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
}

/// First legacy IRQ handed to virtio-mmio devices (IRQ 4 is COM1).
const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin usable by a virtio-mmio device.
const VIRTIO_IRQ_LAST: u32 = crate::arch::mptable::IOAPIC_PINS as u32 - 1;

/// What the event loop's subscribers are.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Reads the VM's exit eventfd on the event loop, so that a guest reset through the i8042
/// (which writes the eventfd without recording a reason) stops the VM too.
struct ExitWatcher(Arc<VmShared>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.exit_evt, EventSet::IN)) {
            tracing::error!("cannot watch the VM exit eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.exit_evt.read();
        // Without a recorded reason, the i8042 asked for a reset.
        self.0.request_exit_quiet(VmExit::Reset);
    }
}

/// Devices attached to the VM, as the VMM needs to reach them.
#[derive(Default)]
struct Devices {
    balloon: Option<Arc<Mutex<Balloon>>>,
    mem: Option<Arc<Mutex<VirtioMem>>>,
}

/// Hands out virtio-mmio windows and IRQs and wires each transport to KVM.
struct VirtioSlots {
    next_base: u64,
    next_irq: u32,
    cmdline: Vec<String>,
}

impl VirtioSlots {
    fn new() -> Self {
        VirtioSlots {
            next_base: layout::VIRTIO_MMIO_START,
            next_irq: VIRTIO_IRQ_BASE,
            cmdline: Vec::new(),
        }
    }

    fn attach(
        &mut self,
        name: &'static str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        vm_fd: &VmFd,
        mem: &vm_memory::GuestMemoryMmap,
        mmio_bus: &mut Bus,
    ) -> Result<(), VmError> {
        let fail = |reason: String| VmError::Device {
            device: name,
            reason,
        };
        if self.next_irq > VIRTIO_IRQ_LAST {
            return Err(fail("no free interrupt line".into()));
        }
        let (base, irq) = (self.next_base, self.next_irq);
        let transport = MmioTransport::new(mem.clone(), device).map_err(|e| fail(e.to_string()))?;
        vm_fd
            .register_irqfd(transport.interrupt_evt(), irq)
            .map_err(|e| fail(format!("irqfd: {e}")))?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            vm_fd
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    i as u32,
                )
                .map_err(|e| fail(format!("ioeventfd: {e}")))?;
        }
        mmio_bus
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_SIZE)
            .map_err(|e| fail(e.to_string()))?;
        self.cmdline
            .push(mmio_cmdline_fragment(base, MMIO_SIZE, irq));
        tracing::debug!("{name}: virtio-mmio at {base:#x}, irq {irq}");
        self.next_base += MMIO_SIZE;
        self.next_irq += 1;
        Ok(())
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn host_err<E: Into<std::io::Error>>(what: &'static str) -> impl FnOnce(E) -> VmError {
    move |e| VmError::Host {
        what,
        source: e.into(),
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

/// A VM, from creation to teardown.
pub struct Vm {
    config: VmConfig,
    compat: Arc<HostCompat>,
    _kvm: Kvm,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    shared: Arc<VmShared>,
    serial: Arc<Mutex<Serial>>,
    console: Arc<ConsoleState>,
    pending_vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    created: Instant,
    events: EventManager<Subscriber>,
    devices: Devices,
    exit: Option<VmExit>,
    id: String,
    requests: Option<mpsc::Receiver<Request>>,
    sharing: memory::sharing::SharingSampler,
    last_sharing: Option<memory::sharing::SharingStats>,
    _ksm_guard: Option<memory::ksm::KsmGuard>,
    swap: Arc<VmSwap>,
    age_sampler: bool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Builds a VM ready to start: KVM VM, guest RAM, kernel loaded, devices, vCPUs.
    pub fn new(config: &VmConfig, io: VmIo) -> Result<Self, VmError> {
        Self::with_compat(config, io, HostCompat::detect())
    }

    /// Like [`Vm::new`] with an explicit host compatibility decision.
    pub fn with_compat(config: &VmConfig, io: VmIo, compat: HostCompat) -> Result<Self, VmError> {
        let created = Instant::now();
        config.validate(host_memory_bytes())?;
        compat.log();
        let compat = Arc::new(compat);

        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "IRQCHIP"),
            (Cap::Irqfd, "IRQFD"),
            (Cap::Ioeventfd, "IOEVENTFD"),
            (Cap::UserMemory, "USER_MEMORY"),
            (Cap::Pit2, "PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if usize::from(config.cpus) > max {
            return Err(VmError::TooManyCpus {
                got: config.cpus,
                max,
            });
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
        vm_fd
            .set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(kvm_err("set the TSS address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create the interrupt controllers"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;

        let phase =
            |what: &str| tracing::debug!("{what} after {} µs", created.elapsed().as_micros());
        phase("KVM VM created");
        let mem_bytes = config.memory.bytes();
        let ram = GuestRam::new(&layout::ram_ranges(mem_bytes))?;
        let mut ksm_guard = None;
        if config.mergeable {
            ram.set_mergeable(true)?;
            // KSM scans only while `run` is 1; turn it on at memvisor's rate if it is off, and
            // put the host's settings back when the VM goes.
            match memory::ksm::Ksm::open() {
                Ok(ksm) => match ksm.settings() {
                    Ok(s) if s.run != memory::ksm::KsmRun::Running => {
                        match ksm.enable_scoped(
                            memory::ksm::DEFAULT_PAGES_TO_SCAN,
                            memory::ksm::DEFAULT_SLEEP_MS,
                        ) {
                            Ok(guard) => ksm_guard = Some(guard),
                            Err(e) => tracing::warn!("cannot turn host KSM on: {e}"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("cannot read host KSM settings: {e}"),
                },
                Err(e) => tracing::warn!("host KSM is unavailable, pages will not be merged: {e}"),
            }
        } else if config.thp {
            // Not fatal: a host without THP still runs the VM, with 4K pages.
            if let Err(e) = ram.set_hugepages(true) {
                tracing::warn!("guest RAM stays on 4K pages: {e}");
            }
        }
        map_ram(&vm_fd, &ram, false).map_err(kvm_err("add guest RAM"))?;

        phase("guest RAM mapped");
        let mem = ram.memory();
        let kernel = boot::load_kernel(mem, &config.kernel)?;
        phase("kernel loaded");
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(mem, path, &kernel, mem_bytes)?),
            None => None,
        };
        phase("initrd loaded");
        let shared = Arc::new(VmShared::new().map_err(host_err("the exit eventfd"))?);
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(|e| VmError::EventLoop(e.to_string()))?;
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher(shared.clone()))));

        let swap = Arc::new(VmSwap::new(
            config.swap_dir.as_deref(),
            ram.clone(),
            vm_fd.clone(),
            shared.clone(),
        ));

        let mut mmio_bus = Bus::new();
        let mut slots = VirtioSlots::new();
        let mut devices = Devices::default();
        // What devices see: guest RAM, plus the hotplug region (the guest may hand a device
        // buffers in plugged memory, e.g. balloon pages).
        let mut device_mem = mem.clone();
        let mut hotplug_ram = None;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report CPUID"))?;
        if let Some(hp_config) = config.hotplug {
            let dev_err = |reason: String| VmError::Device {
                device: "virtio-mem",
                reason,
            };
            let ram_layout: Vec<(u64, u64)> =
                ram.ranges().iter().map(|r| (r.start.0, r.size)).collect();
            let placed = hp_config
                .placed(&ram_layout)
                .map_err(|e| dev_err(e.to_string()))?;
            // The guest can only use memory its CPU can address.
            let bits = cpuid::phys_addr_bits(supported.as_slice());
            let end = placed
                .region_addr
                .unwrap_or(0)
                .saturating_add(placed.region_size.bytes());
            if bits < 64 && end > 1u64 << bits {
                return Err(dev_err(format!(
                    "the hotplug region would end at {end:#x}, beyond the guest's \
                     {bits}-bit physical address space"
                )));
            }
            let memslots = KvmMemslots::new(vm_fd.clone(), ram.ranges().len() as u32);
            let device =
                VirtioMem::new(placed, Box::new(memslots)).map_err(|e| dev_err(e.to_string()))?;
            let region_ram = device.ram().clone();
            for r in region_ram.ranges() {
                let (_, region) = region_ram
                    .memory()
                    .remove_region(r.start, r.size)
                    .map_err(|e| dev_err(e.to_string()))?;
                device_mem = device_mem
                    .insert_region(region)
                    .map_err(|e| dev_err(e.to_string()))?;
            }
            tracing::info!(
                "virtio-mem: {} MiB hotplug region at {:#x}, blocks of {} KiB",
                placed.region_size.bytes() >> 20,
                region_ram.ranges().first().map_or(0, |r| r.start.0),
                placed.block_size.bytes() >> 10
            );
            let device = Arc::new(Mutex::new(device));
            slots.attach(
                "virtio-mem",
                device.clone(),
                &vm_fd,
                &device_mem,
                &mut mmio_bus,
            )?;
            events.add_subscriber(device.clone());
            devices.mem = Some(device);
            hotplug_ram = Some(region_ram);
        }
        if let Some(balloon_config) = config.balloon {
            let discard = GuestDiscard::new(ram.clone(), swap.swapper_cell(), hotplug_ram.clone());
            let balloon =
                Balloon::new(balloon_config, Arc::new(discard)).map_err(|e| VmError::Device {
                    device: "balloon",
                    reason: e.to_string(),
                })?;
            let balloon = Arc::new(Mutex::new(balloon));
            slots.attach(
                "balloon",
                balloon.clone(),
                &vm_fd,
                &device_mem,
                &mut mmio_bus,
            )?;
            events.add_subscriber(balloon.clone());
            devices.balloon = Some(balloon);
        }
        phase("devices created");

        let mut additions: Vec<&str> = compat.cmdline_additions().into_iter().collect();
        additions.extend(slots.cmdline.iter().map(String::as_str));
        // Plugged virtio-mem memory must be onlined as movable, or the guest can never unplug
        // it again; the user's own choice wins.
        if config.hotplug.is_some() && !config.base_cmdline().contains("memhp_default_state=") {
            additions.push("memhp_default_state=online_movable");
        }
        let cmdline = boot::build_cmdline(config.base_cmdline(), &additions)?;
        let cr3 = boot::configure_system(mem, &cmdline, &kernel, initrd, mem_bytes, config.cpus)?;
        tracing::debug!(
            "kernel entry {:#x}, command line: {:?}",
            kernel.entry,
            cmdline.as_cstring()
        );

        let (tap, console) = ConsoleTap::new(io.console_out, compat.boot_milestone(), created);
        let serial_irq =
            EventFdTrigger::new_nonblocking().map_err(host_err("the serial eventfd"))?;
        vm_fd
            .register_irqfd(serial_irq.eventfd(), COM1_IRQ)
            .map_err(kvm_err("wire the serial interrupt"))?;
        let serial = Arc::new(Mutex::new(Serial::new(serial_irq, Box::new(tap))));
        let reset_evt = shared
            .exit_evt
            .try_clone()
            .map_err(host_err("the reset eventfd"))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(reset_evt)));

        let mut io_bus = Bus::new();
        io_bus
            .insert(serial.clone(), u64::from(COM1_BASE), 8)
            .expect("fixed legacy ports do not overlap");
        io_bus
            .insert(i8042, u64::from(devices::legacy::I8042_BASE), 5)
            .expect("fixed legacy ports do not overlap");
        let io_bus = Arc::new(io_bus);
        let mmio_bus = Arc::new(mmio_bus);

        let mut pending_vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("create a vCPU"))?;
            let mut cpuid = supported.clone();
            cpuid::filter_cpuid(cpuid.as_mut_slice(), index, config.cpus);
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
            regs::setup_common_vcpu(&fd)?;
            if index == 0 {
                regs::setup_boot_vcpu(&fd, kernel.entry, cr3)?;
            }
            pending_vcpus.push(Vcpu {
                index,
                fd,
                io_bus: io_bus.clone(),
                mmio_bus: mmio_bus.clone(),
                compat: compat.clone(),
                shared: shared.clone(),
            });
        }
        phase("VM built");

        Ok(Vm {
            config: config.clone(),
            compat,
            _kvm: kvm,
            vm_fd,
            ram,
            shared,
            serial,
            console,
            pending_vcpus,
            threads: Vec::new(),
            created,
            events,
            devices,
            exit: None,
            id: "vm0".to_owned(),
            requests: None,
            sharing: memory::sharing::SharingSampler::new(memory::sharing::SharingConfig::default()),
            last_sharing: None,
            _ksm_guard: ksm_guard,
            swap,
            age_sampler: false,
        })
    }

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
        while let Ok(Request { action, reply }) = rx.try_recv() {
            let answer = self.handle_action(action);
            // The asker may have given up waiting; nothing to do then.
            let _ = reply.send(answer);
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
        let region = self
            .devices
            .mem
            .as_ref()
            .and_then(|m| Some(m.lock().ok()?.ram().clone()));
        let hp = region.map_or(0, |r| r.resident_bytes().unwrap_or(0));
        self.ram.resident_bytes().unwrap_or(0) + hp
    }

    fn memory_status(&self) -> Option<hotplug::VirtioMemStatus> {
        Some(self.devices.mem.as_ref()?.lock().ok()?.status())
    }

    fn mem_device(&self) -> Result<&Arc<Mutex<VirtioMem>>, ActionError> {
        self.devices.mem.as_ref().ok_or_else(|| {
            ActionError::BadRequest(format!(
                "{} has no virtio-mem device (start it with --hotplug)",
                self.id
            ))
        })
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

    /// Prometheus text of this VM's and the VMM's counters.
    pub fn metrics_text(&self) -> String {
        let mut text = crate::metrics::PromText::new();
        text.vmm_resident();
        text.guest_ram_resident(&self.id, self.resident_bytes());
        text.exit_counters(&self.id, &self.shared.exits);
        if let Some(st) = &self.last_sharing {
            // From the latest `GET /vms/{id}/sharing` sample (sampling has a cost, so a scrape
            // does not trigger one).
            let labels = [("vm", self.id.as_str())];
            let c = &st.counts;
            for (name, help, value) in [
                (
                    "memvisor_sharing_pages_sampled",
                    "Pages in the latest sharing sample.",
                    Some(st.pages_sampled as f64),
                ),
                (
                    "memvisor_sharing_pages_shared",
                    "Sampled pages whose frame has 2+ mappings.",
                    Some(st.pages_shared as f64),
                ),
                (
                    "memvisor_sharing_count_arithmetic_mean",
                    "Arithmetic mean of the map counts.",
                    c.arithmetic_mean,
                ),
                (
                    "memvisor_sharing_count_geometric_mean",
                    "Geometric mean of the map counts.",
                    c.geometric_mean,
                ),
                (
                    "memvisor_sharing_count_harmonic_mean",
                    "Harmonic mean of the map counts.",
                    c.harmonic_mean,
                ),
                (
                    "memvisor_sharing_count_median",
                    "Median of the map counts.",
                    c.median,
                ),
                (
                    "memvisor_sharing_reclaimable_bytes",
                    "Host bytes reclaiming the VM would free (estimate).",
                    Some(st.reclaimable.bytes as f64),
                ),
            ] {
                if let Some(v) = value {
                    text.gauge(name, help, &labels, v);
                }
            }
        }
        if let Ok(c) = memory::ksm::Ksm::open().and_then(|k| k.counters()) {
            for (name, help, value) in [
                (
                    "memvisor_host_ksm_pages_shared",
                    "KSM pages in use.",
                    c.pages_shared,
                ),
                (
                    "memvisor_host_ksm_pages_sharing",
                    "Mappings sharing a KSM page beyond the first.",
                    c.pages_sharing,
                ),
                (
                    "memvisor_host_ksm_full_scans_total",
                    "Completed KSM passes.",
                    c.full_scans,
                ),
            ] {
                text.gauge(name, help, &[], value as f64);
            }
        }
        if let Some(balloon) = &self.devices.balloon {
            let metrics = balloon.lock().map(|b| b.metrics()).ok();
            if let Some(metrics) = metrics {
                text.device_counters(&self.id, "balloon0", &metrics.values());
            }
        }
        if let Some(mem) = &self.devices.mem {
            let metrics = mem.lock().map(|m| m.metrics()).ok();
            if let Some(metrics) = metrics {
                text.device_values(&self.id, "mem0", &metrics.values(), |n| n.ends_with("_max"));
            }
        }
        let swap = self.swap.metrics();
        if !swap.is_empty() {
            text.device_values(&self.id, "swap", &swap, |n| {
                memory::swap::GAUGE_METRICS.contains(&n)
            });
        }
        text.finish()
    }

    /// Carries out one action on the event loop's thread.
    pub fn handle_action(&mut self, action: Action) -> Reply {
        let state = self.state();
        if state == VmState::Stopped
            && !matches!(
                action,
                Action::GetVm
                    | Action::ListVms
                    | Action::Metrics
                    | Action::GetSwap
                    | Action::GetMemory
            )
        {
            return Err(ActionError::Conflict(format!("{} has stopped", self.id)));
        }
        match action {
            Action::ListVms => Ok(ActionReply::VmList(VmList {
                vms: vec![self.info()],
            })),
            Action::GetVm => Ok(ActionReply::Vm(self.info())),
            Action::Metrics => Ok(ActionReply::Metrics(self.metrics_text())),
            Action::SetState(RunState::Paused) => {
                match state {
                    VmState::Paused => {
                        return Err(ActionError::Conflict(format!(
                            "{} is already paused",
                            self.id
                        )))
                    }
                    VmState::Created => {
                        return Err(ActionError::Conflict(format!(
                            "{} has not started",
                            self.id
                        )))
                    }
                    _ => {}
                }
                self.pause()
                    .map_err(|e| ActionError::Internal(e.to_string()))?;
                Ok(ActionReply::Vm(self.info()))
            }
            Action::SetState(RunState::Running) => {
                if state != VmState::Paused {
                    return Err(ActionError::Conflict(format!(
                        "{} is already {state}",
                        self.id
                    )));
                }
                self.resume();
                Ok(ActionReply::Vm(self.info()))
            }
            Action::Shutdown => {
                self.shared.request_exit_quiet(VmExit::Stopped);
                Ok(ActionReply::Accepted)
            }
            Action::SetBalloon(req) => {
                let boot_mib = self.config.memory.mib();
                if req.target_mib > boot_mib {
                    return Err(ActionError::BadRequest(format!(
                        "balloon target {} MiB is larger than the VM's {boot_mib} MiB",
                        req.target_mib
                    )));
                }
                let balloon = self.balloon_device()?;
                balloon
                    .lock()
                    .map_err(|_| ActionError::Internal("the balloon device failed".into()))?
                    .set_target_mib(req.target_mib)
                    .map_err(|e| ActionError::BadRequest(e.to_string()))?;
                self.balloon_info()
                    .map(ActionReply::Balloon)
                    .ok_or_else(|| ActionError::Internal("the balloon device failed".into()))
            }
            Action::GetBalloon => {
                self.balloon_device()?;
                self.balloon_info()
                    .map(ActionReply::Balloon)
                    .ok_or_else(|| ActionError::Internal("the balloon device failed".into()))
            }
            Action::GetSharing => {
                let report = self
                    .sharing
                    .sample(&self.ram)
                    .map_err(|e| ActionError::Internal(e.to_string()))?;
                if let Some(stats) = report.stats() {
                    self.last_sharing = Some(*stats);
                }
                serde_json::to_value(&report)
                    .map(ActionReply::Json)
                    .map_err(|e| ActionError::Internal(e.to_string()))
            }
            Action::GetHost => Ok(ActionReply::Json(Self::host_info())),
            Action::SetMemory(req) => {
                let status = {
                    let mut mem = self.mem_device()?.lock().map_err(|_| {
                        ActionError::Internal("the virtio-mem device failed".into())
                    })?;
                    mem.set_requested_mib(req.requested_mib).map_err(|e| {
                        if e.is_bad_request() {
                            ActionError::BadRequest(e.to_string())
                        } else {
                            ActionError::Internal(e.to_string())
                        }
                    })?;
                    mem.status()
                };
                Ok(ActionReply::Memory(status))
            }
            Action::GetMemory => {
                self.mem_device()?;
                self.memory_status()
                    .map(ActionReply::Memory)
                    .ok_or_else(|| ActionError::Internal("the virtio-mem device failed".into()))
            }
            Action::SetSwap(req) => {
                self.swap.request(req.target_mib)?;
                if !self.age_sampler && self.swap.swapper().is_some() {
                    let sampler = AgeSampler::new(self.swap.clone())
                        .map_err(|e| ActionError::Internal(format!("page-age timer: {e}")))?;
                    self.events.add_subscriber(Arc::new(Mutex::new(sampler)));
                    self.age_sampler = true;
                }
                Ok(ActionReply::Swap {
                    status: self.swap.status_json(),
                    accepted: true,
                })
            }
            Action::GetSwap => Ok(ActionReply::Swap {
                status: self.swap.status_json(),
                accepted: false,
            }),
            Action::GetBalloonStats => {
                let balloon = self.balloon_device()?;
                let latest = balloon
                    .lock()
                    .map_err(|_| ActionError::Internal("the balloon device failed".into()))?
                    .latest_stats();
                Ok(ActionReply::BalloonStats(match latest {
                    Some((stats, age)) => BalloonStatsInfo {
                        age_ms: Some(age.as_millis() as u64),
                        stats: stats.values().into_iter().collect(),
                    },
                    None => BalloonStatsInfo {
                        age_ms: None,
                        stats: Default::default(),
                    },
                }))
            }
        }
    }

    /// Host-wide memory state: KSM settings and counters.
    pub fn host_info() -> serde_json::Value {
        let ksm = memory::ksm::Ksm::open().and_then(|k| Ok((k.settings()?, k.counters()?)));
        match ksm {
            Ok((settings, counters)) => serde_json::json!({
                "ksm": {
                    "status": "ok",
                    "settings": settings,
                    "counters": counters,
                }
            }),
            Err(e) => serde_json::json!({
                "ksm": { "status": "unavailable", "reason": e.to_string() }
            }),
        }
    }

    fn balloon_device(&self) -> Result<&Arc<Mutex<Balloon>>, ActionError> {
        self.devices.balloon.as_ref().ok_or_else(|| {
            ActionError::BadRequest(format!(
                "{} has no balloon device (start it with --balloon)",
                self.id
            ))
        })
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
            .map_err(|e| VmError::EventLoop(e.to_string()))?;
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
        let exit = VmExit::Error(e.to_string());
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
