//! Slot bookkeeping, pure: which blocks a request covers and which memslots they touch.

use std::ops::Range;

use crate::error::VirtioMemError;

/// The blocks a request covers, checked against the region the way the specification asks:
/// `addr` aligned to `block_size`, `nb_blocks` > 0, and every block inside the usable region
/// `region_addr..region_addr + usable_size`. Returns block indices relative to the region.
pub fn request_blocks(
    addr: u64,
    nb_blocks: u16,
    region_addr: u64,
    usable_size: u64,
    block_size: u64,
) -> Result<Range<usize>, VirtioMemError> {
    if !addr.is_multiple_of(block_size) {
        return Err(VirtioMemError::Unaligned { addr, block_size });
    }
    if nb_blocks == 0 {
        return Err(VirtioMemError::ZeroBlocks { addr });
    }
    let outside = || VirtioMemError::OutsideRegion { addr, nb_blocks };
    let len = u64::from(nb_blocks)
        .checked_mul(block_size)
        .ok_or_else(outside)?;
    let offset = addr.checked_sub(region_addr).ok_or_else(outside)?;
    if offset.checked_add(len).is_none_or(|end| end > usable_size) {
        return Err(outside());
    }
    let first = (offset / block_size) as usize;
    Ok(first..first + usize::from(nb_blocks))
}

/// The memslots (indices) that blocks `blocks` touch, with `blocks_per_slot` blocks each.
pub fn slots_of(blocks: &Range<usize>, blocks_per_slot: usize) -> Range<usize> {
    if blocks.is_empty() {
        return 0..0;
    }
    blocks.start / blocks_per_slot..(blocks.end - 1) / blocks_per_slot + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn request_blocks_checks_alignment_count_and_bounds() {
        let base = 4 * GIB;
        let bs = 2 * MIB;
        let usable = 64 * MIB;
        assert_eq!(
            request_blocks(base + 4 * MIB, 2, base, usable, bs).ok(),
            Some(2..4)
        );
        assert!(matches!(
            request_blocks(base + MIB, 1, base, usable, bs),
            Err(VirtioMemError::Unaligned { .. })
        ));
        assert!(matches!(
            request_blocks(base, 0, base, usable, bs),
            Err(VirtioMemError::ZeroBlocks { .. })
        ));
        assert!(matches!(
            request_blocks(base - bs, 1, base, usable, bs),
            Err(VirtioMemError::OutsideRegion { .. })
        ));
        assert!(matches!(
            request_blocks(base + usable - bs, 2, base, usable, bs),
            Err(VirtioMemError::OutsideRegion { .. })
        ));
        assert!(matches!(
            request_blocks(u64::MAX - bs + 1, 2, base, usable, bs),
            Err(VirtioMemError::OutsideRegion { .. })
        ));
        assert!(matches!(
            request_blocks(1 << 62, 4, 0, u64::MAX, 1 << 62),
            Err(VirtioMemError::OutsideRegion { .. })
        ));
        assert_eq!(
            request_blocks(base + usable - bs, 1, base, usable, bs).ok(),
            Some(31..32)
        );
    }

    #[test]
    fn slots_of_covers_first_to_last_touched_slot() {
        assert_eq!(slots_of(&(0..1), 64), 0..1);
        assert_eq!(slots_of(&(63..65), 64), 0..2);
        assert_eq!(slots_of(&(64..128), 64), 1..2);
        assert_eq!(slots_of(&(10..10), 64), 0..0);
    }
}
