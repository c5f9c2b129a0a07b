//! Pure helpers: the request and response wire formats (virtio 1.2, 5.15.6), where the hotplug
//! region goes in the guest physical address space, and how it splits into memslots.

use std::ops::Range;

use crate::device::VirtioMemError;

/// Size of every request (`struct virtio_mem_req`).
pub const REQUEST_SIZE: usize = 24;
/// Size of every response (`struct virtio_mem_resp`).
pub const RESPONSE_SIZE: usize = 10;

/// `VIRTIO_MEM_REQ_PLUG`.
pub const REQ_PLUG: u16 = 0;
/// `VIRTIO_MEM_REQ_UNPLUG`.
pub const REQ_UNPLUG: u16 = 1;
/// `VIRTIO_MEM_REQ_UNPLUG_ALL`.
pub const REQ_UNPLUG_ALL: u16 = 2;
/// `VIRTIO_MEM_REQ_STATE`.
pub const REQ_STATE: u16 = 3;

/// `VIRTIO_MEM_RESP_ACK`.
pub const RESP_ACK: u16 = 0;
/// `VIRTIO_MEM_RESP_NACK`.
pub const RESP_NACK: u16 = 1;
/// `VIRTIO_MEM_RESP_BUSY`.
pub const RESP_BUSY: u16 = 2;
/// `VIRTIO_MEM_RESP_ERROR`.
pub const RESP_ERROR: u16 = 3;

/// `VIRTIO_MEM_STATE_PLUGGED`.
pub const STATE_PLUGGED: u16 = 0;
/// `VIRTIO_MEM_STATE_UNPLUGGED`.
pub const STATE_UNPLUGGED: u16 = 1;
/// `VIRTIO_MEM_STATE_MIXED`.
pub const STATE_MIXED: u16 = 2;

/// Linux's memory block size on x86_64 (also its sparsemem section size): hotplugged memory is
/// added to the guest in units of this, so the region is aligned to it.
pub const LINUX_MEMORY_BLOCK_SIZE: u64 = 128 << 20;
/// Start of the 32-bit MMIO hole of the x86_64 guest layout (3 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Highest guest physical address (exclusive) Linux x86_64 accepts for hotplugged memory with
/// 4-level paging (`MAX_PHYSMEM_BITS` = 46).
pub const MAX_GUEST_PHYS_ADDR: u64 = 1 << 46;

/// A request from the guest, decoded. Padding is ignored, as the specification requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Plug `nb_blocks` blocks from `addr`.
    Plug {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
    /// Unplug `nb_blocks` blocks from `addr`.
    Unplug {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
    /// Unplug every block.
    UnplugAll,
    /// Report the state of `nb_blocks` blocks from `addr`.
    State {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
}

/// The device's answer to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    /// Done (`VIRTIO_MEM_RESP_ACK`).
    Ack,
    /// Done, with the state of the queried blocks (`VIRTIO_MEM_RESP_ACK` + `STATE_*`).
    AckState(u16),
    /// Denied, e.g. plugging beyond the requested size (`VIRTIO_MEM_RESP_NACK`).
    Nack,
    /// Cannot be processed now, retry later (`VIRTIO_MEM_RESP_BUSY`).
    Busy,
    /// The request is wrong (`VIRTIO_MEM_RESP_ERROR`).
    Error,
}

impl Response {
    /// The `type` field of the response.
    pub fn type_code(self) -> u16 {
        match self {
            Response::Ack | Response::AckState(_) => RESP_ACK,
            Response::Nack => RESP_NACK,
            Response::Busy => RESP_BUSY,
            Response::Error => RESP_ERROR,
        }
    }

    /// The 10 bytes of `struct virtio_mem_resp`, little endian.
    pub fn to_bytes(self) -> [u8; RESPONSE_SIZE] {
        let mut b = [0u8; RESPONSE_SIZE];
        b[0..2].copy_from_slice(&self.type_code().to_le_bytes());
        if let Response::AckState(state) = self {
            b[8..10].copy_from_slice(&state.to_le_bytes());
        }
        b
    }
}

/// Decodes the 24 bytes of `struct virtio_mem_req`.
pub fn parse_request(bytes: &[u8; REQUEST_SIZE]) -> Result<Request, VirtioMemError> {
    let request_type = u16::from_le_bytes([bytes[0], bytes[1]]);
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&bytes[8..16]);
    let addr = u64::from_le_bytes(addr);
    let nb_blocks = u16::from_le_bytes([bytes[16], bytes[17]]);
    match request_type {
        REQ_PLUG => Ok(Request::Plug { addr, nb_blocks }),
        REQ_UNPLUG => Ok(Request::Unplug { addr, nb_blocks }),
        REQ_UNPLUG_ALL => Ok(Request::UnplugAll),
        REQ_STATE => Ok(Request::State { addr, nb_blocks }),
        other => Err(VirtioMemError::UnknownRequest {
            request_type: other,
        }),
    }
}

/// Encodes a request as the guest driver would (tests and benchmarks play the driver).
pub fn encode_request(request: Request) -> [u8; REQUEST_SIZE] {
    let (t, addr, nb) = match request {
        Request::Plug { addr, nb_blocks } => (REQ_PLUG, addr, nb_blocks),
        Request::Unplug { addr, nb_blocks } => (REQ_UNPLUG, addr, nb_blocks),
        Request::UnplugAll => (REQ_UNPLUG_ALL, 0, 0),
        Request::State { addr, nb_blocks } => (REQ_STATE, addr, nb_blocks),
    };
    let mut b = [0u8; REQUEST_SIZE];
    b[0..2].copy_from_slice(&t.to_le_bytes());
    b[8..16].copy_from_slice(&addr.to_le_bytes());
    b[16..18].copy_from_slice(&nb.to_le_bytes());
    b
}

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

/// Where to put a hotplug region of `region_size` bytes, given guest RAM as (start, size)
/// ranges: above all RAM, aligned to [`LINUX_MEMORY_BLOCK_SIZE`], and not in the 3–4 GiB MMIO
/// hole (above 4 GiB when the RAM reaches the hole or the region would cross into it).
pub fn place_region(ram: &[(u64, u64)], region_size: u64) -> Result<u64, VirtioMemError> {
    let no_room = || VirtioMemError::NoRoomForRegion { region_size };
    if region_size == 0 {
        return Err(VirtioMemError::EmptyRegion);
    }
    let mut ram_end = 0u64;
    for &(start, size) in ram {
        ram_end = ram_end.max(start.checked_add(size).ok_or_else(no_room)?);
    }
    let align = |a: u64| -> Result<u64, VirtioMemError> {
        a.checked_next_multiple_of(LINUX_MEMORY_BLOCK_SIZE)
            .ok_or_else(no_room)
    };
    let mut addr = align(ram_end)?;
    let crosses_hole = |a: u64| {
        a.checked_add(region_size)
            .is_none_or(|end| end > MMIO_HOLE_START && a < MMIO_HOLE_END)
    };
    if crosses_hole(addr) {
        addr = align(addr.max(MMIO_HOLE_END))?;
    }
    let end = addr.checked_add(region_size).ok_or_else(no_room)?;
    if end > MAX_GUEST_PHYS_ADDR {
        return Err(no_room());
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn requests_round_trip_and_padding_is_ignored() {
        for r in [
            Request::Plug {
                addr: 0x1_4000_0000,
                nb_blocks: 3,
            },
            Request::Unplug {
                addr: 0x1_4020_0000,
                nb_blocks: 1,
            },
            Request::UnplugAll,
            Request::State {
                addr: 0x1_4000_0000,
                nb_blocks: 65535,
            },
        ] {
            let mut b = encode_request(r);
            b[2..8].fill(0xaa);
            b[18..24].fill(0xbb);
            assert_eq!(parse_request(&b).expect("known type"), r);
        }
        let mut b = encode_request(Request::UnplugAll);
        b[0] = 9;
        assert!(matches!(
            parse_request(&b),
            Err(VirtioMemError::UnknownRequest { request_type: 9 })
        ));
    }

    #[test]
    fn responses_carry_type_and_state() {
        assert_eq!(
            Response::AckState(STATE_MIXED).to_bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]
        );
        assert_eq!(Response::Nack.to_bytes()[..2], [1, 0]);
        assert_eq!(Response::Busy.to_bytes()[..2], [2, 0]);
        assert_eq!(Response::Error.to_bytes()[..2], [3, 0]);
        assert_eq!(Response::Ack.to_bytes(), [0; 10]);
    }

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

    #[test]
    fn region_goes_right_above_small_ram_aligned_to_128_mib() {
        assert_eq!(place_region(&[(0, 256 * MIB)], GIB).ok(), Some(256 * MIB));
        assert_eq!(place_region(&[(0, 200 * MIB)], GIB).ok(), Some(256 * MIB));
    }

    #[test]
    fn region_that_would_cross_the_mmio_hole_goes_above_4_gib() {
        assert_eq!(place_region(&[(0, 2 * GIB)], 2 * GIB).ok(), Some(4 * GIB));
        assert_eq!(place_region(&[(0, 3 * GIB)], 128 * MIB).ok(), Some(4 * GIB));
    }

    #[test]
    fn region_goes_above_ram_that_crosses_the_mmio_hole() {
        let ram = [(0, 3 * GIB), (4 * GIB, GIB + 3 * MIB)];
        assert_eq!(place_region(&ram, GIB).ok(), Some(5 * GIB + 128 * MIB));
    }

    #[test]
    fn region_that_does_not_fit_is_refused() {
        assert!(matches!(
            place_region(&[(0, GIB)], MAX_GUEST_PHYS_ADDR),
            Err(VirtioMemError::NoRoomForRegion { .. })
        ));
        assert!(matches!(
            place_region(&[(u64::MAX - 10, 5)], GIB),
            Err(VirtioMemError::NoRoomForRegion { .. })
        ));
        assert!(matches!(
            place_region(&[(0, GIB)], 0),
            Err(VirtioMemError::EmptyRegion)
        ));
    }
}
