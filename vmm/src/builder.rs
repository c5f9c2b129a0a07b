//! Building a [`Vm`] from a [`VmConfig`]: a list of named steps, each a function of what the
//! steps before it made. `build` is that list; read it first.
//!
//! The steps that need no KVM (placing the hotplug region, handing out virtio-mmio windows,
//! assembling the command line, setting up guest RAM) are tested here on their own; the ones
//! that call KVM are covered by the integration tests that boot a guest.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use balloon::Balloon;
use devices::legacy::{Serial, COM1_BASE, COM1_IRQ, I8042, I8042_BASE};
use devices::virtio::mmio::{MMIO_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::{mmio_cmdline_fragment, MmioTransport, VirtioDevice};
use devices::{Bus, EventFdTrigger};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use hotplug::{VirtioMem, VirtioMemConfig};
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use memory::ksm::{Ksm, KsmUser, DEFAULT_PAGES_TO_SCAN, DEFAULT_SLEEP_MS};
use memory::{GuestDiscard, GuestRam, RamRange};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use crate::arch::{cpuid, layout, regs};
use crate::boot::{self, BootError, LoadedKernel};
use crate::compat::HostCompat;
use crate::config::{host_memory_bytes, VmConfig};
use crate::console::{BufferedOutput, ConsoleState, ConsoleTap, CONSOLE_BUFFER_BYTES};
use crate::memslots::{map_ram, KvmMemslots};
use crate::swap::VmSwap;
use crate::vcpu::{Vcpu, VmExit, VmShared};
use crate::vm::{host_err, DeviceError, Devices, Subscriber, Vm, VmError, VmIo};

/// First legacy IRQ handed to virtio-mmio devices (IRQ 4 is COM1).
const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IOAPIC pin usable by a virtio-mmio device.
const VIRTIO_IRQ_LAST: u32 = crate::arch::mptable::IOAPIC_PINS as u32 - 1;

impl Vm {
    /// Builds a VM ready to start: KVM VM, guest RAM, kernel loaded, devices, vCPUs.
    pub fn new(config: &VmConfig, io: VmIo) -> Result<Self, VmError> {
        Self::with_compat(config, io, HostCompat::detect())
    }

    /// Like [`Vm::new`] with an explicit host compatibility decision.
    pub fn with_compat(config: &VmConfig, io: VmIo, compat: HostCompat) -> Result<Self, VmError> {
        build(config, io, compat)
    }
}

/// Builds a VM ready to start, step by step: this function is the list of steps (kept whole,
/// with the `Vm` it assembles at the end, so that it reads on one screen).
fn build(config: &VmConfig, io: VmIo, compat: HostCompat) -> Result<Vm, VmError> {
    let created = Instant::now();
    let phase = |what: &str| tracing::debug!("{what} after {} µs", created.elapsed().as_micros());
    config.validate(host_memory_bytes())?;
    compat.log();
    let compat = Arc::new(compat);

    let kvm = check_kvm(config)?;
    let (vm_fd, cpuid) = create_vm(&kvm)?;
    phase("KVM VM created");
    let (ram, ksm_guard) = setup_ram(config)?;
    map_ram(&vm_fd, &ram, false).map_err(kvm_err("add guest RAM"))?;
    phase("guest RAM mapped");
    let guest = load_guest(config, &ram)?;
    phase("kernel and initrd loaded");

    let shared = Arc::new(VmShared::new().map_err(host_err("the exit eventfd"))?);
    let mut events = create_event_loop(&shared)?;
    let swap = Arc::new(VmSwap::new(
        config.swap_dir.as_deref(),
        ram.clone(),
        vm_fd.clone(),
        shared.clone(),
    ));
    let mut mmio = MmioDevices::new(vm_fd.clone(), ram.memory().clone());
    let mut devices = Devices::default();
    if let Some(hp) = config.hotplug {
        let bits = cpuid::phys_addr_bits(cpuid.as_slice());
        let placed = place_hotplug_region(hp, &ram, bits).map_err(device_err("virtio-mem"))?;
        devices.mem = Some(attach_virtio_mem(placed, &ram, &mut mmio, &mut events)?);
    }
    if let Some(balloon_config) = config.balloon {
        let discard = GuestDiscard::new(ram.clone(), swap.swapper_cell(), devices.hotplug_ram());
        devices.balloon = Some(attach_balloon(
            balloon_config,
            discard,
            &mut mmio,
            &mut events,
        )?);
    }
    phase("devices created");

    let cmdline = kernel_cmdline(config, &compat, &mmio.cmdline)?;
    let entry = configure_boot(config, &ram, &guest, &cmdline)?;
    let legacy = setup_legacy_devices(&vm_fd, &shared, io, &compat, created)?;
    let wiring = VcpuWiring {
        io_bus: legacy.io_bus,
        mmio_bus: Arc::new(mmio.bus),
        compat: compat.clone(),
        shared: shared.clone(),
    };
    let pending_vcpus = create_vcpus(&vm_fd, config.cpus, &cpuid, entry, &wiring)?;
    phase("VM built");

    Ok(Vm {
        config: config.clone(),
        compat,
        _kvm: kvm,
        vm_fd,
        ram,
        shared,
        serial: legacy.serial,
        console: legacy.console,
        pending_vcpus,
        threads: Vec::new(),
        created,
        events,
        devices,
        exit: None,
        id: "vm0".to_owned(),
        requests: None,
        sharing: crate::sharing::SharingWorker::spawn(memory::sharing::SharingSampler::new(
            memory::sharing::SharingConfig::default(),
        ))
        .map_err(host_err("the sharing sampler thread"))?,
        _ksm_guard: ksm_guard,
        swap,
        age_sampler: false,
    })
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn device_err<E: Into<DeviceError>>(device: &'static str) -> impl FnOnce(E) -> VmError {
    move |e| VmError::Device {
        device,
        source: e.into(),
    }
}

/// Opens `/dev/kvm` and checks that it has every capability memvisor uses and allows the
/// configured number of vCPUs.
fn check_kvm(config: &VmConfig) -> Result<Kvm, VmError> {
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
    Ok(kvm)
}

/// Creates the KVM VM with its TSS, in-kernel interrupt controllers and PIT; returns it with
/// the CPUID KVM supports (the vCPUs' is filtered from it).
fn create_vm(kvm: &Kvm) -> Result<(Arc<VmFd>, CpuId), VmError> {
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
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report CPUID"))?;
    Ok((Arc::new(vm_fd), cpuid))
}

/// Maps guest RAM and gives the host its advice: mergeable for KSM (with host KSM turned on
/// while the VM lives, see [`enable_host_ksm`]), or transparent huge pages. Not mapped into
/// KVM yet.
fn setup_ram(config: &VmConfig) -> Result<(GuestRam, Option<KsmUser>), VmError> {
    let ram = GuestRam::new(&layout::ram_ranges(config.memory.bytes()))?;
    let mut ksm_guard = None;
    if config.mergeable {
        ram.set_mergeable(true)?;
        ksm_guard = enable_host_ksm();
    } else if config.thp {
        // Not fatal: a host without THP still runs the VM, with 4K pages.
        if let Err(e) = ram.set_hugepages(true) {
            tracing::warn!("guest RAM stays on 4K pages: {e}");
        }
    }
    Ok((ram, ksm_guard))
}

/// KSM scans only while `run` is 1: turns it on at memvisor's rate if it is off. The host's
/// settings come back when the last mergeable VM of the process goes ([`Ksm::share_on`]). Never
/// fatal: without KSM the VM runs, its pages are just not merged.
fn enable_host_ksm() -> Option<KsmUser> {
    let ksm = match Ksm::open() {
        Ok(ksm) => ksm,
        Err(e) => {
            tracing::warn!("host KSM is unavailable, pages will not be merged: {e}");
            return None;
        }
    };
    match ksm.share_on(DEFAULT_PAGES_TO_SCAN, DEFAULT_SLEEP_MS) {
        Ok(user) => Some(user),
        Err(e) => {
            tracing::warn!("cannot turn host KSM on: {e}");
            None
        }
    }
}

/// The kernel and initrd, loaded into guest RAM.
struct LoadedGuest {
    kernel: LoadedKernel,
    initrd: Option<(u64, u32)>,
}

/// Loads the kernel and the initrd (if any) into guest RAM.
fn load_guest(config: &VmConfig, ram: &GuestRam) -> Result<LoadedGuest, VmError> {
    let mem = ram.memory();
    let kernel = boot::load_kernel(mem, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(
            mem,
            path,
            &kernel,
            config.memory.bytes(),
        )?),
        None => None,
    };
    Ok(LoadedGuest { kernel, initrd })
}

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

/// The VM's event loop, watching the exit eventfd.
fn create_event_loop(shared: &Arc<VmShared>) -> Result<EventManager<Subscriber>, VmError> {
    let mut events: EventManager<Subscriber> = EventManager::new().map_err(VmError::EventLoop)?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher(shared.clone()))));
    Ok(events)
}

/// Hands out virtio-mmio windows and IRQs, in order.
#[derive(Debug)]
struct VirtioSlots {
    next_base: u64,
    next_irq: u32,
}

impl VirtioSlots {
    fn new() -> Self {
        VirtioSlots {
            next_base: layout::VIRTIO_MMIO_START,
            next_irq: VIRTIO_IRQ_BASE,
        }
    }

    /// The next free window base and IRQ.
    fn allocate(&mut self) -> Result<(u64, u32), DeviceError> {
        if self.next_irq > VIRTIO_IRQ_LAST {
            return Err(DeviceError::NoInterruptLine);
        }
        let slot = (self.next_base, self.next_irq);
        self.next_base += MMIO_SIZE;
        self.next_irq += 1;
        Ok(slot)
    }
}

/// The virtio-mmio devices under construction: the MMIO bus, the windows and IRQs handed out,
/// the memory devices see (guest RAM and the hotplug region: the guest may hand a device
/// buffers in plugged memory, e.g. balloon pages), and the command-line fragment announcing
/// each device to the guest.
struct MmioDevices {
    vm_fd: Arc<VmFd>,
    bus: Bus,
    slots: VirtioSlots,
    memory: GuestMemoryMmap,
    cmdline: Vec<String>,
}

impl MmioDevices {
    fn new(vm_fd: Arc<VmFd>, memory: GuestMemoryMmap) -> Self {
        MmioDevices {
            vm_fd,
            bus: Bus::new(),
            slots: VirtioSlots::new(),
            memory,
            cmdline: Vec::new(),
        }
    }

    /// Puts `device` behind a virtio-mmio transport in the next window, and wires the
    /// transport's interrupt (irqfd) and queue notifications (ioeventfd) to KVM.
    fn attach(&mut self, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<(), DeviceError> {
        let (base, irq) = self.slots.allocate()?;
        let vm_fd = &self.vm_fd;
        let transport = MmioTransport::new(self.memory.clone(), device)?;
        vm_fd
            .register_irqfd(transport.interrupt_evt(), irq)
            .map_err(DeviceError::Irqfd)?;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            vm_fd
                .register_ioevent(evt, &addr, i as u32)
                .map_err(DeviceError::Ioeventfd)?;
        }
        self.bus
            .insert(Arc::new(Mutex::new(transport)), base, MMIO_SIZE)?;
        self.cmdline
            .push(mmio_cmdline_fragment(base, MMIO_SIZE, irq));
        tracing::debug!("virtio-mmio device at {base:#x}, irq {irq}");
        Ok(())
    }
}

/// Places the hotplug region (above RAM unless the user gave an address) and checks that the
/// guest's CPU, with `phys_addr_bits` of physical address, can reach all of it.
fn place_hotplug_region(
    config: VirtioMemConfig,
    ram: &GuestRam,
    phys_addr_bits: u32,
) -> Result<VirtioMemConfig, DeviceError> {
    let size = config.region_size.bytes();
    let addr = layout::hotplug_region_addr(ram.ranges(), config.region_addr, size)?;
    let end = addr.saturating_add(size);
    if phys_addr_bits < 64 && end > 1u64 << phys_addr_bits {
        return Err(DeviceError::BeyondAddressWidth {
            end,
            bits: phys_addr_bits,
        });
    }
    Ok(VirtioMemConfig {
        region_addr: Some(addr),
        ..config
    })
}

/// Maps the placed hotplug region's memory, creates the virtio-mem device with it, lets
/// devices see that memory next to guest RAM, and attaches the device to the MMIO bus and the
/// event loop.
fn attach_virtio_mem(
    placed: VirtioMemConfig,
    ram: &GuestRam,
    mmio: &mut MmioDevices,
    events: &mut EventManager<Subscriber>,
) -> Result<Arc<Mutex<VirtioMem>>, VmError> {
    let fail = |e: DeviceError| VmError::Device {
        device: "virtio-mem",
        source: e,
    };
    let addr = placed.region_addr.unwrap_or_default();
    let size = placed.region_size.bytes();
    let region = GuestRam::new(&[RamRange::new(addr, size)])
        .map_err(|e| fail(DeviceError::RegionMemory(e)))?;
    mmio.memory = ram
        .joined(&region)
        .map_err(|e| fail(DeviceError::JoinRegion(e)))?;
    let memslots = KvmMemslots::new(mmio.vm_fd.clone(), ram.ranges().len() as u32);
    let device = VirtioMem::new(placed, region, Box::new(memslots)).map_err(|e| fail(e.into()))?;
    tracing::info!(
        "virtio-mem: {} MiB hotplug region at {addr:#x}, blocks of {} KiB",
        size >> 20,
        placed.block_size.bytes() >> 10
    );
    let device = Arc::new(Mutex::new(device));
    mmio.attach(device.clone()).map_err(fail)?;
    events.add_subscriber(device.clone());
    Ok(device)
}

/// Creates the balloon, its discards routed by `discard`, and attaches it to the MMIO bus and
/// the event loop.
fn attach_balloon(
    config: balloon::BalloonConfig,
    discard: GuestDiscard,
    mmio: &mut MmioDevices,
    events: &mut EventManager<Subscriber>,
) -> Result<Arc<Mutex<Balloon>>, VmError> {
    let balloon = Balloon::new(config, Arc::new(discard)).map_err(device_err("balloon"))?;
    let balloon = Arc::new(Mutex::new(balloon));
    mmio.attach(balloon.clone())
        .map_err(device_err("balloon"))?;
    events.add_subscriber(balloon.clone());
    Ok(balloon)
}

/// The guest's command line: the user's (or the default), then the host compatibility
/// additions, the virtio-mmio devices (`mmio_fragments`), and, with a hotplug region,
/// `memhp_default_state=online_movable` unless the user chose a state.
fn kernel_cmdline(
    config: &VmConfig,
    compat: &HostCompat,
    mmio_fragments: &[String],
) -> Result<Cmdline, BootError> {
    let mut additions: Vec<&str> = compat.cmdline_additions().into_iter().collect();
    additions.extend(mmio_fragments.iter().map(String::as_str));
    // Plugged virtio-mem memory must be onlined as movable, or the guest can never unplug it
    // again; the user's own choice wins.
    if config.hotplug.is_some() && !config.base_cmdline().contains("memhp_default_state=") {
        additions.push("memhp_default_state=online_movable");
    }
    boot::build_cmdline(config.base_cmdline(), &additions)
}

/// Where the boot vCPU starts: the kernel's entry point, with these page tables.
#[derive(Clone, Copy, Debug)]
struct BootEntry {
    entry: u64,
    cr3: u64,
}

/// Writes what the kernel reads at boot (command line, zero page, MP table, page tables) into
/// guest RAM.
fn configure_boot(
    config: &VmConfig,
    ram: &GuestRam,
    guest: &LoadedGuest,
    cmdline: &Cmdline,
) -> Result<BootEntry, VmError> {
    let cr3 = boot::configure_system(
        ram.memory(),
        cmdline,
        &guest.kernel,
        guest.initrd,
        config.memory.bytes(),
        config.cpus,
    )?;
    tracing::debug!(
        "kernel entry {:#x}, command line: {:?}",
        guest.kernel.entry,
        cmdline.as_cstring()
    );
    Ok(BootEntry {
        entry: guest.kernel.entry,
        cr3,
    })
}

/// The legacy devices on the port-I/O bus, and what the VM keeps of them.
struct LegacyDevices {
    io_bus: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    console: Arc<ConsoleState>,
}

/// The COM1 UART (its output through a [`ConsoleTap`] that watches for the boot milestone,
/// its interrupt through an irqfd) and the i8042 (whose reset line writes the exit eventfd),
/// on the port-I/O bus.
fn setup_legacy_devices(
    vm_fd: &VmFd,
    shared: &VmShared,
    io: VmIo,
    compat: &HostCompat,
    created: Instant,
) -> Result<LegacyDevices, VmError> {
    // The vCPU that writes the UART never waits for the user's writer (see `console`).
    let (out, output) = BufferedOutput::spawn(io.console_out, CONSOLE_BUFFER_BYTES)
        .map_err(host_err("the console output thread"))?;
    let (tap, console) = ConsoleTap::new(Box::new(out), compat.boot_milestone(), created);
    console.attach_output(output);
    let serial_irq = EventFdTrigger::new_nonblocking().map_err(host_err("the serial eventfd"))?;
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
        .insert(i8042, u64::from(I8042_BASE), 5)
        .expect("fixed legacy ports do not overlap");
    Ok(LegacyDevices {
        io_bus: Arc::new(io_bus),
        serial,
        console,
    })
}

/// What every vCPU thread shares.
struct VcpuWiring {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    compat: Arc<HostCompat>,
    shared: Arc<VmShared>,
}

/// Creates `cpus` vCPUs with their CPUID (from KVM's `supported`, filtered) and registers;
/// vCPU 0 starts at `boot`.
fn create_vcpus(
    vm_fd: &VmFd,
    cpus: u8,
    supported: &CpuId,
    boot: BootEntry,
    wiring: &VcpuWiring,
) -> Result<Vec<Vcpu>, VmError> {
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for index in 0..cpus {
        let fd = vm_fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("create a vCPU"))?;
        let mut cpuid = supported.clone();
        cpuid::filter_cpuid(cpuid.as_mut_slice(), index, cpus);
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        regs::setup_common_vcpu(&fd)?;
        if index == 0 {
            regs::setup_boot_vcpu(&fd, boot.entry, boot.cr3)?;
        }
        vcpus.push(Vcpu {
            index,
            fd,
            io_bus: wiring.io_bus.clone(),
            mmio_bus: wiring.mmio_bus.clone(),
            compat: wiring.compat.clone(),
            shared: wiring.shared.clone(),
        });
    }
    Ok(vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use memory::ByteSize;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn config() -> VmConfig {
        VmConfig::new("/nonexistent/vmlinux")
    }

    fn ram(bytes: u64) -> GuestRam {
        GuestRam::new(&layout::ram_ranges(bytes)).expect("guest RAM")
    }

    #[test]
    fn hotplug_region_goes_above_ram() {
        let placed =
            place_hotplug_region(VirtioMemConfig::new(GIB), &ram(200 * MIB), 40).expect("placed");
        assert_eq!(placed.region_addr, Some(256 * MIB));
    }

    #[test]
    fn hotplug_region_beyond_the_address_width_is_refused() {
        // 36 bits reach 64 GiB; a 64 GiB region above RAM ends beyond that.
        let err = place_hotplug_region(VirtioMemConfig::new(64 * GIB), &ram(256 * MIB), 36)
            .expect_err("beyond 36 bits");
        assert!(
            matches!(err, DeviceError::BeyondAddressWidth { bits: 36, end } if end > 64 * GIB),
            "{err}"
        );
        // The same region fits a 40-bit guest.
        place_hotplug_region(VirtioMemConfig::new(64 * GIB), &ram(256 * MIB), 40)
            .expect("fits 40 bits");
    }

    #[test]
    fn hotplug_region_overlapping_ram_is_refused() {
        let hp = VirtioMemConfig {
            region_addr: Some(0),
            ..VirtioMemConfig::new(128 * MIB)
        };
        let err = place_hotplug_region(hp, &ram(256 * MIB), 40).expect_err("overlaps RAM");
        assert!(
            matches!(
                err,
                DeviceError::Placement(layout::PlacementError::Overlaps { addr: 0, .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn virtio_slots_step_through_windows_until_the_irqs_run_out() {
        let mut slots = VirtioSlots::new();
        let first = slots.allocate().expect("first slot");
        assert_eq!(first, (layout::VIRTIO_MMIO_START, VIRTIO_IRQ_BASE));
        let second = slots.allocate().expect("second slot");
        assert_eq!(
            second,
            (layout::VIRTIO_MMIO_START + MMIO_SIZE, VIRTIO_IRQ_BASE + 1)
        );
        let free = VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1;
        for _ in 2..free {
            slots.allocate().expect("a free line");
        }
        assert!(matches!(
            slots.allocate(),
            Err(DeviceError::NoInterruptLine)
        ));
    }

    fn cmdline_text(cmdline: &Cmdline) -> String {
        cmdline
            .as_cstring()
            .expect("a C string")
            .into_string()
            .expect("ASCII")
    }

    #[test]
    fn cmdline_is_base_then_compat_then_devices() {
        let fragments = vec!["virtio_mmio.device=4K@0xd0000000:5".to_owned()];
        let native = kernel_cmdline(&config(), &HostCompat::native(), &fragments).expect("fits");
        assert_eq!(
            cmdline_text(&native),
            format!("{} {}", crate::config::DEFAULT_CMDLINE, fragments[0])
        );
        let emulated =
            kernel_cmdline(&config(), &HostCompat::emulated("test"), &fragments).expect("fits");
        let text = cmdline_text(&emulated);
        let additions = HostCompat::emulated("test")
            .cmdline_additions()
            .expect("emulated hosts add to the command line");
        let base_end = crate::config::DEFAULT_CMDLINE.len();
        let compat_at = text.find(additions).expect("compat additions");
        let device_at = text.find(&fragments[0]).expect("device fragment");
        assert!(
            base_end <= compat_at && compat_at < device_at,
            "base, compat, devices: {text}"
        );
        assert!(!text.contains("memhp_default_state"), "{text}");
    }

    #[test]
    fn cmdline_onlines_hotplugged_memory_movable_unless_the_user_chose() {
        let mut hp = config();
        hp.hotplug = Some(VirtioMemConfig::new(GIB));
        let text = cmdline_text(&kernel_cmdline(&hp, &HostCompat::native(), &[]).expect("fits"));
        assert!(
            text.ends_with("memhp_default_state=online_movable"),
            "{text}"
        );
        hp.cmdline = Some("console=ttyS0 memhp_default_state=online_kernel".into());
        let text = cmdline_text(&kernel_cmdline(&hp, &HostCompat::native(), &[]).expect("fits"));
        assert_eq!(text, "console=ttyS0 memhp_default_state=online_kernel");
    }

    #[test]
    fn cmdline_too_long_is_refused() {
        let mut c = config();
        c.cmdline = Some("x".repeat(64 * 1024));
        assert!(kernel_cmdline(&c, &HostCompat::native(), &[]).is_err());
    }

    /// The `VmFlags` of the mapping that starts at `addr`, from `/proc/self/smaps`.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut lines = smaps.lines();
        let header = format!("{addr:x}-");
        lines
            .by_ref()
            .find(|l| l.starts_with(&header))
            .expect("the mapping");
        lines
            .find(|l| l.starts_with("VmFlags:"))
            .expect("VmFlags line")
            .to_owned()
    }

    #[test]
    fn ram_is_mapped_at_the_configured_size_with_huge_page_advice() {
        let thp_never = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .map_or(true, |t| t.contains("[never]"));
        let mut c = config();
        c.memory = ByteSize(64 * MIB);
        let (ram, guard) = setup_ram(&c).expect("RAM");
        assert!(guard.is_none(), "KSM is left alone unless mergeable");
        assert_eq!(ram.size_bytes(), 64 * MIB);
        let flags = vm_flags(ram.host_ranges()[0].1 as u64);
        if !thp_never {
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        }

        c.thp = false;
        let (ram, _) = setup_ram(&c).expect("RAM");
        let flags = vm_flags(ram.host_ranges()[0].1 as u64);
        assert!(!flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }
}
