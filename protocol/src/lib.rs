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

/// An error and its sources on one line ("cannot open /x: No such file or
/// directory"): how both ends render error chains into [`ErrorBody`]
/// messages and logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
