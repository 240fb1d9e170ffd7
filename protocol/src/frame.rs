//! Wire framing: the session marker, frame layout, and an incremental
//! reader that can resynchronise on a byte stream holding leftovers from an
//! earlier session.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::mux::ProtocolError;

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Written by each side at the start of a session; the reader skips input until it sees it.
pub const SYNC: [u8; 16] = *b"\0ARRAKIS-SYNC-v1";

/// Largest payload a frame may carry.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// Bytes before the payload: length (4), stream (4), kind (1).
pub const HEADER_LEN: usize = 9;

/// DATA payload bytes a sender may have unacknowledged on one stream.
pub const WINDOW: u32 = 512 * 1024;

/// Largest DATA chunk a sender puts in one frame.
pub const CHUNK: usize = 64 * 1024;

/// Frame kinds; the numbers are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    Open = 3,
    Message = 4,
    Data = 5,
    Eof = 6,
    Close = 7,
    Credit = 8,
    Reset = 9,
}

impl TryFrom<u8> for Kind {
    type Error = ProtocolError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Ok(match value {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Open,
            4 => Kind::Message,
            5 => Kind::Data,
            6 => Kind::Eof,
            7 => Kind::Close,
            8 => Kind::Credit,
            9 => Kind::Reset,
            other => {
                return Err(ProtocolError::Malformed(format!(
                    "unknown frame kind {other}"
                )))
            }
        })
    }
}

/// Byte channels of a stream; the numbers are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Channel {
    Stdin = 0,
    Stdout = 1,
    Stderr = 2,
    File = 3,
}

impl TryFrom<u8> for Channel {
    type Error = ProtocolError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Ok(match value {
            0 => Channel::Stdin,
            1 => Channel::Stdout,
            2 => Channel::Stderr,
            3 => Channel::File,
            other => return Err(ProtocolError::Malformed(format!("unknown channel {other}"))),
        })
    }
}

/// Session opening, host -> guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub nonce: u64,
}

/// Session acceptance, guest -> host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub version: u32,
    pub nonce: u64,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream: u32,
    pub kind: Kind,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(stream: u32, kind: Kind, payload: impl Into<Bytes>) -> Self {
        Frame {
            stream,
            kind,
            payload: payload.into(),
        }
    }

    /// A frame whose payload is `value` as JSON.
    pub fn json<T: Serialize>(stream: u32, kind: Kind, value: &T) -> Self {
        // Serialising our own plain data types cannot fail: no maps with
        // non-string keys, no custom serialisers.
        let payload = serde_json::to_vec(value).unwrap_or_default();
        Frame::new(stream, kind, payload)
    }

    pub fn data(stream: u32, channel: Channel, bytes: &[u8]) -> Self {
        let mut payload = BytesMut::with_capacity(1 + bytes.len());
        payload.put_u8(channel as u8);
        payload.put_slice(bytes);
        Frame::new(stream, Kind::Data, payload.freeze())
    }

    pub fn channel_only(stream: u32, kind: Kind, channel: Channel) -> Self {
        Frame::new(stream, kind, vec![channel as u8])
    }

    pub fn credit(stream: u32, bytes: u32) -> Self {
        Frame::new(stream, Kind::Credit, bytes.to_be_bytes().to_vec())
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + self.payload.len());
        // Payloads are bounded by MAX_PAYLOAD when built by this crate, so the length fits.
        dst.put_u32((HEADER_LEN - 4 + self.payload.len()) as u32);
        dst.put_u32(self.stream);
        dst.put_u8(self.kind as u8);
        dst.put_slice(&self.payload);
    }

    /// Decodes the JSON payload.
    pub fn parse_json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ProtocolError> {
        serde_json::from_slice(&self.payload).map_err(|e| {
            ProtocolError::Malformed(format!(
                "bad {:?} payload on stream {}: {e}",
                self.kind, self.stream
            ))
        })
    }

    /// Splits a DATA/EOF payload into its channel and bytes.
    pub fn channel_payload(&self) -> Result<(Channel, Bytes), ProtocolError> {
        let mut payload = self.payload.clone();
        if payload.is_empty() {
            return Err(ProtocolError::Malformed(format!(
                "{:?} frame without a channel on stream {}",
                self.kind, self.stream
            )));
        }
        let channel = Channel::try_from(payload.get_u8())?;
        Ok((channel, payload))
    }

    pub fn credit_value(&self) -> Result<u32, ProtocolError> {
        let bytes: [u8; 4] = self.payload[..].try_into().map_err(|_| {
            ProtocolError::Malformed(format!("credit frame of {} bytes", self.payload.len()))
        })?;
        Ok(u32::from_be_bytes(bytes))
    }
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// Reads more input; returns false at EOF.
    async fn fill(&mut self) -> Result<bool, ProtocolError> {
        self.buf.reserve(64 * 1024);
        Ok(self.inner.read_buf(&mut self.buf).await? > 0)
    }

    /// Discards input up to and including the next SYNC marker. Returns
    /// false when the stream ended first.
    pub async fn sync(&mut self) -> Result<bool, ProtocolError> {
        loop {
            if let Some(at) = find(&self.buf, &SYNC) {
                self.buf.advance(at + SYNC.len());
                return Ok(true);
            }
            // Keep a tail that could be the start of a marker split across reads.
            let keep = self.buf.len().min(SYNC.len() - 1);
            let drop = self.buf.len() - keep;
            self.buf.advance(drop);
            if !self.fill().await? {
                return Ok(false);
            }
        }
    }

    /// Reads one frame; `None` at a clean EOF between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len < HEADER_LEN - 4 {
                    return Err(ProtocolError::Malformed(format!(
                        "frame length {len} too short"
                    )));
                }
                if len - (HEADER_LEN - 4) > MAX_PAYLOAD {
                    return Err(ProtocolError::FrameTooLarge { len });
                }
                if self.buf.len() >= 4 + len {
                    // Checked before consuming, so a caller can resynchronise from here.
                    let kind = Kind::try_from(self.buf[8])?;
                    let mut frame = self.buf.split_to(4 + len);
                    frame.advance(4);
                    let stream = frame.get_u32();
                    frame.advance(1);
                    return Ok(Some(Frame::new(stream, kind, frame.freeze())));
                }
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtocolError::Disconnected)
                };
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sync_skips_garbage_split_across_reads() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(r);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            w.write_all(b"stale bytes\0ARRAKIS").await.unwrap();
            w.write_all(b"-SYNC-v1").await.unwrap();
            let mut buf = BytesMut::new();
            Frame::new(3, Kind::Reset, Bytes::new()).encode(&mut buf);
            w.write_all(&buf).await.unwrap();
        });
        assert!(reader.sync().await.unwrap());
        let frame = reader.read_frame().await.unwrap().unwrap();
        assert_eq!((frame.stream, frame.kind), (3, Kind::Reset));
        writer.await.unwrap();
        assert_eq!(reader.read_frame().await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_frame_is_rejected() {
        let mut bytes = BytesMut::new();
        bytes.put_u32((MAX_PAYLOAD + 6) as u32);
        bytes.put_u32(1);
        let mut reader = FrameReader::new(&bytes[..]);
        assert!(matches!(
            reader.read_frame().await,
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn truncated_frame_is_a_disconnect() {
        let mut bytes = BytesMut::new();
        Frame::data(1, Channel::Stdout, b"hello").encode(&mut bytes);
        bytes.truncate(bytes.len() - 2);
        let mut reader = FrameReader::new(&bytes[..]);
        assert!(matches!(
            reader.read_frame().await,
            Err(ProtocolError::Disconnected)
        ));
    }
}
