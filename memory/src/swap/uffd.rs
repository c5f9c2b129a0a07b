//! The one module of the swap code that talks to the kernel directly: userfaultfd (creation,
//! `UFFDIO_API`, register, copy, zero page, write-protect, wake, reading fault messages), plus the
//! few raw calls on guest RAM the swapper needs (`MADV_DONTNEED`, `mincore`, a page checksum),
//! the swap file's `fdatasync` + `POSIX_FADV_DONTNEED`, and an eventfd used to stop the
//! fault-handling thread.
//!
//! The ioctl numbers and structure layouts are those of `<linux/userfaultfd.h>` (API version
//! 0xAA); the unit tests check the sizes, and the numbers were checked against the C header.
//! The `userfaultfd` crate was not used: its `-sys` crate runs bindgen at build time, which needs
//! libclang and kernel headers on every build machine, for about a dozen constants.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect faults on anonymous memory (Linux 5.7).
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;

/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

// _IOWR/_IOR(0xAA, nr, struct ...) as computed by <asm-generic/ioctl.h>.
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_RW: u64 = 3;
const UFFDIO_API: u64 = ioc(IOC_RW, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_RW, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
const UFFDIO_COPY: u64 = ioc(IOC_RW, 0x03, 40);
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_RW, 0x04, 32);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_RW, 0x06, 24);
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg`, with the page-fault arm of its union (the only event we enable).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    pad: u32,
}

/// A page fault read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting host address (page aligned by the kernel).
    pub address: u64,
    /// `PAGEFAULT_FLAG_*` bits.
    pub flags: u64,
}

impl Fault {
    /// A write-protect fault (as opposed to a missing-page fault).
    pub fn is_wp(&self) -> bool {
        self.flags & PAGEFAULT_FLAG_WP != 0
    }
}

/// Result of a resolving ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// The page was installed and the faulting threads woken.
    Done,
    /// A page was already mapped there (`EEXIST`); the faulting threads were woken explicitly.
    AlreadyMapped,
}

/// Features the running kernel offers, from a throwaway `UFFDIO_API` handshake.
pub fn probe_features() -> io::Result<u64> {
    let fd = open_uffd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    // SAFETY: `fd` is a fresh userfaultfd and `api` a properly sized `struct uffdio_api` that
    // lives for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(api.features)
}

fn open_uffd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd syscall takes only flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let err = io::Error::last_os_error();
    // Without CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd = 0 the syscall is refused,
    // but /dev/userfaultfd (Linux 6.1) may still be open to us.
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| err)?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags by value and returns a new fd.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A userfaultfd, non-blocking, after a successful `UFFDIO_API` handshake.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Opens a userfaultfd and enables `features` (which must be a subset of
    /// [`probe_features`]).
    pub fn new(features: u64) -> io::Result<Self> {
        let fd = open_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `fd` is a fresh userfaultfd; `api` is a `struct uffdio_api` that lives for
        // the call.
        let ret = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Uffd { fd })
    }

    /// The raw fd, for `poll`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn ioctl<T>(&self, req: u64, arg: &mut T) -> io::Result<()> {
        // SAFETY: every caller passes the request number that matches `T`'s layout (a
        // `#[repr(C)]` copy of the kernel structure); the kernel reads and writes only within
        // `*arg`, which is live and exclusively borrowed for the call. The ioctls that write
        // guest memory (copy, zero page) only touch ranges registered by `register`, which the
        // swapper keeps mapped for as long as this fd lives.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, arg as *mut T) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `len` bytes at `start` for missing faults and, if `wp`, write-protect faults.
    /// Returns the ioctl bitmask the kernel allows on the range.
    pub fn register(&self, start: u64, len: u64, wp: bool) -> io::Result<u64> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: REGISTER_MODE_MISSING | if wp { REGISTER_MODE_WP } else { 0 },
            ioctls: 0,
        };
        self.ioctl(UFFDIO_REGISTER, &mut reg)?;
        Ok(reg.ioctls)
    }

    /// Unregisters `len` bytes at `start`: threads blocked on faults there are woken, and from
    /// then on the range faults like ordinary anonymous memory (zero pages where nothing is
    /// mapped).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        self.ioctl(UFFDIO_UNREGISTER, &mut range)
    }

    /// Wakes threads blocked on faults in the range.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut range = UffdioRange { start, len };
        self.ioctl(UFFDIO_WAKE, &mut range)
    }

    /// Installs a copy of `src` at `dst` (`UFFDIO_COPY`) and wakes the faulting threads.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<Resolve> {
        let mut copy = UffdioCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        self.resolve(UFFDIO_COPY, &mut copy, dst, src.len() as u64)
    }

    /// Maps the zero page at `len` bytes from `dst` (`UFFDIO_ZEROPAGE`) and wakes.
    pub fn zeropage(&self, dst: u64, len: u64) -> io::Result<Resolve> {
        let mut zp = UffdioZeropage {
            range: UffdioRange { start: dst, len },
            mode: 0,
            zeropage: 0,
        };
        self.resolve(UFFDIO_ZEROPAGE, &mut zp, dst, len)
    }

    fn resolve<T>(&self, req: u64, arg: &mut T, dst: u64, len: u64) -> io::Result<Resolve> {
        let mut installed = false;
        retry_transient(
            || match self.ioctl(req, arg) {
                Ok(()) => {
                    installed = true;
                    Ok(())
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Nothing was installed and nobody was woken: do it ourselves.
                    self.wake(dst, len)
                }
                Err(e) => Err(e),
            },
            std::thread::sleep,
        )?;
        Ok(if installed {
            Resolve::Done
        } else {
            Resolve::AlreadyMapped
        })
    }

    /// Sets (`protect`) or clears write protection on a registered range. Clearing wakes the
    /// threads blocked on write-protect faults in it.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> io::Result<()> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut wp)
    }

    /// Reads pending page-fault messages into `out` (cleared first). Returns the number read;
    /// 0 when none is pending.
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> io::Result<usize> {
        out.clear();
        let mut msgs = [UffdMsg::default(); 16];
        let size = size_of_val(&msgs);
        // SAFETY: `msgs` is a live buffer of `size` bytes of plain-old-data structures, and the
        // kernel writes whole `struct uffd_msg`s into it.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        let count = n as usize / size_of::<UffdMsg>();
        for m in &msgs[..count] {
            if m.event == EVENT_PAGEFAULT {
                out.push(Fault {
                    address: m.address,
                    flags: m.flags,
                });
            } else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected userfaultfd event {:#x}", m.event),
                ));
            }
        }
        Ok(count)
    }
}

/// Total time [`retry_transient`] keeps retrying before it reports the error.
pub const TRANSIENT_RETRY_BUDGET: Duration = Duration::from_secs(1);

/// Runs `op` until it succeeds, retrying the errors a resolving ioctl may return for a moment:
/// `EAGAIN` (the address space changed under the ioctl, e.g. a concurrent `madvise`) and
/// `ENOMEM` (the kernel could not allocate the page or its page table right now). Waits
/// between tries with `sleep`, from 100 µs doubling to 50 ms, for at most
/// [`TRANSIENT_RETRY_BUDGET`] in all; any other error, or one that outlasts the budget, is
/// returned.
pub fn retry_transient(
    mut op: impl FnMut() -> io::Result<()>,
    mut sleep: impl FnMut(Duration),
) -> io::Result<()> {
    let mut waited = Duration::ZERO;
    let mut pause = Duration::from_micros(100);
    loop {
        match op() {
            Ok(()) => return Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOMEM))
                    && waited < TRANSIENT_RETRY_BUDGET =>
            {
                sleep(pause);
                waited += pause;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `fdatasync` on `fd`, then `POSIX_FADV_DONTNEED` on `len` bytes at `offset`: the data is on
/// the device (a write-back error is returned here), and its now clean pages leave the page
/// cache.
pub fn datasync_and_drop_cache(fd: RawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fdatasync only takes an fd; an invalid one is an error, not undefined behaviour.
    if unsafe { libc::fdatasync(fd) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: posix_fadvise takes an fd, a range and advice by value; it touches no memory of
    // ours.
    let ret = unsafe {
        libc::posix_fadvise(
            fd,
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if ret != 0 {
        // A hint that failed costs page cache, not data: report it, do not fail the write.
        tracing::debug!(
            "POSIX_FADV_DONTNEED on the swap file failed: {}",
            io::Error::from_raw_os_error(ret)
        );
    }
    Ok(())
}

/// CRC32C of the page at host address `addr`, read with volatile loads into `scratch` first.
///
/// The caller guarantees `addr` is the page-aligned start of a page of guest RAM it keeps
/// mapped. The page is write-protected while the swapper checksums it, but a guest write may
/// still land once the fault handler lets it through; the copy makes that a stale value (and
/// the swapper then keeps the page in RAM) rather than a data race on a Rust slice.
pub fn page_crc32c(addr: u64, scratch: &mut [u64; (crate::PAGE_SIZE / 8) as usize]) -> u32 {
    let p = addr as *const u64;
    for (i, w) in scratch.iter_mut().enumerate() {
        // SAFETY: `p + i` is inside the mapped, aligned page (caller's contract).
        *w = unsafe { p.add(i).read_volatile() };
    }
    // SAFETY: `scratch` is a live array of u64; viewing its bytes as u8 is always valid.
    let bytes =
        unsafe { std::slice::from_raw_parts(scratch.as_ptr().cast::<u8>(), size_of_val(scratch)) };
    crc32c::crc32c(bytes)
}

/// An eventfd used to tell the fault-handling thread to stop.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Signals the eventfd.
    pub fn signal(&self) -> io::Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to an fd we own.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
        if n != 8 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The raw fd, for `poll`.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits up to `timeout_ms` for `fd` to become readable; returns whether it did.
pub fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one live pollfd structure, as the count says.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    ret > 0 && pfd.revents & libc::POLLIN != 0
}

/// Which of the two polled fds are readable.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ready {
    /// The userfaultfd has messages.
    pub uffd: bool,
    /// The stop eventfd was signalled.
    pub stop: bool,
}

/// Waits until `uffd` or `stop` is readable.
pub fn poll2(uffd: RawFd, stop: RawFd) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd: uffd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a live array of two pollfd structures, as the count says.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let bad = libc::POLLERR | libc::POLLNVAL;
        if fds[0].revents & bad != 0 {
            return Err(io::Error::other("userfaultfd reported POLLERR/POLLNVAL"));
        }
        return Ok(Ready {
            uffd: fds[0].revents & libc::POLLIN != 0,
            stop: fds[1].revents != 0,
        });
    }
}

/// `MADV_DONTNEED` on `len` bytes at host address `start`.
///
/// The caller guarantees the range lies inside guest RAM it keeps mapped.
pub fn dontneed(start: u64, len: u64) -> io::Result<()> {
    // SAFETY: the range is inside a live anonymous guest-RAM mapping (the caller's contract);
    // dropping its pages cannot invalidate Rust references because guest memory is only read
    // and written through volatile accessors and the kernel.
    let ret = unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            len as usize,
            libc::MADV_DONTNEED,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Residency of each page of `len` bytes at `start` (one byte per page, bit 0 = resident).
pub fn mincore(start: u64, len: u64, out: &mut Vec<u8>) -> io::Result<()> {
    let pages = len.div_ceil(crate::PAGE_SIZE) as usize;
    out.clear();
    out.resize(pages, 0);
    // SAFETY: the range is inside a live guest-RAM mapping (the caller's contract) and `out` has
    // one byte per page of it, as mincore requires.
    let ret = unsafe { libc::mincore(start as *mut libc::c_void, len as usize, out.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the page at host address `addr` is all zero.
///
/// The caller guarantees `addr` is the page-aligned start of a page of guest RAM it keeps mapped.
pub fn page_is_zero(addr: u64) -> bool {
    let words = (crate::PAGE_SIZE / 8) as usize;
    let p = addr as *const u64;
    let mut acc = 0u64;
    for i in (0..words).step_by(8) {
        for j in 0..8 {
            // SAFETY: `p + i + j` is inside the mapped, aligned page (caller's contract).
            // Volatile: another thread (the guest) may write the page meanwhile; then the
            // answer does not matter, as the swapper keeps a page written during swap-out.
            acc |= unsafe { p.add(i + j).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

/// Writes every byte of `pieces` (host address, length) at `offset` of `fd` with `pwritev`,
/// continuing after short writes.
///
/// The caller guarantees every piece is memory it keeps mapped and readable for the call.
pub fn pwritev_all(fd: RawFd, pieces: &[(u64, usize)], mut offset: u64) -> io::Result<()> {
    let mut iov: Vec<libc::iovec> = pieces
        .iter()
        .map(|(addr, len)| libc::iovec {
            iov_base: *addr as *mut libc::c_void,
            iov_len: *len,
        })
        .collect();
    let mut first = 0;
    while first < iov.len() {
        let count = (iov.len() - first).min(1024);
        // SAFETY: each iovec points to memory the caller keeps mapped and readable; the kernel
        // only reads from it. `iov[first..first + count]` is a live array of `count` iovecs.
        let n = unsafe {
            libc::pwritev(
                fd,
                iov[first..].as_ptr(),
                count as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 && first < iov.len() {
            if n >= iov[first].iov_len {
                n -= iov[first].iov_len;
                first += 1;
            } else {
                iov[first].iov_base = (iov[first].iov_base as u64 + n as u64) as *mut libc::c_void;
                iov[first].iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_uffd_structures_match_the_kernel_abi() {
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(size_of::<UffdioApi>(), 24);
        assert_eq!(size_of::<UffdioRegister>(), 32);
        assert_eq!(size_of::<UffdioCopy>(), 40);
        assert_eq!(size_of::<UffdioZeropage>(), 32);
        assert_eq!(size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(std::mem::offset_of!(UffdMsg, flags), 8);
        assert_eq!(std::mem::offset_of!(UffdMsg, address), 16);
        // Values printed by a C program including <linux/userfaultfd.h>.
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }

    #[test]
    fn pwritev_all_writes_every_piece_in_order() {
        let file = tempfile_in_tmp();
        let a = vec![1u8; 5000];
        let b = vec![2u8; 3000];
        let pieces = [(a.as_ptr() as u64, a.len()), (b.as_ptr() as u64, b.len())];
        pwritev_all(file.as_raw_fd(), &pieces, 100).expect("pwritev");
        let data = std::fs::read(format!("/proc/self/fd/{}", file.as_raw_fd())).expect("read");
        assert_eq!(data.len(), 8100);
        assert!(data[100..5100].iter().all(|x| *x == 1));
        assert!(data[5100..].iter().all(|x| *x == 2));
    }

    fn tempfile_in_tmp() -> std::fs::File {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(std::env::temp_dir())
            .expect("O_TMPFILE")
    }

    #[test]
    fn page_is_zero_checks_every_word() {
        #[repr(C, align(4096))]
        struct Page([u8; 4096]);
        let mut page = Page([0; 4096]);
        assert!(page_is_zero(page.0.as_ptr() as u64));
        page.0[4095] = 1;
        assert!(!page_is_zero(page.0.as_ptr() as u64));
        page.0[4095] = 0;
        page.0[0] = 1;
        assert!(!page_is_zero(page.0.as_ptr() as u64));
    }

    #[test]
    fn transient_enomem_and_eagain_are_retried_with_backoff() {
        let mut errors = vec![libc::ENOMEM, libc::EAGAIN, libc::ENOMEM].into_iter();
        let mut slept = Vec::new();
        let r = retry_transient(
            || match errors.next() {
                Some(e) => Err(io::Error::from_raw_os_error(e)),
                None => Ok(()),
            },
            |d| slept.push(d),
        );
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(
            slept,
            vec![
                Duration::from_micros(100),
                Duration::from_micros(200),
                Duration::from_micros(400)
            ]
        );
    }

    #[test]
    fn lasting_enomem_and_other_errors_are_returned() {
        let mut tries = 0;
        let mut slept = Duration::ZERO;
        let r = retry_transient(
            || {
                tries += 1;
                Err(io::Error::from_raw_os_error(libc::ENOMEM))
            },
            |d| slept += d,
        );
        assert_eq!(r.expect_err("gives up").raw_os_error(), Some(libc::ENOMEM));
        assert!(slept >= TRANSIENT_RETRY_BUDGET, "{slept:?}");
        assert!(tries < 40, "backs off: {tries} tries");
        let mut tries = 0;
        let r = retry_transient(
            || {
                tries += 1;
                Err(io::Error::from_raw_os_error(libc::EFAULT))
            },
            |_| panic!("EFAULT is not retried"),
        );
        assert_eq!(r.expect_err("fatal").raw_os_error(), Some(libc::EFAULT));
        assert_eq!(tries, 1);
    }

    #[test]
    fn page_checksum_is_crc32c_of_the_page() {
        #[repr(C, align(4096))]
        struct Page([u8; 4096]);
        let mut page = Page([0x5a; 4096]);
        page.0[17] = 3;
        let mut scratch = [0u64; 512];
        assert_eq!(
            page_crc32c(page.0.as_ptr() as u64, &mut scratch),
            crc32c::crc32c(&page.0)
        );
        // The CRC32C check value of "123456789" (RFC 3720, appendix B.4).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn swap_uffd_registers_anonymous_memory_for_write_protect() {
        crate::require!(UffdWriteProtect);
        let ram = crate::GuestRam::new(&[crate::RamRange::new(0, 1 << 20)]).expect("map");
        let (_, host) = ram.host_ranges()[0];
        let uffd = Uffd::new(FEATURE_PAGEFAULT_FLAG_WP).expect("userfaultfd with write-protect");
        let ioctls = uffd
            .register(host as u64, 1 << 20, true)
            .expect("register for missing and write-protect faults");
        assert_ne!(
            ioctls & 1 << 0x06,
            0,
            "UFFDIO_WRITEPROTECT allowed: {ioctls:#x}"
        );
        uffd.write_protect(host as u64, 1 << 20, true)
            .expect("write-protect the range");
        uffd.write_protect(host as u64, 1 << 20, false)
            .expect("and lift it");
    }
}
