//! A VM: built from a [`VmConfig`], run on vCPU threads, stopped and torn down.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::legacy::{Serial, COM1_BASE, COM1_IRQ, I8042};
use devices::{Bus, EventFdTrigger};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use memory::GuestRam;
use vmm_sys_util::signal::Killable;

use crate::arch::{cpuid, layout, regs};
use crate::boot::{self, BootError};
use crate::compat::HostCompat;
use crate::config::{host_memory_bytes, ConfigError, VmConfig};
use crate::console::{ConsoleState, ConsoleTap};
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
        let vm_fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
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
        if config.thp {
            // Not fatal: a host without THP still runs the VM, with 4K pages.
            if let Err(e) = ram.set_hugepages(true) {
                tracing::warn!("guest RAM stays on 4K pages: {e}");
            }
        }
        for (slot, (range, host)) in ram.host_ranges().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: range.start.0,
                memory_size: range.size,
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `ram`, which the VM keeps for
            // as long as the KVM VM exists (fields drop after the vCPU threads are joined).
            unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("add guest RAM"))?;
        }

        phase("guest RAM mapped");
        let mem = ram.memory();
        let kernel = boot::load_kernel(mem, &config.kernel)?;
        phase("kernel loaded");
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(mem, path, &kernel, mem_bytes)?),
            None => None,
        };
        phase("initrd loaded");
        let additions: Vec<&str> = compat.cmdline_additions().into_iter().collect();
        let cmdline = boot::build_cmdline(config.base_cmdline(), &additions)?;
        let cr3 = boot::configure_system(mem, &cmdline, &kernel, initrd, mem_bytes, config.cpus)?;
        tracing::debug!(
            "kernel entry {:#x}, command line: {:?}",
            kernel.entry,
            cmdline.as_cstring()
        );

        let shared = Arc::new(VmShared::new().map_err(host_err("the exit eventfd"))?);
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
        let mmio_bus = Arc::new(Bus::new());

        let vm_fd = Arc::new(vm_fd);
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("report CPUID"))?;
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
        })
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

    /// Blocks until the VM stops, and tears the vCPUs down.
    pub fn wait(&mut self) -> VmExit {
        loop {
            if self.shared.exit_evt.read().is_ok() {
                break;
            }
        }
        let reason = self
            .shared
            .exit_reason
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            // The i8042 signals a reset by writing the eventfd without recording a reason.
            .unwrap_or(VmExit::Reset);
        self.stop_vcpus();
        reason
    }

    /// Waits up to `timeout` for the VM to stop on its own; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<VmExit> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.shared.exit_evt);
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is a valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        (n > 0).then(|| self.wait())
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
