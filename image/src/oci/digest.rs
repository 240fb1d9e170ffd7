//! Content digests (`sha256:<hex>`) and a reader that verifies a blob against its descriptor
//! while it streams.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::OciError;

/// The only algorithm accepted, and its prefix in a digest string.
const SHA256_PREFIX: &str = "sha256:";
/// Length of a sha256 digest in lowercase hex.
const SHA256_HEX_LEN: usize = 64;

/// A validated `sha256:<64 lowercase hex digits>` digest. Because nothing else parses, the hex
/// part is always safe to use as a file name (`blobs/sha256/<hex>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest {
    /// The 64 lowercase hex digits, without the algorithm prefix.
    hex: String,
}

/// A digest string that is not `sha256:<64 lowercase hex digits>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid digest `{value}`: {reason}; expected `sha256:` followed by 64 lowercase hex digits"
)]
pub struct DigestError {
    pub value: String,
    pub reason: &'static str,
}

impl Digest {
    /// Parses and validates a digest string.
    pub fn parse(value: &str) -> Result<Digest, DigestError> {
        let error = |reason| DigestError {
            value: value.to_owned(),
            reason,
        };
        let Some(hex) = value.strip_prefix(SHA256_PREFIX) else {
            return Err(error("unsupported or missing algorithm"));
        };
        if hex.len() != SHA256_HEX_LEN {
            return Err(error("wrong length"));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(error("not lowercase hex"));
        }
        Ok(Digest {
            hex: hex.to_owned(),
        })
    }

    /// The sha256 digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::new_with_prefix(data))
    }

    /// The digest a finished SHA-256 computation gives.
    pub fn from_sha256(hasher: Sha256) -> Digest {
        let hex = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Digest { hex }
    }

    /// The hex digits without the `sha256:` prefix (the blob's file name).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The algorithm name, which is the blob's directory under `blobs/`.
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SHA256_PREFIX}{}", self.hex)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;

    fn try_from(value: String) -> Result<Digest, DigestError> {
        Digest::parse(&value)
    }
}

impl From<Digest> for String {
    fn from(digest: Digest) -> String {
        digest.to_string()
    }
}

/// How a blob differed from its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mismatch {
    /// The blob had this many bytes.
    Size(u64),
    /// The blob hashed to this digest.
    Digest(Digest),
}

/// Hashes and counts what passes through and compares both with the expected digest and size
/// once the inner reader reaches EOF. A mismatch is reported as an `InvalidData` error by the
/// read that hits EOF, and as a typed error by [`VerifyingReader::finish`], which callers should
/// always call because consumers such as tar readers may stop before EOF.
pub struct VerifyingReader<R> {
    inner: R,
    expected: Digest,
    size: u64,
    hasher: Sha256,
    count: u64,
    outcome: Option<Result<(), Mismatch>>,
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`, which should yield exactly `size` bytes hashing to `expected`.
    pub fn new(inner: R, expected: Digest, size: u64) -> VerifyingReader<R> {
        VerifyingReader {
            inner,
            expected,
            size,
            hasher: Sha256::new(),
            count: 0,
            outcome: None,
        }
    }

    /// The digest the content must hash to.
    pub fn expected(&self) -> &Digest {
        &self.expected
    }

    /// Reads whatever the consumer left unread, then checks the size and digest.
    pub fn finish(mut self) -> Result<(), OciError> {
        if self.outcome.is_none() {
            let mut buf = [0u8; 64 * 1024];
            loop {
                match self.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    // The read that found the mismatch already recorded it.
                    Err(_) if self.outcome.is_some() => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(OciError::BlobRead {
                            digest: self.expected,
                            source,
                        })
                    }
                }
            }
        }
        match self.outcome {
            Some(Err(Mismatch::Size(actual))) => Err(OciError::SizeMismatch {
                digest: self.expected,
                expected: self.size,
                actual,
            }),
            Some(Err(Mismatch::Digest(actual))) => Err(OciError::DigestMismatch {
                expected: self.expected,
                actual,
            }),
            Some(Ok(())) | None => Ok(()),
        }
    }

    fn conclude(&mut self) -> Result<(), Mismatch> {
        if self.count != self.size {
            return Err(Mismatch::Size(self.count));
        }
        let actual = Digest::from_sha256(std::mem::take(&mut self.hasher));
        if actual != self.expected {
            return Err(Mismatch::Digest(actual));
        }
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(outcome) = &self.outcome {
            return match outcome {
                Ok(()) => Ok(0),
                Err(_) => Err(mismatch_io_error(&self.expected)),
            };
        }
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let outcome = self.conclude();
            let failed = outcome.is_err();
            self.outcome = Some(outcome);
            if failed {
                return Err(mismatch_io_error(&self.expected));
            }
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn mismatch_io_error(expected: &Digest) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("blob {expected} does not match its descriptor"),
    )
}
