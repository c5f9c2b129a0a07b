//! The errors of the virtio-mem device, and the answer the guest gets for each.

use std::io;

use devices::virtio::VirtioError;
use memory::RamError;

use crate::wire::{Response, UnknownRequestType};

/// Errors of the virtio-mem device. Those a guest request causes map to the guest's answer
/// through [`VirtioMemError::response`].
#[derive(Debug, thiserror::Error)]
pub enum VirtioMemError {
    /// The configuration has no region address and was not placed.
    #[error("the hotplug region has no address")]
    RegionNotPlaced,
    /// The region size is zero.
    #[error("the hotplug region is empty")]
    EmptyRegion,
    /// The block size is not a power of two of at least 4 KiB.
    #[error("block size {block_size:#x} is not a power of two of at least 4 KiB")]
    BadBlockSize {
        /// The block size.
        block_size: u64,
    },
    /// The region's address or size is not a multiple of the block size, or it wraps.
    #[error("hotplug region {addr:#x}+{size:#x} is not aligned to the block size {block_size:#x}")]
    RegionUnaligned {
        /// Region address.
        addr: u64,
        /// Region size.
        size: u64,
        /// Block size.
        block_size: u64,
    },
    /// The slot size is zero, not a multiple of the block size, or makes over 2^32 slots.
    #[error("slot size {slot_size:#x} is not a multiple of the block size {block_size:#x}")]
    BadSlotSize {
        /// Slot size.
        slot_size: u64,
        /// Block size.
        block_size: u64,
    },
    /// The memory handed to the device is not exactly the configured region.
    #[error(
        "the memory handed to the device does not cover the region {addr:#x}+{size:#x} exactly"
    )]
    RegionMismatch {
        /// Region address.
        addr: u64,
        /// Region size.
        size: u64,
    },
    /// The requested size is larger than the region.
    #[error("requested size of {requested_mib} MiB is above the region size of {region_mib} MiB")]
    RequestedSizeTooLarge {
        /// Requested size in MiB.
        requested_mib: u64,
        /// Region size in MiB.
        region_mib: u64,
    },
    /// The requested size is not a multiple of the block size.
    #[error("requested size of {requested:#x} bytes is not a multiple of the block size {block_size:#x}")]
    RequestedSizeUnaligned {
        /// Requested size in bytes.
        requested: u64,
        /// Block size.
        block_size: u64,
    },
    /// A request's address is not aligned to the block size.
    #[error("request address {addr:#x} is not aligned to the block size {block_size:#x}")]
    Unaligned {
        /// Request address.
        addr: u64,
        /// Block size.
        block_size: u64,
    },
    /// A request covers no block.
    #[error("request at {addr:#x} covers zero blocks")]
    ZeroBlocks {
        /// Request address.
        addr: u64,
    },
    /// A request covers blocks outside the usable region.
    #[error("request {addr:#x} x{nb_blocks} blocks is outside the usable region")]
    OutsideRegion {
        /// Request address.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// A PLUG covers a block that is already plugged.
    #[error("plug of {addr:#x} x{nb_blocks} covers plugged blocks")]
    AlreadyPlugged {
        /// Request address.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// An UNPLUG covers a block that is not plugged.
    #[error("unplug of {addr:#x} x{nb_blocks} covers unplugged blocks")]
    NotPlugged {
        /// Request address.
        addr: u64,
        /// Number of blocks.
        nb_blocks: u16,
    },
    /// A PLUG would take the plugged size above the requested size.
    #[error("plug of {bytes:#x} bytes would exceed the requested size {requested:#x} (plugged {plugged:#x})")]
    BeyondRequested {
        /// Bytes the request plugs.
        bytes: u64,
        /// Bytes plugged already.
        plugged: u64,
        /// The requested size.
        requested: u64,
    },
    /// The driver did not accept `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`, so nothing is plugged.
    #[error("the driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE")]
    UnpluggedAccessible,
    /// A request of an unknown type.
    #[error("unknown request type {request_type}")]
    UnknownRequest {
        /// The request's type field.
        request_type: u16,
    },
    /// The chain's device-readable part is shorter than a request.
    #[error("request of {len} bytes is shorter than 24")]
    RequestTooShort {
        /// Readable bytes in the chain.
        len: u64,
    },
    /// The chain's device-writable part is shorter than a response.
    #[error("response buffer of {len} bytes is shorter than 10")]
    ResponseTooShort {
        /// Writable bytes in the chain.
        len: u64,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    #[error("descriptor at {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Adding or removing a memslot failed.
    #[error("cannot {op} memslot {index}")]
    Memslot {
        /// "add" or "remove".
        op: &'static str,
        /// Slot index within the region.
        index: u32,
        /// What the memslot control said.
        #[source]
        source: io::Error,
    },
    /// Discarding unplugged memory failed.
    #[error("cannot discard unplugged memory")]
    Discard(#[source] RamError),
    /// Reading or writing guest memory failed.
    #[error("cannot access guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// Updating the virtqueue failed.
    #[error("cannot update the virtqueue")]
    Queue(#[source] virtio_queue::Error),
    /// Raising an interrupt failed.
    #[error("cannot raise the interrupt")]
    Interrupt(#[source] VirtioError),
    /// Creating or using an eventfd failed.
    #[error("cannot set up the device's event sources")]
    Event(#[source] io::Error),
}

impl VirtioMemError {
    /// The guest's answer when a request fails this way: NACK for plugging beyond the requested
    /// size, BUSY when the host could not do its part (the guest retries later), ERROR for
    /// everything the request got wrong.
    pub fn response(&self) -> Response {
        match self {
            VirtioMemError::BeyondRequested { .. } => Response::Nack,
            VirtioMemError::Memslot { .. } | VirtioMemError::Discard(_) => Response::Busy,
            _ => Response::Error,
        }
    }

    /// Whether a control-plane request was wrong (an API 400), not the host.
    pub fn is_bad_request(&self) -> bool {
        matches!(
            self,
            VirtioMemError::RequestedSizeTooLarge { .. }
                | VirtioMemError::RequestedSizeUnaligned { .. }
        )
    }
}

impl From<UnknownRequestType> for VirtioMemError {
    fn from(e: UnknownRequestType) -> Self {
        VirtioMemError::UnknownRequest { request_type: e.0 }
    }
}
