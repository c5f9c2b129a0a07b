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
    /// Writes all bytes of `pages`, in order, at byte `offset`.
    fn write_pages_at(&self, pages: &GuestPieces, offset: u64) -> io::Result<()>;
    /// Fills all of `buf` from byte `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Truncates (or extends) the storage to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Path of the file, if it has one.
    fn path(&self) -> Option<&Path>;
}

/// A swap file with a unique name in a directory, removed when dropped.
#[derive(Debug)]
pub struct SwapFile {
    file: File,
    path: PathBuf,
}

impl SwapFile {
    /// Creates `memvisor-swap-<pid>-<n>-<nanos>.swap` in `dir` (never reusing an existing file).
    pub fn create(dir: &Path) -> io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("memvisor-swap-{}-{n}-{nanos:09}.swap", std::process::id());
            let path = dir.join(name);
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
            {
                Ok(file) => return Ok(SwapFile { file, path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The file's current length in bytes.
    pub fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

impl Drop for SwapFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("cannot remove swap file {}: {e}", self.path.display());
        }
    }
}

impl SwapBacking for SwapFile {
    fn write_pages_at(&self, pages: &GuestPieces, offset: u64) -> io::Result<()> {
        super::uffd::pwritev_all(self.file.as_raw_fd(), &pages.pieces, offset)
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

    #[test]
    fn swap_file_has_a_unique_name_and_is_removed_on_drop() {
        let dir = std::env::temp_dir();
        let a = SwapFile::create(&dir).expect("create");
        let b = SwapFile::create(&dir).expect("create");
        assert_ne!(a.path, b.path);
        let path = a.path.clone();
        let data = [7u8; 8192];
        let mut pieces = GuestPieces::default();
        pieces.push(data.as_ptr() as u64, 4096);
        pieces.push(data.as_ptr() as u64 + 4096, 4096);
        assert_eq!(pieces.pieces(), 1, "adjacent pieces merge");
        a.write_pages_at(&pieces, slot_offset(1)).expect("write");
        assert_eq!(a.len_bytes().expect("len"), 3 * 4096);
        let mut back = [0u8; 4096];
        a.read_at(&mut back, slot_offset(2)).expect("read");
        assert!(back.iter().all(|b| *b == 7));
        drop(a);
        assert!(!path.exists());
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
