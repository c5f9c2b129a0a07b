//! memvisor's VMM: builds a KVM VM from a [`VmConfig`], boots Linux on it and runs it.
//!
//! This is the only crate that touches KVM. Other programs can embed it: build a [`VmConfig`],
//! call [`Vm::new`], then [`Vm::run`] (or [`Vm::start`] and [`Vm::wait`]).
//!
//! ```no_run
//! use vmm::{Vm, VmConfig, VmIo};
//! let config = VmConfig::default_guest(std::path::Path::new("target/guest"));
//! let vm = Vm::new(&config, VmIo { console_out: Box::new(std::io::stdout()) })?;
//! let exit = vm.run()?;
//! # Ok::<(), vmm::VmError>(())
//! ```

pub mod action;
pub mod api;
pub mod arch;
pub mod boot;
pub mod builder;
pub mod compat;
pub mod config;
pub mod console;
pub mod controller;
pub mod ctl;
pub mod memslots;
pub mod metrics;
pub mod sharing;
pub mod swap;
pub mod vcpu;
pub mod vm;

pub use compat::HostCompat;
pub use config::VmConfig;
pub use vcpu::VmExit;
pub use vm::{ConsoleInput, DeviceError, Vm, VmError, VmIo};
