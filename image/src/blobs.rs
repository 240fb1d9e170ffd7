//! The writable side of an OCI image layout: content-addressed blobs that only ever appear
//! complete and verified.
//!
//! Every writer (registry pulls, archive imports, image builds) streams into a temporary file
//! under `blobs/.tmp/`, and the file is renamed to `blobs/sha256/<hex>` only once its size and
//! digest are checked, so a crash or a bad download never leaves a wrong blob under a digest.
//! Downloads that may be resumed keep their bytes in `blobs/.partial/<hex>` between attempts.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::oci::{Digest, OciError};

/// The `oci-layout` marker written into new layouts.
const LAYOUT_MARKER: &str = "{\"imageLayoutVersion\":\"1.0.0\"}";
/// Temporary files: never read as blobs, swept by [`BlobDir::sweep_temporary`].
const TMP_DIR: &str = ".tmp";
/// Partial downloads, named by the digest they should end up with.
const PARTIAL_DIR: &str = ".partial";

/// Distinguishes temporary files made by one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The blob directory of an OCI image layout (`<layout>/blobs`), for writing.
#[derive(Debug, Clone)]
pub struct BlobDir {
    layout: PathBuf,
}

impl BlobDir {
    /// Opens the layout at `layout`, creating the directory, its `oci-layout` marker and the
    /// blob directories when missing.
    pub fn create(layout: &Path) -> io::Result<BlobDir> {
        for dir in ["blobs/sha256", "blobs/.tmp", "blobs/.partial"] {
            fs::create_dir_all(layout.join(dir))?;
        }
        let marker = layout.join("oci-layout");
        if !marker.exists() {
            write_atomically(&marker, LAYOUT_MARKER.as_bytes())?;
        }
        Ok(BlobDir {
            layout: layout.to_path_buf(),
        })
    }

    /// The layout directory.
    pub fn layout(&self) -> &Path {
        &self.layout
    }

    /// Where the blob with `digest` lives once written.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.layout
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// Where a resumable download of `digest` keeps its bytes until it completes.
    pub fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.layout
            .join("blobs")
            .join(PARTIAL_DIR)
            .join(digest.hex())
    }

    /// Whether the blob is present with `size` bytes. Content is not re-hashed: blobs only
    /// appear after verification.
    pub fn contains(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Streams `reader` into the blob store and returns its digest and size. With `expected`,
    /// the content must have exactly that digest and size or nothing is stored.
    pub fn write(
        &self,
        reader: &mut dyn Read,
        expected: Option<(&Digest, u64)>,
    ) -> Result<(Digest, u64), OciError> {
        let tmp = self.temporary_path();
        let result = (|| {
            let mut file = File::create(&tmp).map_err(|e| read_error(&tmp, e))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(source) => {
                        return Err(OciError::BlobRead {
                            digest: expected
                                .map(|(d, _)| d.clone())
                                .unwrap_or_else(|| Digest::of(b"")),
                            source,
                        })
                    }
                };
                hasher.update(&buf[..n]);
                size += n as u64;
                file.write_all(&buf[..n]).map_err(|e| read_error(&tmp, e))?;
            }
            let digest = Digest::from_sha256(hasher);
            if let Some((want, want_size)) = expected {
                check(want, want_size, &digest, size)?;
            }
            file.sync_all().map_err(|e| read_error(&tmp, e))?;
            let dest = self.path(&digest);
            fs::rename(&tmp, &dest).map_err(|e| read_error(&dest, e))?;
            Ok((digest, size))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Stores a small blob held in memory (a manifest, config or index) and returns its digest.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<Digest, OciError> {
        let digest = Digest::of(bytes);
        if !self.contains(&digest, bytes.len() as u64) {
            self.write(&mut &bytes[..], Some((&digest, bytes.len() as u64)))?;
        }
        Ok(digest)
    }

    /// Moves a completed partial download into place after hashing it whole. A partial file
    /// that turns out wrong is deleted, so the next attempt starts from zero.
    pub fn commit_partial(&self, digest: &Digest, size: u64) -> Result<(), OciError> {
        let partial = self.partial_path(digest);
        let verified = (|| {
            let mut file = File::open(&partial).map_err(|e| read_error(&partial, e))?;
            let mut hasher = Sha256::new();
            let copied = io::copy(&mut file, &mut HashWriter(&mut hasher))
                .map_err(|e| read_error(&partial, e))?;
            check(digest, size, &Digest::from_sha256(hasher), copied)?;
            file.sync_all().map_err(|e| read_error(&partial, e))
        })();
        if let Err(e) = verified {
            let _ = fs::remove_file(&partial);
            return Err(e);
        }
        let dest = self.path(digest);
        fs::rename(&partial, &dest).map_err(|e| read_error(&dest, e))
    }

    /// Opens (creating it) the partial file of `digest` for appending, and returns it with
    /// the number of bytes it already holds.
    pub fn open_partial(&self, digest: &Digest) -> io::Result<(File, u64)> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.partial_path(digest))?;
        let len = file.metadata()?.len();
        Ok((file, len))
    }

    /// Removes temporary files left by writers that died. Partial downloads are kept (they
    /// are what resuming continues from); call only when no writer is running.
    pub fn sweep_temporary(&self) -> io::Result<()> {
        for entry in fs::read_dir(self.layout.join("blobs").join(TMP_DIR))? {
            let _ = fs::remove_file(entry?.path());
        }
        Ok(())
    }

    fn temporary_path(&self) -> PathBuf {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.layout
            .join("blobs")
            .join(TMP_DIR)
            .join(format!("{}-{n}", std::process::id()))
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so
/// readers see the old or the new content, never a mix.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    let tmp = path.with_file_name(name);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn check(want: &Digest, want_size: u64, got: &Digest, got_size: u64) -> Result<(), OciError> {
    if got_size != want_size {
        return Err(OciError::SizeMismatch {
            digest: want.clone(),
            expected: want_size,
            actual: got_size,
        });
    }
    if got != want {
        return Err(OciError::DigestMismatch {
            expected: want.clone(),
            actual: got.clone(),
        });
    }
    Ok(())
}

fn read_error(path: &Path, source: io::Error) -> OciError {
    OciError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// Feeds what is written to it into a hash.
pub(crate) struct HashWriter<'a>(pub(crate) &'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_blobs_land_under_their_digest() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::create(dir.path()).unwrap();
        assert!(dir.path().join("oci-layout").is_file());
        let (digest, size) = blobs.write(&mut &b"hello"[..], None).unwrap();
        assert_eq!((digest.clone(), size), (Digest::of(b"hello"), 5));
        assert_eq!(fs::read(blobs.path(&digest)).unwrap(), b"hello");
        assert!(blobs.contains(&digest, 5));
        assert!(!blobs.contains(&digest, 6));
    }

    #[test]
    fn a_mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::create(dir.path()).unwrap();
        let want = Digest::of(b"hello");
        let err = blobs
            .write(&mut &b"hellO"[..], Some((&want, 5)))
            .unwrap_err();
        assert!(matches!(err, OciError::DigestMismatch { .. }), "{err}");
        let err = blobs
            .write(&mut &b"hello!"[..], Some((&want, 5)))
            .unwrap_err();
        assert!(matches!(err, OciError::SizeMismatch { .. }), "{err}");
        assert!(!blobs.path(&want).exists());
        assert_eq!(
            fs::read_dir(dir.path().join("blobs/.tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn partial_downloads_resume_and_are_verified_whole() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::create(dir.path()).unwrap();
        let digest = Digest::of(b"0123456789");
        let (mut file, have) = blobs.open_partial(&digest).unwrap();
        assert_eq!(have, 0);
        file.write_all(b"01234").unwrap();
        drop(file);
        let (mut file, have) = blobs.open_partial(&digest).unwrap();
        assert_eq!(have, 5);
        file.write_all(b"56789").unwrap();
        blobs.commit_partial(&digest, 10).unwrap();
        assert!(blobs.contains(&digest, 10));
        assert!(!blobs.partial_path(&digest).exists());

        let other = Digest::of(b"abc");
        let (mut file, _) = blobs.open_partial(&other).unwrap();
        file.write_all(b"abd").unwrap();
        assert!(blobs.commit_partial(&other, 3).is_err());
        assert!(
            !blobs.partial_path(&other).exists(),
            "a bad partial is dropped"
        );
        assert!(!blobs.path(&other).exists());
    }
}
