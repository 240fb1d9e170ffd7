//! Guest RAM files: sparse copies between the tmpfs RAM directory and
//! snapshot directories, and disk-usage accounting.
//!
//! A RAM file is as large as the guest's memory, but only the pages the
//! guest touched are allocated. [`sparse_copy`] reads only the allocated
//! extents of the source (`SEEK_DATA`/`SEEK_HOLE`) and skips pages that
//! read as zero, so a copy costs what the guest used, not its size, and
//! the copy is at most as large on disk as the source.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Pages that read as zero are not written.
const PAGE: usize = 4096;

/// Bytes read at a time.
const CHUNK: usize = 1 << 20;

/// Copies `src` to `dst` (created with mode 0600, or truncated), keeping
/// holes; `dst` ends as long as `src`. With `sync`, `dst` is on stable
/// storage when this returns. Returns the bytes written.
pub fn sparse_copy(src: &Path, dst: &Path, sync: bool) -> io::Result<u64> {
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dst)?;
    output.set_len(len)?;
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    let mut offset = 0u64;
    while offset < len {
        let Some(start) = seek(&input, offset, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(&input, start, libc::SEEK_HOLE)?
            .unwrap_or(len)
            .min(len);
        let mut at = start;
        while at < end {
            let want = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
            let got = read_full(&input, &mut buf[..want], at)?;
            if got == 0 {
                break;
            }
            written += write_nonzero(&output, &buf[..got], at)?;
            at += got as u64;
        }
        offset = end;
    }
    if sync {
        output.sync_all()?;
    }
    Ok(written)
}

/// `lseek(2)` with `SEEK_DATA`/`SEEK_HOLE`; `None` past the last data.
fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek on a descriptor we own for the duration of the call;
    // no memory is passed.
    let result = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if result >= 0 {
        return Ok(Some(result as u64));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(error)
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writes the pages of `data` (at `offset`) that are not all zero, in
/// runs; returns the bytes written.
fn write_nonzero(file: &File, data: &[u8], offset: u64) -> io::Result<u64> {
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at < data.len() {
        let end = (at + PAGE).min(data.len());
        let zero = is_zero(&data[at..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(start)) => {
                file.write_all_at(&data[start..at], offset + start as u64)?;
                written += (at - start) as u64;
                run_start = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], offset + start as u64)?;
        written += (data.len() - start) as u64;
    }
    Ok(written)
}

fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: any bytes are valid u64s; align_to only splits at alignment.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Bytes a file occupies on its file system (allocated blocks), 0 if absent.
pub fn disk_usage(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// `fsync` on a directory, so entries created in it survive a crash.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.ram");
        let dst = dir.path().join("dst.ram");
        let size = 64u64 << 20;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&src)
            .unwrap();
        file.set_len(size).unwrap();
        // Data at the start, in the middle across a chunk boundary, a page
        // of explicit zeros (allocated, but not worth copying), and the
        // last byte.
        file.write_all_at(&[1u8; 3 * PAGE], 0).unwrap();
        file.write_all_at(&[2u8; 2 * PAGE], (CHUNK - PAGE) as u64)
            .unwrap();
        file.write_all_at(&[0u8; PAGE], 20 << 20).unwrap();
        file.write_all_at(&[3u8], size - 1).unwrap();
        drop(file);

        let written = sparse_copy(&src, &dst, true).unwrap();
        // Whole pages: five of data, and the last one, for its last byte.
        assert_eq!(written, (6 * PAGE) as u64);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(
            disk_usage(&dst) < 1 << 20,
            "copy is not sparse: {} bytes used",
            disk_usage(&dst)
        );
        // Copying over an existing, longer file replaces it.
        std::fs::write(&dst, vec![9u8; (size + 10) as usize]).unwrap();
        sparse_copy(&src, &dst, false).unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), size);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        sync_dir(dir.path()).unwrap();
    }

    #[test]
    fn an_empty_file_copies_to_an_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("empty");
        File::create(&src).unwrap().set_len(1 << 20).unwrap();
        let dst = dir.path().join("copy");
        assert_eq!(sparse_copy(&src, &dst, false).unwrap(), 0);
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 1 << 20);
        assert_eq!(disk_usage(&dst), 0);
        assert_eq!(disk_usage(&dir.path().join("absent")), 0);
    }
}
