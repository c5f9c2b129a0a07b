//! The per-VM swap file and its slot allocator.
//!
//! A slot is one page of the file. Slots are handed out lowest-first, so the file stays dense: its
//! length is the highest slot in use plus one, and the allocator never hands out more slots than
//! the VM has pages, so the file is never larger than the VM's RAM.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::PAGE_SIZE;

/// Where swapped pages are stored. [`SwapFile`] is the real one; tests wrap it to inject
/// failures.
pub trait SwapBacking: Send + Sync + fmt::Debug {
    /// Writes all bytes of `pages`, in order, at byte `offset`. `Ok` means the bytes have
    /// reached the storage device: a write error is reported here, never later at write-back,
    /// because the swapper drops the guest's copy of the pages once this returns.
    fn write_pages_at(&self, pages: &GuestPieces, offset: u64) -> io::Result<()>;
    /// Fills all of `buf` from byte `offset`. `buf` is page aligned and a whole page.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Truncates (or extends) the storage to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Path of the file, if it has one (the name it was created under: see [`SwapFile`]).
    fn path(&self) -> Option<&Path>;
}

/// How a [`SwapFile`] keeps its writes out of the host page cache, so that an overcommitting
/// host really gets the memory back (see `docs/swap.md`, "Durability", for the measurements
/// behind the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// `O_DIRECT`: writes go from guest RAM to the device, errors are those of the write
    /// itself, and nothing enters the page cache. The default; file systems without
    /// `O_DIRECT` (tmpfs before Linux 6.6) get [`WriteMode::Datasync`] instead.
    Direct,
    /// Buffered writes, each followed by `fdatasync` (write-back errors are seen before the
    /// call returns) and `POSIX_FADV_DONTNEED` on the range (the now clean pages leave the
    /// page cache).
    Datasync,
}

/// A swap file in a directory, unlinked as soon as it is open: it never outlives the process,
/// even one that is killed or aborts. [`SwapBacking::path`] still gives the name it had.
#[derive(Debug)]
pub struct SwapFile {
    file: File,
    path: PathBuf,
    mode: WriteMode,
}

impl SwapFile {
    /// Creates `memvisor-swap-<pid>-<n>-<nanos>.swap` in `dir` (never reusing an existing
    /// file), unlinks it, and writes with [`WriteMode::Direct`] where the file system allows.
    pub fn create(dir: &Path) -> io::Result<Self> {
        Self::create_with(dir, WriteMode::Direct)
    }

    /// Like [`SwapFile::create`] with the given write mode ([`WriteMode::Direct`] falls back to
    /// [`WriteMode::Datasync`] where the file system refuses `O_DIRECT`).
    pub fn create_with(dir: &Path, mode: WriteMode) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("memvisor-swap-{}-{n}-{nanos:09}.swap", std::process::id());
            let path = dir.join(name);
            let open = |direct: bool| {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 })
                    .open(&path)
            };
            let opened = match open(mode == WriteMode::Direct) {
                Err(e) if mode == WriteMode::Direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(
                        "no O_DIRECT in {}: swap writes are synced and dropped from the page \
                         cache instead",
                        dir.display()
                    );
                    open(false).map(|f| (f, WriteMode::Datasync))
                }
                other => other.map(|f| (f, mode)),
            };
            match opened {
                Ok((file, mode)) => {
                    // A crash from here on leaves nothing behind: the open fd keeps the data.
                    std::fs::remove_file(&path)?;
                    return Ok(SwapFile { file, path, mode });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The file's current length in bytes.
    pub fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// The write mode in force.
    pub fn mode(&self) -> WriteMode {
        self.mode
    }

    /// The open file (tests corrupt it, measure its page-cache footprint).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl SwapBacking for SwapFile {
    fn write_pages_at(&self, pages: &GuestPieces, offset: u64) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        super::uffd::pwritev_all(fd, &pages.pieces, offset)?;
        if self.mode == WriteMode::Datasync {
            super::uffd::datasync_and_drop_cache(fd, offset, pages.len_bytes())?;
        }
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

/// Guest pages to write, as pieces of host memory, written straight from guest RAM (no copy).
/// Only the swapper builds one, from guest RAM it keeps mapped for the write.
#[derive(Debug, Default)]
pub struct GuestPieces {
    pieces: Vec<(u64, usize)>,
}

impl GuestPieces {
    /// Appends `len` bytes at host address `addr`, merging with the previous piece if adjacent.
    /// The memory must stay mapped and readable while the value is used.
    pub(crate) fn push(&mut self, addr: u64, len: usize) {
        match self.pieces.last_mut() {
            Some((a, l)) if *a + *l as u64 == addr => *l += len,
            _ => self.pieces.push((addr, len)),
        }
    }

    /// Total bytes.
    pub fn len_bytes(&self) -> u64 {
        self.pieces.iter().map(|(_, l)| *l as u64).sum()
    }

    /// Number of host-contiguous pieces.
    pub fn pieces(&self) -> usize {
        self.pieces.len()
    }
}

/// Byte offset of a slot in the swap file.
pub fn slot_offset(slot: u32) -> u64 {
    u64::from(slot) * PAGE_SIZE
}

/// Dense slot allocator: always hands out the lowest free slot, at most `capacity` slots.
#[derive(Debug, Clone)]
pub struct SlotAllocator {
    /// One bit per slot, set = in use.
    used: Vec<u64>,
    capacity: u32,
    in_use: u32,
    /// Lowest word that may have a free bit (all words below are full).
    first_free_word: usize,
}

impl SlotAllocator {
    /// An allocator of `capacity` slots, all free.
    pub fn new(capacity: u32) -> Self {
        SlotAllocator {
            used: vec![0; (capacity as usize).div_ceil(64)],
            capacity,
            in_use: 0,
            first_free_word: 0,
        }
    }

    /// Number of slots in use.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Maximum number of slots.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// The lowest free slot, now in use; `None` when all `capacity` slots are in use.
    pub fn alloc(&mut self) -> Option<u32> {
        if self.in_use == self.capacity {
            return None;
        }
        for w in self.first_free_word..self.used.len() {
            let word = self.used[w];
            if word != u64::MAX {
                let bit = (!word).trailing_zeros();
                let slot = (w * 64) as u32 + bit;
                if slot >= self.capacity {
                    return None;
                }
                self.used[w] |= 1 << bit;
                self.in_use += 1;
                self.first_free_word = w;
                return Some(slot);
            }
        }
        None
    }

    /// Frees `slot`. Freeing a free slot is a bug in the caller and panics in debug builds.
    pub fn free(&mut self, slot: u32) {
        let (w, bit) = ((slot / 64) as usize, slot % 64);
        debug_assert!(self.used[w] & (1 << bit) != 0, "slot {slot} freed twice");
        if self.used[w] & (1 << bit) != 0 {
            self.used[w] &= !(1 << bit);
            self.in_use -= 1;
            self.first_free_word = self.first_free_word.min(w);
        }
    }

    /// Whether `slot` is in use.
    pub fn is_used(&self, slot: u32) -> bool {
        slot < self.capacity && self.used[(slot / 64) as usize] & (1 << (slot % 64)) != 0
    }

    /// One past the highest slot in use (0 when none is): the length, in slots, the file needs.
    pub fn high_water(&self) -> u32 {
        for w in (0..self.used.len()).rev() {
            let word = self.used[w];
            if word != 0 {
                return (w * 64) as u32 + 64 - word.leading_zeros();
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn slots_are_dense_from_zero_and_bounded_by_capacity() {
        let mut a = SlotAllocator::new(130);
        for i in 0..130 {
            assert_eq!(a.alloc(), Some(i));
        }
        assert_eq!(a.alloc(), None);
        assert_eq!(a.high_water(), 130);
        a.free(64);
        a.free(3);
        assert_eq!(a.alloc(), Some(3));
        assert_eq!(a.alloc(), Some(64));
        assert_eq!(a.alloc(), None);
    }

    #[test]
    fn high_water_drops_when_top_slots_are_freed() {
        let mut a = SlotAllocator::new(200);
        for _ in 0..100 {
            a.alloc();
        }
        for s in 50..100 {
            a.free(s);
        }
        assert_eq!(a.high_water(), 50);
        for s in 0..50 {
            a.free(s);
        }
        assert_eq!(a.high_water(), 0);
        assert_eq!(a.in_use(), 0);
    }

    /// A buffer of `pages` pages plus one, so that an aligned window of `pages` fits
    /// (`O_DIRECT` needs page-aligned memory; see `aligned_pieces`).
    fn aligned(pages: usize, byte: u8) -> Vec<[u8; 4096]> {
        vec![[byte; 4096]; pages + 1]
    }

    fn aligned_pieces(buf: &[[u8; 4096]], pages: usize) -> GuestPieces {
        let base = buf.as_ptr() as u64;
        let start = base.next_multiple_of(4096);
        let mut pieces = GuestPieces::default();
        for p in 0..pages as u64 {
            pieces.push(start + p * 4096, 4096);
        }
        pieces
    }

    #[repr(C, align(4096))]
    struct PageBuf([u8; 4096]);

    #[test]
    fn swap_file_is_unlinked_at_once_and_reads_back_what_was_written() {
        let dir = std::env::temp_dir();
        for mode in [WriteMode::Direct, WriteMode::Datasync] {
            let a = SwapFile::create_with(&dir, mode).expect("create");
            let b = SwapFile::create_with(&dir, mode).expect("create");
            assert_ne!(a.path, b.path);
            assert!(!a.path.exists(), "unlinked as soon as open");
            let data = aligned(2, 7);
            let pieces = aligned_pieces(&data, 2);
            assert_eq!(pieces.pieces(), 1, "adjacent pieces merge");
            a.write_pages_at(&pieces, slot_offset(1)).expect("write");
            assert_eq!(a.len_bytes().expect("len"), 3 * 4096);
            let mut back = PageBuf([0u8; 4096]);
            a.read_at(&mut back.0, slot_offset(2)).expect("read");
            assert!(back.0.iter().all(|b| *b == 7));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        Free(usize),
    }

    proptest! {
        /// Against a model: every allocation is the lowest free slot below capacity, slots are
        /// never handed out twice, and the high-water mark (the file length in slots) is the
        /// highest slot in use plus one, never more than capacity.
        #[test]
        fn slot_allocator_matches_a_lowest_free_model(
            capacity in 1u32..300,
            ops in proptest::collection::vec(
                prop_oneof![3 => Just(Op::Alloc), 2 => (0usize..1000).prop_map(Op::Free)],
                0..600,
            ),
        ) {
            let mut a = SlotAllocator::new(capacity);
            let mut model: BTreeSet<u32> = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Alloc => {
                        let expect = (0..capacity).find(|s| !model.contains(s));
                        let got = a.alloc();
                        prop_assert_eq!(got, expect);
                        if let Some(s) = got {
                            model.insert(s);
                        }
                    }
                    Op::Free(i) => {
                        if !model.is_empty() {
                            let s = *model.iter().nth(i % model.len()).expect("non-empty");
                            model.remove(&s);
                            a.free(s);
                        }
                    }
                }
                prop_assert_eq!(a.in_use() as usize, model.len());
                let hw = model.iter().next_back().map_or(0, |s| s + 1);
                prop_assert_eq!(a.high_water(), hw);
                prop_assert!(a.high_water() <= capacity);
                for s in 0..capacity {
                    prop_assert_eq!(a.is_used(s), model.contains(&s));
                }
            }
        }
    }
}
