//! The one place this crate calls the OS directly.

use std::io;

use memory::GuestRam;

/// Size of a transparent huge page on x86_64.
pub(crate) const THP_SIZE: u64 = 2 << 20;

/// Asks for transparent huge pages behind all of `ram` (`MADV_HUGEPAGE`): plugged memory then
/// faults in 2 MiB at a time, and unplugging a 2 MiB block frees one huge page instead of 512
/// small ones. It changes no memory contents; KSM and userfaultfd keep working (they split huge
/// pages as needed). An error means the host has no transparent huge pages; memory still works.
pub(crate) fn advise_hugepages(ram: &GuestRam) -> io::Result<()> {
    for (range, ptr) in ram.host_ranges() {
        // SAFETY: `ptr..ptr + range.size` is a live mapping owned by `ram` (its host range);
        // MADV_HUGEPAGE only changes how future faults are served, not any memory Rust can see.
        let ret = unsafe { libc::madvise(ptr.cast(), range.size as usize, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
