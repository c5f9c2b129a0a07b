//! Page ages: for each guest page, how many sampling intervals have passed since it was last
//! written. The swapper swaps the oldest pages first.
//!
//! The ages come from a dirty bitmap sampled once per interval through [`DirtyLog`], which the
//! VMM implements with KVM's dirty log (`KVM_GET_DIRTY_LOG` on each memslot: one bit per page,
//! set if the guest wrote the page since the previous call).

use std::io;

/// The source of dirty bitmaps, one per guest RAM range (in [`crate::GuestRam::ranges`] order).
pub trait DirtyLog {
    /// The pages of range `range_idx` written since the previous call for that range: bit `i`
    /// of word `i / 64` is page `i` of the range (KVM's layout). A bitmap shorter than the range
    /// means "not written" for the missing pages.
    fn dirty_pages(&mut self, range_idx: usize) -> io::Result<Vec<u64>>;
}

/// Ages of every guest page, in intervals since the last write, saturating at [`Ages::MAX`].
#[derive(Debug, Clone)]
pub struct Ages {
    /// Per range, one age per page.
    ranges: Vec<Vec<u8>>,
    samples: u64,
}

impl Ages {
    /// The saturation value: a page this old has not been written for at least this many
    /// intervals.
    pub const MAX: u8 = u8::MAX;

    /// Ages for ranges of the given page counts, all 0 (as if just written: nothing is known).
    pub fn new(pages_per_range: &[usize]) -> Self {
        Ages {
            ranges: pages_per_range.iter().map(|n| vec![0; *n]).collect(),
            samples: 0,
        }
    }

    /// Applies one interval's bitmap to range `range_idx`: written pages become 0, the others
    /// grow one older (saturating).
    pub fn record_interval(&mut self, range_idx: usize, dirty: &[u64]) {
        let Some(ages) = self.ranges.get_mut(range_idx) else {
            return;
        };
        for (i, age) in ages.iter_mut().enumerate() {
            let written = dirty.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0);
            *age = if written { 0 } else { age.saturating_add(1) };
        }
    }

    /// Samples every range from `log` once (one interval). A range whose bitmap cannot be read
    /// keeps its ages; the first error is returned after all ranges were tried.
    pub fn sample(&mut self, log: &mut dyn DirtyLog) -> io::Result<()> {
        let mut first_err = None;
        for idx in 0..self.ranges.len() {
            match log.dirty_pages(idx) {
                Ok(bitmap) => self.record_interval(idx, &bitmap),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        self.samples += 1;
        first_err.map_or(Ok(()), Err)
    }

    /// Age of page `page` of range `range_idx`.
    pub fn age(&self, range_idx: usize, page: usize) -> u8 {
        self.ranges
            .get(range_idx)
            .and_then(|r| r.get(page))
            .copied()
            .unwrap_or(0)
    }

    /// How many intervals were sampled.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Per range, the ages of its pages.
    pub fn ranges(&self) -> &[Vec<u8>] {
        &self.ranges
    }

    /// The pages (range index, page index) for which `keep` holds, oldest first; pages of equal
    /// age come in address order.
    pub fn oldest_first(&self, mut keep: impl FnMut(usize, usize) -> bool) -> Vec<(usize, usize)> {
        let mut buckets: Vec<Vec<(usize, usize)>> = vec![Vec::new(); usize::from(Self::MAX) + 1];
        for (r, ages) in self.ranges.iter().enumerate() {
            for (p, age) in ages.iter().enumerate() {
                if keep(r, p) {
                    buckets[usize::from(*age)].push((r, p));
                }
            }
        }
        buckets.into_iter().rev().flatten().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Replays scripted bitmaps per range.
    struct FakeDirtyLog {
        script: Vec<VecDeque<io::Result<Vec<u64>>>>,
    }

    impl DirtyLog for FakeDirtyLog {
        fn dirty_pages(&mut self, range_idx: usize) -> io::Result<Vec<u64>> {
            self.script[range_idx].pop_front().unwrap_or(Ok(Vec::new()))
        }
    }

    #[test]
    fn written_pages_reset_and_others_age() {
        let mut ages = Ages::new(&[3]);
        ages.record_interval(0, &[0b000]);
        ages.record_interval(0, &[0b010]);
        assert_eq!([ages.age(0, 0), ages.age(0, 1), ages.age(0, 2)], [2, 0, 2]);
        ages.record_interval(0, &[0b001]);
        assert_eq!([ages.age(0, 0), ages.age(0, 1), ages.age(0, 2)], [0, 1, 3]);
    }

    #[test]
    fn ages_saturate_instead_of_wrapping() {
        let mut ages = Ages::new(&[1]);
        for _ in 0..300 {
            ages.record_interval(0, &[]);
        }
        assert_eq!(ages.age(0, 0), Ages::MAX);
    }

    #[test]
    fn bitmap_words_beyond_64_pages_are_used() {
        let mut ages = Ages::new(&[130]);
        ages.record_interval(0, &[0, 0, 0]);
        ages.record_interval(0, &[0, 1 << 1, 1 << 1]);
        assert_eq!(ages.age(0, 65), 0);
        assert_eq!(ages.age(0, 129), 0);
        assert_eq!(ages.age(0, 64), 2);
        assert_eq!(ages.age(0, 128), 2);
    }

    #[test]
    fn sample_reads_every_range_and_keeps_ages_of_a_failed_one() {
        let mut log = FakeDirtyLog {
            script: vec![
                VecDeque::from([Ok(vec![0b1]), Ok(vec![0b0])]),
                VecDeque::from([Ok(vec![0b0]), Err(io::Error::other("no log"))]),
            ],
        };
        let mut ages = Ages::new(&[2, 2]);
        ages.sample(&mut log).expect("first sample");
        assert_eq!(ages.age(0, 0), 0);
        assert_eq!(ages.age(1, 0), 1);
        assert!(ages.sample(&mut log).is_err());
        assert_eq!(ages.age(0, 0), 1, "range 0 still sampled");
        assert_eq!(ages.age(1, 0), 1, "range 1 kept its ages");
        assert_eq!(ages.samples(), 2);
    }

    #[test]
    fn oldest_first_orders_by_age_then_address() {
        let mut ages = Ages::new(&[4, 2]);
        ages.record_interval(0, &[0b0000]);
        ages.record_interval(1, &[0b00]);
        ages.record_interval(0, &[0b0101]);
        ages.record_interval(1, &[0b10]);
        // Ages: range 0 = [0, 2, 0, 2], range 1 = [2, 0].
        let order = ages.oldest_first(|_, _| true);
        assert_eq!(order, vec![(0, 1), (0, 3), (1, 0), (0, 0), (0, 2), (1, 1)]);
        let filtered = ages.oldest_first(|r, _| r == 1);
        assert_eq!(filtered, vec![(1, 0), (1, 1)]);
    }
}
