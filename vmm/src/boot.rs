//! Loading the kernel, initrd and command line, and writing the boot-time structures.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::bootparams::{build_zero_page, e820_map, rng_seed_setup_data, ZeroPageInputs};
use crate::arch::layout::{
    low_ram_end, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MPTABLE_START, SETUP_DATA_START,
    ZERO_PAGE_START,
};
use crate::arch::{mptable, paging, regs};

/// Errors while preparing the guest to boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// The path given.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd file cannot be read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// The path given.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("{0} is not a Linux kernel (neither an ELF vmlinux nor a bzImage)")]
    NotAKernel(String),
    /// The kernel is a kernel, but does not fit.
    #[error("kernel {path} does not fit in {mem_mib} MiB of guest memory")]
    KernelTooBig {
        /// The path given.
        path: String,
        /// Guest RAM.
        mem_mib: u64,
    },
    /// The initrd does not fit between the kernel and the top of low memory.
    #[error("initrd of {initrd_mib} MiB does not fit in guest memory above the kernel; give the VM more memory")]
    InitrdTooBig {
        /// Size of the initrd in MiB (rounded up).
        initrd_mib: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write the {0} to guest memory")]
    Write(&'static str),
    /// The MP table could not be built.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// The GDT could not be written.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
}

/// Where the kernel landed.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header, `None` for an ELF vmlinux.
    pub header: Option<setup_header>,
}

/// Loads an ELF vmlinux or a bzImage from `path`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: shown.clone(),
        source,
    })?;
    let mem_mib = mem_size(mem) >> 20;
    let too_big = || BootError::KernelTooBig {
        path: shown.clone(),
        mem_mib,
    };
    match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end,
                header: None,
            })
        }
        Err(linux_loader::loader::Error::Elf(e)) if is_not_elf(&e) => {}
        Err(_) => return Err(too_big()),
    }
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok(LoadedKernel {
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            entry: r.kernel_load.0 + 0x200,
            end: r.kernel_end,
            header: r.setup_header,
        }),
        Err(linux_loader::loader::Error::Bzimage(e)) if is_not_bzimage(&e) => {
            Err(BootError::NotAKernel(shown))
        }
        Err(_) => Err(too_big()),
    }
}

fn is_not_elf(e: &linux_loader::loader::elf::Error) -> bool {
    use linux_loader::loader::elf::Error as E;
    matches!(
        e,
        E::InvalidElfMagicNumber
            | E::ReadElfHeader
            | E::BigEndianElfOnLittle
            | E::InvalidProgramHeaderSize
    )
}

fn is_not_bzimage(e: &linux_loader::loader::bzimage::Error) -> bool {
    use linux_loader::loader::bzimage::Error as E;
    matches!(
        e,
        E::InvalidBzImage | E::ReadBzImageHeader | E::SeekBzImageHeader | E::SeekBzImageEnd
    )
}

fn mem_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::GuestMemoryBackend;
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

/// Where to put an initrd of `size` bytes: page aligned, as high as possible below `limit`,
/// above `kernel_end`.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= kernel_end).then_some(start)
}

/// Copies the initrd into guest memory; returns its address and size.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_bytes: u64,
) -> Result<(u64, u32), BootError> {
    let shown = path.display().to_string();
    let read_err = |source| BootError::ReadInitrd {
        path: shown.clone(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let mut limit = low_ram_end(mem_bytes);
    if let Some(max) = kernel
        .header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m > 0)
    {
        limit = limit.min(max + 1);
    }
    let too_big = || BootError::InitrdTooBig {
        initrd_mib: size.div_ceil(1 << 20),
    };
    let size32 = u32::try_from(size).map_err(|_| too_big())?;
    let addr = initrd_address(size, kernel.end, limit).ok_or_else(too_big)?;
    // Straight from the file into guest RAM: no intermediate buffer to fault in and copy.
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|_| BootError::Write("initrd"))?;
    Ok((addr, size32))
}

/// Builds the command line from the configured base plus memvisor's additions.
pub fn build_cmdline(base: &str, additions: &[&str]) -> Result<Cmdline, BootError> {
    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    for part in std::iter::once(base).chain(additions.iter().copied()) {
        let part = part.trim();
        if !part.is_empty() {
            cmdline
                .insert_str(part)
                .map_err(|e| BootError::Cmdline(e.to_string()))?;
        }
    }
    Ok(cmdline)
}

/// Writes everything the kernel reads at its 64-bit entry: command line, zero page with e820,
/// RNG seed, MP table, GDT/IDT and page tables. Returns the CR3 value.
pub fn configure_system(
    mem: &GuestMemoryMmap,
    cmdline: &Cmdline,
    kernel: &LoadedKernel,
    initrd: Option<(u64, u32)>,
    mem_bytes: u64,
    num_cpus: u8,
) -> Result<u64, BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|_| BootError::Write("command line"))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();

    let mut seed = [0u8; 32];
    getrandom(&mut seed);
    mem.write_slice(&rng_seed_setup_data(&seed), GuestAddress(SETUP_DATA_START))
        .map_err(|_| BootError::Write("RNG seed"))?;

    let inputs = ZeroPageInputs {
        kernel_header: kernel.header,
        cmdline_addr: CMDLINE_START,
        cmdline_size: cmdline_len as u32,
        initrd,
        setup_data: SETUP_DATA_START,
    };
    let params = build_zero_page(&inputs, &e820_map(mem_bytes));
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::Write("zero page"))?;

    mptable::write(mem, MPTABLE_START, num_cpus)?;
    regs::write_gdt_idt(mem)?;
    paging::write_page_tables(mem).map_err(|_| BootError::Write("page tables"))
}

/// Fills `buf` from the kernel's CSPRNG. Falls back to time-derived bytes only if getrandom
/// fails, which on Linux it does not for 32 bytes.
fn getrandom(buf: &mut [u8]) {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (t >> ((i % 16) * 8)) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn initrd_goes_high_and_page_aligned_above_the_kernel() {
        assert_eq!(
            initrd_address(0x1800, 0x200_0000, 0x800_0000),
            Some(0x7ffe000)
        );
        assert_eq!(
            initrd_address(0x1000, 0x200_0000, 0x800_0000),
            Some(0x7fff000)
        );
        assert_eq!(initrd_address(0x700_0000, 0x200_0000, 0x800_0000), None);
        assert_eq!(initrd_address(0x900_0000, 0, 0x800_0000), None);
    }

    #[test]
    fn cmdline_joins_base_and_additions() {
        let c = build_cmdline("console=ttyS0", &["nopti", "", "a=b"]).expect("cmdline");
        assert_eq!(
            c.as_cstring().expect("cstring").to_str().expect("utf8"),
            "console=ttyS0 nopti a=b"
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            build_cmdline(&long, &[]),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn a_file_that_is_not_a_kernel_is_named_as_such() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let dir = std::env::temp_dir().join(format!("memvisor-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("not-a-kernel");
        File::create(&path)
            .and_then(|mut f| f.write_all(&[0x42; 8192]))
            .expect("write");
        let e = load_kernel(&mem, &path).expect_err("not a kernel");
        assert!(matches!(e, BootError::NotAKernel(_)), "{e}");
        let e = load_kernel(&mem, &dir.join("missing")).expect_err("missing");
        assert!(matches!(e, BootError::OpenKernel { .. }), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn configure_system_writes_zero_page_and_mptable() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let kernel = LoadedKernel {
            entry: 0x100_0000,
            end: 0x200_0000,
            header: None,
        };
        let cmdline = build_cmdline("console=ttyS0", &[]).expect("cmdline");
        let cr3 = configure_system(&mem, &cmdline, &kernel, Some((0x300_0000, 10)), 64 << 20, 2)
            .expect("configure");
        assert_eq!(cr3, crate::arch::layout::PML4_START);
        let magic: u16 = mem
            .read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe))
            .expect("read");
        assert_eq!(magic, 0xaa55);
        let mut mp = [0u8; 4];
        mem.read_slice(&mut mp, GuestAddress(MPTABLE_START))
            .expect("read");
        assert_eq!(&mp, b"_MP_");
        let mut cl = [0u8; 14];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START))
            .expect("read");
        assert_eq!(&cl, b"console=ttyS0\0");
    }
}
