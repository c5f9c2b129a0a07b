//! The request and response wire formats of the virtio-mem queue (virtio 1.2, 5.15.6).

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

/// A request whose type field names no request type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownRequestType(pub u16);

/// Decodes the 24 bytes of `struct virtio_mem_req`.
pub fn parse_request(bytes: &[u8; REQUEST_SIZE]) -> Result<Request, UnknownRequestType> {
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
        other => Err(UnknownRequestType(other)),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(parse_request(&b), Err(UnknownRequestType(9)));
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
}
