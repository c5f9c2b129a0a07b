//! x86_64 platform setup: guest physical layout, CPU state at entry, CPUID, MSRs, the MP table
//! and the Linux zero page. Everything here that can be pure is pure and unit-tested; KVM calls
//! are confined to [`regs`].

pub mod bootparams;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;
