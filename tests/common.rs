//! Helpers shared by the integration tests: where the default guest is, and booting it.

use std::path::PathBuf;
use std::time::Duration;

use vmm::{Vm, VmConfig, VmExit, VmIo};

/// The default guest built by `guest-images/build`.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("MEMVISOR_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guest"))
}

/// The default guest's configuration, or a panic that says how to build it.
pub fn default_guest() -> VmConfig {
    let dir = guest_dir();
    assert!(
        dir.join("vmlinux").exists() && dir.join("initramfs.cpio.gz").exists(),
        "no default guest in {}: run guest-images/build first",
        dir.display()
    );
    VmConfig::default_guest(&dir)
}

/// What a boot produced.
#[derive(Debug)]
pub struct BootOutcome {
    /// Time from VM creation to the milestone, if reached.
    pub milestone: Option<Duration>,
    /// How the VM ended, `None` if it was still running at the deadline.
    pub exit: Option<VmExit>,
    /// The last console lines.
    pub tail: Vec<String>,
}

impl BootOutcome {
    /// The console tail, for failure messages.
    pub fn tail_text(&self) -> String {
        self.tail.join("\n")
    }
}

/// Boots `config` with the console captured, until the VM exits or `timeout` passes.
pub fn boot(config: &VmConfig, timeout: Duration) -> BootOutcome {
    let mut vm = Vm::new(
        config,
        VmIo {
            console_out: Box::new(std::io::sink()),
        },
    )
    .expect("build the VM");
    vm.start().expect("start the VM");
    let exit = vm.wait_timeout(timeout);
    if exit.is_none() {
        vm.stop();
    }
    BootOutcome {
        milestone: vm.console().milestone_reached(),
        exit,
        tail: vm.console().tail(),
    }
}
