//! The plugged-block bitmap: one bit per memory block of the hotplug region.
//!
//! Range operations work a 64-bit word at a time, so plugging or querying a run of blocks costs
//! one operation per 64 blocks, and the number of plugged blocks is kept up to date so that
//! `plugged_size` never needs a scan.

use std::ops::Range;

/// The state of a range of blocks, as a STATE request reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeState {
    /// Every block of the range is plugged.
    Plugged,
    /// Every block of the range is unplugged.
    Unplugged,
    /// Some blocks are plugged, some are not.
    Mixed,
}

/// One bit per block; a set bit is a plugged block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockBitmap {
    words: Vec<u64>,
    len: usize,
    plugged: usize,
}

/// The bits of word `w` that `blocks` covers.
fn word_mask(w: usize, blocks: &Range<usize>) -> u64 {
    let word_start = w * 64;
    let lo = blocks.start.max(word_start) - word_start;
    let hi = blocks.end.min(word_start + 64) - word_start;
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl BlockBitmap {
    /// A bitmap of `len` blocks, all unplugged.
    pub fn new(len: usize) -> Self {
        BlockBitmap {
            words: vec![0; len.div_ceil(64)],
            len,
            plugged: 0,
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the bitmap has no blocks at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of plugged blocks.
    pub fn plugged(&self) -> usize {
        self.plugged
    }

    /// Whether block `index` is plugged; blocks past the end are not.
    pub fn is_plugged(&self, index: usize) -> bool {
        index < self.len && self.words[index / 64] & (1 << (index % 64)) != 0
    }

    fn words_of(blocks: &Range<usize>) -> Range<usize> {
        blocks.start / 64..blocks.end.div_ceil(64)
    }

    fn check(&self, blocks: &Range<usize>) {
        assert!(
            blocks.start <= blocks.end && blocks.end <= self.len,
            "block range {blocks:?} outside a bitmap of {} blocks",
            self.len
        );
    }

    /// Number of plugged blocks in `blocks` (which must lie within the bitmap).
    pub fn count_plugged(&self, blocks: Range<usize>) -> usize {
        self.check(&blocks);
        if blocks.is_empty() {
            return 0;
        }
        Self::words_of(&blocks)
            .map(|w| (self.words[w] & word_mask(w, &blocks)).count_ones() as usize)
            .sum()
    }

    /// The state of `blocks` (non-empty, within the bitmap).
    pub fn range_state(&self, blocks: Range<usize>) -> RangeState {
        let n = blocks.len();
        match self.count_plugged(blocks) {
            0 => RangeState::Unplugged,
            p if p == n => RangeState::Plugged,
            _ => RangeState::Mixed,
        }
    }

    /// Marks `blocks` plugged (or unplugged), whatever they were before.
    pub fn set_range(&mut self, blocks: Range<usize>, plugged: bool) {
        self.check(&blocks);
        if blocks.is_empty() {
            return;
        }
        for w in Self::words_of(&blocks) {
            let mask = word_mask(w, &blocks);
            let before = (self.words[w] & mask).count_ones() as usize;
            if plugged {
                self.words[w] |= mask;
                self.plugged += mask.count_ones() as usize - before;
            } else {
                self.words[w] &= !mask;
                self.plugged -= before;
            }
        }
    }

    /// Unplugs every block.
    pub fn clear(&mut self) {
        self.words.fill(0);
        self.plugged = 0;
    }

    /// The maximal runs of plugged blocks, in order.
    pub fn plugged_runs(&self) -> Vec<Range<usize>> {
        let mut runs = Vec::new();
        let mut start = None;
        let mut index = 0;
        while index < self.len {
            let word = self.words[index / 64];
            // Skip whole words that cannot change the current state.
            if index.is_multiple_of(64) && index + 64 <= self.len {
                if start.is_none() && word == 0 {
                    index += 64;
                    continue;
                }
                if start.is_some() && word == u64::MAX {
                    index += 64;
                    continue;
                }
            }
            let bit = word & (1 << (index % 64)) != 0;
            match (bit, start) {
                (true, None) => start = Some(index),
                (false, Some(s)) => {
                    runs.push(s..index);
                    start = None;
                }
                _ => {}
            }
            index += 1;
        }
        if let Some(s) = start {
            runs.push(s..self.len);
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_across_word_boundaries_are_counted_exactly() {
        let mut b = BlockBitmap::new(200);
        b.set_range(60..130, true);
        assert_eq!(b.plugged(), 70);
        assert_eq!(b.count_plugged(0..200), 70);
        assert_eq!(b.count_plugged(64..128), 64);
        assert_eq!(b.range_state(60..130), RangeState::Plugged);
        assert_eq!(b.range_state(59..61), RangeState::Mixed);
        assert_eq!(b.range_state(130..200), RangeState::Unplugged);
        b.set_range(100..101, false);
        assert_eq!(b.plugged_runs(), vec![60..100, 101..130]);
        b.clear();
        assert_eq!(b.plugged(), 0);
        assert!(b.plugged_runs().is_empty());
    }

    #[test]
    fn run_reaching_the_end_is_reported() {
        let mut b = BlockBitmap::new(128);
        b.set_range(0..128, true);
        assert_eq!(b.plugged_runs(), vec![0..128]);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Set(usize, usize, bool),
        Clear,
    }

    fn op(len: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            10 => (0..len, 0..len, any::<bool>()).prop_map(|(a, b, p)| Op::Set(a.min(b), a.max(b) + 1, p)),
            1 => Just(Op::Clear),
        ]
    }

    fn model_runs(model: &[bool]) -> Vec<Range<usize>> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < model.len() {
            if model[i] {
                let s = i;
                while i < model.len() && model[i] {
                    i += 1;
                }
                runs.push(s..i);
            } else {
                i += 1;
            }
        }
        runs
    }

    proptest! {
        /// The bitmap agrees with a `Vec<bool>` model after any sequence of range operations:
        /// every bit, the plugged count, counts and states of arbitrary ranges, and the runs.
        #[test]
        fn bitmap_matches_a_bool_vector(
            (len, ops, queries) in (1usize..300).prop_flat_map(|len| (
                Just(len),
                proptest::collection::vec(op(len), 0..40),
                proptest::collection::vec((0..len, 0..len), 1..20),
            ))
        ) {
            let mut bitmap = BlockBitmap::new(len);
            let mut model = vec![false; len];
            for op in ops {
                match op {
                    Op::Set(s, e, p) => {
                        bitmap.set_range(s..e, p);
                        model[s..e].fill(p);
                    }
                    Op::Clear => {
                        bitmap.clear();
                        model.fill(false);
                    }
                }
            }
            for (i, m) in model.iter().enumerate() {
                prop_assert_eq!(bitmap.is_plugged(i), *m);
            }
            prop_assert_eq!(bitmap.plugged(), model.iter().filter(|b| **b).count());
            for (a, b) in queries {
                let r = a.min(b)..a.max(b) + 1;
                let expected = model[r.clone()].iter().filter(|b| **b).count();
                prop_assert_eq!(bitmap.count_plugged(r.clone()), expected);
                let state = match expected {
                    0 => RangeState::Unplugged,
                    n if n == r.len() => RangeState::Plugged,
                    _ => RangeState::Mixed,
                };
                prop_assert_eq!(bitmap.range_state(r), state);
            }
            prop_assert_eq!(bitmap.plugged_runs(), model_runs(&model));
        }
    }
}
