//! The host <-> guest agent protocol: framing, a small stream multiplexer
//! with credit flow control, and the control messages. Transport agnostic:
//! anything `AsyncRead + AsyncWrite` (virtio-serial, vsock, a unix socket
//! pair in tests) carries it. See `docs/protocol.md` for the wire format.

pub mod frame;
pub mod messages;
mod mux;
pub mod paths;

pub use frame::{Channel, PROTOCOL_VERSION};
pub use messages::*;
pub use mux::{
    serve, Client, ClientOptions, Handler, ProtocolError, Stream, StreamEvent, StreamReceiver,
    StreamSender,
};
pub use paths::DEFAULT_WORKDIR;
