//! Guest RAM: anonymous private mappings owned by the memory manager.
//!
//! Every range is mapped `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`, so that KSM
//! (`MADV_MERGEABLE`), userfaultfd and `MADV_DONTNEED` all work on the same memory, and a discard
//! really gives the pages back to the host. The `vmm` crate hands each region to KVM as a memslot.
//! Guest RAM is also marked `MADV_DONTDUMP`: a core dump of the VMM never carries a guest's
//! memory (its secrets, and gigabytes nobody needs to debug the VMM).

use std::io;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// Errors from creating or managing guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// A range has size zero or is not page aligned.
    #[error("guest RAM range at {addr:#x} of {size:#x} bytes is empty or not page aligned")]
    BadRange {
        /// Guest physical start address.
        addr: u64,
        /// Size in bytes.
        size: u64,
    },
    /// The host refused the mapping (usually: not enough address space or over-commit limits).
    #[error("cannot map {size_mib} MiB of guest RAM")]
    Map {
        /// Size of the refused mapping in MiB.
        size_mib: u64,
        /// Why the host refused.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Ranges overlap or are unordered.
    #[error("guest RAM ranges overlap")]
    Overlap,
    /// A guest range is not backed by RAM.
    #[error("guest range {addr:#x}+{len:#x} is not guest RAM")]
    NotRam {
        /// Guest physical start address.
        addr: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `madvise` failed.
    #[error("madvise({advice}) failed on guest RAM")]
    Madvise {
        /// Which advice was refused.
        advice: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The host page size this crate assumes for guest RAM bookkeeping.
pub const PAGE_SIZE: u64 = 4096;

/// Size of a transparent huge page on x86_64 ([`GuestRam::set_hugepages`]).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// One contiguous range of guest physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRange {
    /// Guest physical start address.
    pub start: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

impl RamRange {
    /// A range starting at `start` of `size` bytes.
    pub fn new(start: u64, size: u64) -> Self {
        RamRange {
            start: GuestAddress(start),
            size,
        }
    }
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start.0 + self.size
    }
}

/// Giving guest pages back to the host. [`GuestRam`] implements it; devices take it as a trait
/// object so their tests can use a fake that records the ranges.
pub trait DiscardRam: Send + Sync {
    /// Frees the host pages behind `len` bytes of guest RAM at `addr` (page aligned). They
    /// read as zero afterwards. A range that cannot be discarded is an error, never a silent
    /// success.
    fn discard_range(&self, addr: GuestAddress, len: u64) -> Result<(), RamError>;
}

impl DiscardRam for GuestRam {
    fn discard_range(&self, addr: GuestAddress, len: u64) -> Result<(), RamError> {
        self.discard(addr, len)
    }
}

/// Guest RAM of one VM.
#[derive(Debug, Clone)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    ranges: Vec<RamRange>,
}

impl GuestRam {
    /// Maps guest RAM for `ranges` (sorted, non-overlapping, page aligned).
    pub fn new(ranges: &[RamRange]) -> Result<Self, RamError> {
        let mut prev_end = 0u64;
        let mut regions = Vec::with_capacity(ranges.len());
        for (i, r) in ranges.iter().enumerate() {
            if r.size == 0 || r.size % PAGE_SIZE != 0 || r.start.0 % PAGE_SIZE != 0 {
                return Err(RamError::BadRange {
                    addr: r.start.0,
                    size: r.size,
                });
            }
            if i > 0 && r.start.0 < prev_end {
                return Err(RamError::Overlap);
            }
            prev_end = r.start.0.checked_add(r.size).ok_or(RamError::Overlap)?;
            let size = usize::try_from(r.size).map_err(|_| RamError::BadRange {
                addr: r.start.0,
                size: r.size,
            })?;
            let mapping = MmapRegionBuilder::new(size)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
                .build()
                .map_err(|source| RamError::Map {
                    size_mib: r.size >> 20,
                    source,
                })?;
            let region = GuestRegionMmap::new(mapping, r.start).ok_or(RamError::Overlap)?;
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|_| RamError::Overlap)?;
        let ram = GuestRam {
            mem,
            ranges: ranges.to_vec(),
        };
        for r in &ram.ranges {
            ram.madvise(r.start, r.size, libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
        }
        Ok(ram)
    }

    /// The guest memory, for devices and loaders.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Guest memory made of this RAM's regions and `other`'s (the same host mappings, nothing
    /// copied): what a device sees when the guest may hand it buffers in either, e.g. in guest
    /// RAM and in a hotplug region.
    pub fn joined(&self, other: &GuestRam) -> Result<GuestMemoryMmap, RamError> {
        let mut mem = self.mem.clone();
        for r in &other.ranges {
            // Taking a region out of `other`'s collection hands back its `Arc` and leaves
            // `other` as it is (collections are immutable).
            let (_, region) =
                other
                    .mem
                    .remove_region(r.start, r.size)
                    .map_err(|_| RamError::NotRam {
                        addr: r.start.0,
                        len: r.size,
                    })?;
            mem = mem.insert_region(region).map_err(|_| RamError::Overlap)?;
        }
        Ok(mem)
    }

    /// The ranges this RAM covers.
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total guest RAM in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    /// Host virtual address and length of each range, in guest address order.
    pub fn host_ranges(&self) -> Vec<(RamRange, *mut u8)> {
        self.mem
            .iter()
            .map(|reg| {
                (
                    RamRange {
                        start: reg.start_addr(),
                        size: reg.len(),
                    },
                    reg.as_ptr(),
                )
            })
            .collect()
    }

    /// Host address of `len` bytes at guest address `addr`, if they lie within one range.
    fn host_slice(&self, addr: GuestAddress, len: u64) -> Result<*mut u8, RamError> {
        let bad = || RamError::NotRam { addr: addr.0, len };
        let region = self.mem.find_region(addr).ok_or_else(bad)?;
        let offset = addr.0 - region.start_addr().0;
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(bad());
        }
        // `offset` is within the region, checked above.
        Ok(region.as_ptr().wrapping_add(offset as usize))
    }

    fn madvise(
        &self,
        addr: GuestAddress,
        len: u64,
        advice: libc::c_int,
        name: &'static str,
    ) -> Result<(), RamError> {
        let ptr = self.host_slice(addr, len)?;
        // SAFETY: `ptr..ptr+len` lies inside a mapping this object owns (checked by
        // `host_slice`); the advices used here do not invalidate Rust references because guest
        // memory is only ever accessed through volatile slices.
        let ret = unsafe { libc::madvise(ptr.cast(), len as usize, advice) };
        if ret != 0 {
            return Err(RamError::Madvise {
                advice: name,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Gives the pages of a guest range back to the host. They read as zero afterwards.
    /// `addr` and `len` must be page aligned; a failure is reported, never hidden.
    pub fn discard(&self, addr: GuestAddress, len: u64) -> Result<(), RamError> {
        if !addr.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(RamError::BadRange {
                addr: addr.0,
                size: len,
            });
        }
        self.madvise(addr, len, libc::MADV_DONTNEED, "MADV_DONTNEED")
    }

    /// Marks (or unmarks) all of guest RAM as a KSM merge candidate.
    pub fn set_mergeable(&self, mergeable: bool) -> Result<(), RamError> {
        let (advice, name) = if mergeable {
            (libc::MADV_MERGEABLE, "MADV_MERGEABLE")
        } else {
            (libc::MADV_UNMERGEABLE, "MADV_UNMERGEABLE")
        };
        for r in &self.ranges {
            self.madvise(r.start, r.size, advice, name)?;
        }
        Ok(())
    }

    /// Asks the host to back guest RAM with transparent huge pages (`MADV_HUGEPAGE`), or not.
    /// Huge pages cut page faults 512-fold when the VMM loads the kernel and when the guest
    /// first touches memory, and cut TLB misses for the guest. A discard of part of a huge page
    /// splits it; the host frees the discarded part when it next reclaims split pages.
    pub fn set_hugepages(&self, on: bool) -> Result<(), RamError> {
        let (advice, name) = if on {
            (libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")
        } else {
            (libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")
        };
        for r in &self.ranges {
            self.madvise(r.start, r.size, advice, name)?;
        }
        Ok(())
    }

    /// Bytes of guest RAM currently resident in host memory (via `mincore`).
    pub fn resident_bytes(&self) -> io::Result<u64> {
        let mut total = 0u64;
        let mut vec = Vec::new();
        for (range, ptr) in self.host_ranges() {
            let pages = (range.size / PAGE_SIZE) as usize;
            vec.resize(pages, 0u8);
            // SAFETY: `ptr` is the start of a live mapping of `range.size` bytes owned by self,
            // and `vec` has one byte per page of it as mincore requires.
            let ret = unsafe { libc::mincore(ptr.cast(), range.size as usize, vec.as_mut_ptr()) };
            if ret != 0 {
                return Err(io::Error::last_os_error());
            }
            total += vec.iter().filter(|b| **b & 1 != 0).count() as u64 * PAGE_SIZE;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// The `VmFlags` of the mapping that holds `addr`, from `/proc/self/smaps`.
    fn vm_flags(addr: *mut u8) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let addr = addr as usize;
        let holds = |l: &str| {
            let Some((range, _)) = l.split_once(' ') else {
                return false;
            };
            let Some((a, b)) = range.split_once('-') else {
                return false;
            };
            match (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                (Ok(a), Ok(b)) => a <= addr && addr < b,
                _ => false,
            }
        };
        let mut lines = smaps.lines().skip_while(|l| !holds(l));
        assert!(lines.next().is_some(), "no mapping holds {addr:#x}");
        let flags = lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("VmFlags line");
        flags.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn guest_ram_is_left_out_of_core_dumps() {
        let ram = two_ranges();
        for (_, ptr) in ram.host_ranges() {
            let flags = vm_flags(ptr);
            assert!(flags.iter().any(|f| f == "dd"), "{flags:?}");
        }
    }

    fn two_ranges() -> GuestRam {
        GuestRam::new(&[RamRange::new(0, 1 << 20), RamRange::new(4 << 20, 2 << 20)]).expect("map")
    }

    #[test]
    fn ranges_must_be_aligned_and_ordered() {
        assert!(matches!(
            GuestRam::new(&[RamRange::new(0, 100)]),
            Err(RamError::BadRange { .. })
        ));
        assert!(matches!(
            GuestRam::new(&[RamRange::new(0, 0)]),
            Err(RamError::BadRange { .. })
        ));
        assert!(matches!(
            GuestRam::new(&[RamRange::new(0, 2 << 20), RamRange::new(1 << 20, 1 << 20)]),
            Err(RamError::Overlap)
        ));
    }

    #[test]
    fn discard_frees_and_zeroes_pages() {
        let ram = two_ranges();
        assert_eq!(ram.size_bytes(), 3 << 20);
        let buf = vec![0xabu8; 64 << 10];
        ram.memory()
            .write_slice(&buf, GuestAddress(4 << 20))
            .expect("write");
        let before = ram.resident_bytes().expect("mincore");
        assert!(before >= 64 << 10, "written pages are resident");
        ram.discard(GuestAddress(4 << 20), 64 << 10)
            .expect("discard");
        let after = ram.resident_bytes().expect("mincore");
        assert_eq!(before - after, 64 << 10);
        let mut back = vec![1u8; 64 << 10];
        ram.memory()
            .read_slice(&mut back, GuestAddress(4 << 20))
            .expect("read");
        assert!(back.iter().all(|b| *b == 0));
    }

    #[test]
    fn discard_outside_ram_is_an_error_not_a_silent_success() {
        let ram = two_ranges();
        assert!(matches!(
            ram.discard(GuestAddress(2 << 20), 4096),
            Err(RamError::NotRam { .. })
        ));
        // Straddles the end of the first range.
        assert!(matches!(
            ram.discard(GuestAddress((1 << 20) - 4096), 8192),
            Err(RamError::NotRam { .. })
        ));
        assert!(matches!(
            ram.discard(GuestAddress(100), 4096),
            Err(RamError::BadRange { .. })
        ));
    }

    #[test]
    fn joined_memory_sees_both_and_overlaps_are_refused() {
        let ram = GuestRam::new(&[RamRange::new(0, 1 << 20)]).expect("ram");
        let region = GuestRam::new(&[RamRange::new(4 << 20, 2 << 20)]).expect("region");
        let both = ram.joined(&region).expect("disjoint");
        both.write_obj(0x5au8, GuestAddress((4 << 20) + 7))
            .expect("write through the joined view");
        let back: u8 = region
            .memory()
            .read_obj(GuestAddress((4 << 20) + 7))
            .expect("read");
        assert_eq!(back, 0x5a, "the same host memory");
        assert_eq!(ram.ranges().len(), 1, "ram itself is unchanged");
        assert_eq!(
            region.memory().num_regions(),
            1,
            "region itself is unchanged"
        );
        let overlapping = GuestRam::new(&[RamRange::new(0, 2 << 20)]).expect("overlapping");
        assert!(matches!(ram.joined(&overlapping), Err(RamError::Overlap)));
    }

    #[test]
    fn hugepages_can_be_toggled() {
        let ram = two_ranges();
        // THP may be compiled out or set to "never"; then the advice may be refused, and we say so.
        match ram.set_hugepages(true) {
            Ok(()) => ram.set_hugepages(false).expect("no huge pages"),
            Err(RamError::Madvise { advice, .. }) => assert_eq!(advice, "MADV_HUGEPAGE"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }

    #[test]
    fn mergeable_can_be_toggled() {
        let ram = two_ranges();
        // KSM may be compiled out of the host kernel; then the advice is refused, and we say so.
        match ram.set_mergeable(true) {
            Ok(()) => ram.set_mergeable(false).expect("unmerge"),
            Err(RamError::Madvise { advice, .. }) => assert_eq!(advice, "MADV_MERGEABLE"),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}
