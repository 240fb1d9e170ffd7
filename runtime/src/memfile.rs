//! Guest RAM files: sparse copies between the tmpfs RAM directory and
//! snapshot directories, the capture of a copy-on-write VM's memory, and
//! disk-usage accounting.
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

/// Creates (or truncates) `dst` with mode 0600 as a hole of `len` bytes.
fn create_sized(dst: &Path, len: u64) -> io::Result<File> {
    let output = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(dst)?;
    output.set_len(len)?;
    Ok(output)
}

/// Copies `src` to `dst` (created with mode 0600, or truncated), keeping
/// holes; `dst` ends as long as `src`. With `sync`, `dst` is on stable
/// storage when this returns. Returns the bytes written.
pub fn sparse_copy(src: &Path, dst: &Path, sync: bool) -> io::Result<u64> {
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let output = create_sized(dst, len)?;
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

/// Makes `dst` the same file as `src` (a hard link), or a sparse copy of
/// it where a link is impossible (another file system); replaces `dst`.
pub fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::remove_file(dst) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        Err(_) => sparse_copy(src, dst, false).map(drop),
    }
}

/// `/proc/PID/pagemap` bits (see the kernel's `pagemap.rst`).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE_OR_SHARED: u64 = 1 << 61;

/// True when a pagemap entry says the process has its own copy of the page
/// (written since it was mapped): present and anonymous, or swapped out.
/// Pages still backed by the file are neither.
fn is_private_copy(entry: u64) -> bool {
    entry & PM_SWAPPED != 0 || (entry & PM_PRESENT != 0 && entry & PM_FILE_OR_SHARED == 0)
}

/// One line of `/proc/PID/maps` that maps a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileMapping {
    start: u64,
    end: u64,
    /// Offset in the file of `start`.
    offset: u64,
    /// `major:minor` of the file's device, and its inode.
    dev: (u32, u32),
    inode: u64,
}

fn parse_maps_line(line: &str) -> Option<FileMapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let _perms = fields.next()?;
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?.parse().ok()?;
    Some(FileMapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode,
    })
}

/// What [`capture_private`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capture {
    /// Bytes taken from the process (pages it had written).
    pub private_bytes: u64,
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Captures the memory of process `pid`, which maps the file `base` (of
/// `size` bytes) privately (copy-on-write), into `dst`: a sparse copy of
/// `base` with the pages the process has written since (its private
/// copies, found in `/proc/PID/pagemap`) read from `/proc/PID/mem` and
/// written over it. The process must not write to the mapping meanwhile
/// (the VM is paused). Needs the same user as the process (or
/// `CAP_SYS_PTRACE`).
pub fn capture_private(pid: u32, base: &Path, size: u64, dst: &Path) -> io::Result<Capture> {
    let meta = std::fs::metadata(base)?;
    let dev = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mappings: Vec<FileMapping> = maps
        .lines()
        .filter_map(parse_maps_line)
        .filter(|m| m.inode == meta.ino() && m.dev == dev)
        .collect();
    let covered: u64 = mappings.iter().map(|m| m.end - m.start).sum();
    if covered != size || mappings.iter().any(|m| m.offset + (m.end - m.start) > size) {
        return Err(invalid(format!(
            "process {pid} maps {covered} bytes of {}, expected {size}",
            base.display()
        )));
    }
    sparse_copy(base, dst, false)?;
    let output = OpenOptions::new().write(true).open(dst)?;
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let mut private_bytes = 0u64;
    let mut entries = vec![0u8; CHUNK];
    let mut buf = vec![0u8; CHUNK];
    for mapping in &mappings {
        let pages = (mapping.end - mapping.start) / PAGE as u64;
        let mut page = 0u64;
        while page < pages {
            let batch = (pages - page).min((CHUNK / 8) as u64);
            let bytes = &mut entries[..batch as usize * 8];
            let at = (mapping.start / PAGE as u64 + page) * 8;
            if read_full(&pagemap, bytes, at)? != bytes.len() {
                return Err(invalid(format!("short read of /proc/{pid}/pagemap")));
            }
            // Runs of written pages, each copied with one read and write.
            let mut run: Option<(u64, u64)> = None;
            for (i, entry) in bytes.chunks_exact(8).enumerate() {
                let entry = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                let index = page + i as u64;
                run = match (is_private_copy(entry), run) {
                    (true, Some((first, n))) if (n as usize) < CHUNK / PAGE => Some((first, n + 1)),
                    (true, Some(done)) => {
                        private_bytes += copy_pages(&mem, &output, mapping, done, &mut buf)?;
                        Some((index, 1))
                    }
                    (true, None) => Some((index, 1)),
                    (false, Some(done)) => {
                        private_bytes += copy_pages(&mem, &output, mapping, done, &mut buf)?;
                        None
                    }
                    (false, None) => None,
                };
            }
            if let Some(done) = run {
                private_bytes += copy_pages(&mem, &output, mapping, done, &mut buf)?;
            }
            page += batch;
        }
    }
    Ok(Capture { private_bytes })
}

/// Copies pages `first..first + count` of `mapping` from the process's
/// memory to their place in the file.
fn copy_pages(
    mem: &File,
    output: &File,
    mapping: &FileMapping,
    (first, count): (u64, u64),
    buf: &mut [u8],
) -> io::Result<u64> {
    let len = (count as usize) * PAGE;
    let data = &mut buf[..len];
    let address = mapping.start + first * PAGE as u64;
    if read_full(mem, data, address)? != len {
        return Err(invalid(format!(
            "short read of process memory at {address:#x}"
        )));
    }
    output.write_all_at(data, mapping.offset + first * PAGE as u64)?;
    Ok(len as u64)
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

/// First bytes of a packed RAM file ([`pack`]).
const PACK_MAGIC: [u8; 8] = *b"ARRKRAM\0";

/// The version of the packed RAM format [`pack`] writes and [`unpack`] reads.
pub const PACK_VERSION: u32 = 1;

/// Bytes of a packed RAM file's header.
const PACK_HEADER: usize = 32;

/// Bytes of one extent in a packed RAM file's table.
const PACK_EXTENT: usize = 16;

/// What [`pack`] wrote or [`unpack`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packed {
    /// Runs of data (pages that are not zero).
    pub extents: u64,
    /// Bytes of data in them.
    pub data_bytes: u64,
}

/// One run of data in a RAM file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    offset: u64,
    len: u64,
}

/// Writes the RAM file `src` to `out` without its holes (a tar would fill
/// them in), in the packed format (all integers little-endian):
///
/// - a 32-byte header: the magic `ARRKRAM\0`, the version (u32, 1), the
///   page size (u32, 4096), the size of the RAM (u64) and the number of
///   extents (u64);
/// - the extents: (offset, length) pairs of u64, page-aligned, non-empty,
///   sorted and apart (each starts after the end of the one before);
/// - the bytes of every extent, in order.
///
/// Extents are the pages that are allocated and not all zero, so the pack
/// is as large as what the guest used. `src`'s length must be a multiple
/// of the page size. Reads `src` twice (extents, then data).
pub fn pack(src: &Path, out: &mut impl io::Write) -> io::Result<Packed> {
    let input = File::open(src)?;
    let size = input.metadata()?.len();
    if size % PAGE as u64 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{size} bytes is not a whole number of {PAGE}-byte pages"),
        ));
    }
    let extents = data_extents(&input, size)?;
    let mut header = Vec::with_capacity(PACK_HEADER + extents.len() * PACK_EXTENT);
    header.extend_from_slice(&PACK_MAGIC);
    header.extend_from_slice(&PACK_VERSION.to_le_bytes());
    header.extend_from_slice(&(PAGE as u32).to_le_bytes());
    header.extend_from_slice(&size.to_le_bytes());
    header.extend_from_slice(&(extents.len() as u64).to_le_bytes());
    for extent in &extents {
        header.extend_from_slice(&extent.offset.to_le_bytes());
        header.extend_from_slice(&extent.len.to_le_bytes());
    }
    out.write_all(&header)?;
    let mut buf = vec![0u8; CHUNK];
    let mut data_bytes = 0u64;
    for extent in &extents {
        let mut at = extent.offset;
        let end = extent.offset + extent.len;
        while at < end {
            let want = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
            if read_full(&input, &mut buf[..want], at)? != want {
                return Err(invalid(format!(
                    "{} shrank while it was packed",
                    src.display()
                )));
            }
            out.write_all(&buf[..want])?;
            at += want as u64;
        }
        data_bytes += extent.len;
    }
    out.flush()?;
    Ok(Packed {
        extents: extents.len() as u64,
        data_bytes,
    })
}

/// The runs of pages of `input` (of `size` bytes) that are allocated and
/// not all zero, merged where they touch.
fn data_extents(input: &File, size: u64) -> io::Result<Vec<Extent>> {
    let mut extents: Vec<Extent> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let Some(data) = seek(input, offset, libc::SEEK_DATA)? else {
            break;
        };
        // Allocation is per block, which may be smaller than a page: read
        // whole pages around the data.
        let start = data - data % PAGE as u64;
        let end = seek(input, data, libc::SEEK_HOLE)?
            .unwrap_or(size)
            .next_multiple_of(PAGE as u64)
            .min(size);
        let mut at = start;
        while at < end {
            let want = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
            let got = read_full(input, &mut buf[..want], at)?;
            if got == 0 {
                break;
            }
            for (i, page) in buf[..got].chunks(PAGE).enumerate() {
                if is_zero(page) {
                    continue;
                }
                let page_at = at + (i * PAGE) as u64;
                match extents.last_mut() {
                    Some(last) if last.offset + last.len == page_at => last.len += PAGE as u64,
                    _ => extents.push(Extent {
                        offset: page_at,
                        len: PAGE as u64,
                    }),
                }
            }
            at += got as u64;
        }
        offset = end.max(start + PAGE as u64);
    }
    Ok(extents)
}

/// Rebuilds a RAM file packed by [`pack`] from `input` (`input_len` bytes
/// in all) into `dst` (created with mode 0600, or truncated), sparse: only
/// pages that are not zero are written. The pack is untrusted: it must say
/// the RAM is `size` bytes, and its extents must be page-aligned, sorted,
/// apart and inside the RAM; its length must be exactly what its header
/// and table call for. Anything else is an `InvalidData` error saying what
/// is wrong. Reads `input` once, front to back.
pub fn unpack(
    input: &mut impl io::Read,
    input_len: u64,
    size: u64,
    dst: &Path,
) -> io::Result<Packed> {
    let extents = read_pack_table(input, input_len, size)?;
    let output = create_sized(dst, size)?;
    let mut buf = vec![0u8; CHUNK];
    let mut data_bytes = 0u64;
    for extent in &extents {
        let mut at = extent.offset;
        let end = extent.offset + extent.len;
        while at < end {
            let want = usize::try_from(end - at).unwrap_or(CHUNK).min(CHUNK);
            input
                .read_exact(&mut buf[..want])
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => invalid(format!(
                        "the data of the extent at {:#x} is cut short",
                        extent.offset
                    )),
                    _ => e,
                })?;
            write_nonzero(&output, &buf[..want], at)?;
            at += want as u64;
        }
        data_bytes += extent.len;
    }
    if input.read(&mut [0u8; 1])? != 0 {
        return Err(invalid("bytes follow the last extent's data".to_string()));
    }
    Ok(Packed {
        extents: extents.len() as u64,
        data_bytes,
    })
}

/// Reads and checks a pack's header and extent table (see [`unpack`]).
fn read_pack_table(
    input: &mut impl io::Read,
    input_len: u64,
    size: u64,
) -> io::Result<Vec<Extent>> {
    let cut = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => invalid("the header or extent table is cut short".into()),
        _ => e,
    };
    let mut header = [0u8; PACK_HEADER];
    input.read_exact(&mut header).map_err(cut)?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
    if header[..8] != PACK_MAGIC {
        return Err(invalid("not a packed RAM file (wrong magic)".into()));
    }
    let (version, page, packed_size, count) = (u32_at(8), u32_at(12), u64_at(16), u64_at(24));
    if version != PACK_VERSION {
        return Err(invalid(format!(
            "format version {version}; this build reads version {PACK_VERSION}"
        )));
    }
    if page as usize != PAGE {
        return Err(invalid(format!("page size {page}; accepted: {PAGE}")));
    }
    if packed_size != size {
        return Err(invalid(format!(
            "it holds {packed_size} bytes of RAM; expected {size}"
        )));
    }
    // Every extent holds at least a page, and the table is in the file.
    let table_bytes = count.checked_mul(PACK_EXTENT as u64);
    if count > size / PAGE as u64
        || table_bytes.is_none_or(|t| t > input_len.saturating_sub(PACK_HEADER as u64))
    {
        return Err(invalid(format!(
            "{count} extents cannot fit in {size} bytes of RAM and a {input_len}-byte file"
        )));
    }
    let mut extents = Vec::with_capacity(count as usize);
    let mut entry = [0u8; PACK_EXTENT];
    let mut end_of_last = 0u64;
    let mut data = 0u64;
    for index in 0..count {
        input.read_exact(&mut entry).map_err(cut)?;
        let offset = u64::from_le_bytes(entry[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(entry[8..].try_into().unwrap_or_default());
        let bad = |what: &str| {
            invalid(format!(
                "extent {index} (offset {offset:#x}, {len} bytes) {what}"
            ))
        };
        if len == 0 || offset % PAGE as u64 != 0 || len % PAGE as u64 != 0 {
            return Err(bad("is empty or not page-aligned"));
        }
        if index > 0 && offset <= end_of_last {
            return Err(bad(&format!(
                "does not start after the previous one (which ends at {end_of_last:#x})"
            )));
        }
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= size)
            .ok_or_else(|| bad(&format!("ends past the RAM's {size} bytes")))?;
        end_of_last = end;
        data += len;
        extents.push(Extent { offset, len });
    }
    let expected = PACK_HEADER as u64 + count * PACK_EXTENT as u64 + data;
    if expected != input_len {
        return Err(invalid(format!(
            "the file is {input_len} bytes; its header and extents call for {expected}"
        )));
    }
    Ok(extents)
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
    fn reads_maps_lines() {
        let line = "7f9b5bfff000-7f9b6bfff000 rw-p 00001000 fe:01 10076254                   /a b/mem.ram (deleted)";
        assert_eq!(
            parse_maps_line(line),
            Some(FileMapping {
                start: 0x7f9b_5bff_f000,
                end: 0x7f9b_6bff_f000,
                offset: 0x1000,
                dev: (0xfe, 1),
                inode: 10_076_254,
            })
        );
        assert_eq!(parse_maps_line("garbage"), None);
    }

    #[test]
    fn tells_private_copies_from_file_pages() {
        assert!(is_private_copy(PM_PRESENT | 0x1234));
        assert!(is_private_copy(PM_SWAPPED));
        assert!(!is_private_copy(PM_PRESENT | PM_FILE_OR_SHARED));
        assert!(!is_private_copy(0));
    }

    /// This test process plays the VM: it maps a file privately, writes
    /// some pages, and captures itself.
    #[test]
    fn captures_the_pages_a_process_wrote_over_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("memory.ram");
        let size = 8 << 20;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&base)
            .unwrap();
        file.set_len(size as u64).unwrap();
        file.write_all_at(&[1u8; 2 * PAGE], 0).unwrap();
        file.write_all_at(&[2u8; PAGE], (4 << 20) as u64).unwrap();
        // SAFETY: a fresh private mapping of a file we own, unmapped below;
        // nothing else refers to the memory.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        // SAFETY: `map` is `size` bytes, readable and writable.
        let memory = unsafe { std::slice::from_raw_parts_mut(map.cast::<u8>(), size) };
        let mut expected = std::fs::read(&base).unwrap();
        // Read a file page (stays shared), overwrite one page of data with
        // zeros, write into a hole, and a run across a chunk boundary.
        assert_eq!(memory[4 << 20], 2);
        memory[PAGE..2 * PAGE].fill(0);
        memory[3 * PAGE + 7] = 9;
        memory[CHUNK - PAGE..CHUNK + PAGE].fill(5);
        for (range, value) in [(PAGE..2 * PAGE, 0u8), (CHUNK - PAGE..CHUNK + PAGE, 5)] {
            expected[range].fill(value);
        }
        expected[3 * PAGE + 7] = 9;

        let dst = dir.path().join("captured.ram");
        let capture = capture_private(std::process::id(), &base, size as u64, &dst).unwrap();
        assert_eq!(capture.private_bytes, 4 * PAGE as u64);
        assert!(
            std::fs::read(&dst).unwrap() == expected,
            "captured memory differs"
        );
        // The file itself never changed.
        assert_eq!(std::fs::read(&base).unwrap()[PAGE], 1);
        // A size that does not match the mapping is refused.
        let error = capture_private(std::process::id(), &base, 4 << 20, &dst).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        // SAFETY: unmapping what was mapped above; `memory` is not used again.
        assert_eq!(unsafe { libc::munmap(map, size) }, 0);
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

    /// A RAM file of `size` bytes with `runs` of (offset, bytes) written.
    fn ram_file(path: &Path, size: u64, runs: &[(u64, Vec<u8>)]) {
        let file = File::create(path).unwrap();
        file.set_len(size).unwrap();
        for (offset, bytes) in runs {
            file.write_all_at(bytes, *offset).unwrap();
        }
    }

    fn pack_to_vec(src: &Path) -> (Vec<u8>, Packed) {
        let mut out = Vec::new();
        let packed = pack(src, &mut out).unwrap();
        (out, packed)
    }

    fn unpack_vec(pack: &[u8], size: u64, dst: &Path) -> io::Result<Packed> {
        unpack(&mut &pack[..], pack.len() as u64, size, dst)
    }

    #[test]
    fn packs_only_data_and_unpacks_it_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("memory.ram");
        let size = 32u64 << 20;
        // Two pages, an allocated page of zeros, a run across a chunk
        // boundary that touches the next page run, and the last page.
        ram_file(
            &src,
            size,
            &[
                (0, vec![7u8; 2 * PAGE]),
                (5 * PAGE as u64, vec![0u8; PAGE]),
                ((CHUNK - PAGE) as u64, vec![1u8; 2 * PAGE]),
                ((CHUNK + PAGE) as u64, vec![2u8; PAGE]),
                (size - 1, vec![3u8]),
            ],
        );
        let (packed_bytes, packed) = pack_to_vec(&src);
        assert_eq!(
            packed,
            Packed {
                extents: 3,
                data_bytes: 6 * PAGE as u64
            }
        );
        assert_eq!(
            packed_bytes.len(),
            PACK_HEADER + 3 * PACK_EXTENT + 6 * PAGE,
            "holes and zero pages take no room"
        );
        let dst = dir.path().join("rebuilt.ram");
        assert_eq!(unpack_vec(&packed_bytes, size, &dst).unwrap(), packed);
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), size);
        assert!(std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap());
        assert!(
            disk_usage(&dst) <= 64 * PAGE as u64,
            "rebuilt file is not sparse: {} bytes used",
            disk_usage(&dst)
        );

        // An empty RAM packs to a bare header.
        let empty = dir.path().join("empty.ram");
        ram_file(&empty, 1 << 20, &[]);
        let (bytes, packed) = pack_to_vec(&empty);
        assert_eq!((bytes.len(), packed.extents), (PACK_HEADER, 0));
        unpack_vec(&bytes, 1 << 20, &dst).unwrap();
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), 1 << 20);
        assert_eq!(disk_usage(&dst), 0);

        // A size that is not whole pages is not RAM.
        ram_file(&empty, 1000, &[]);
        let error = pack(&empty, &mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }

    /// A pack of `size` bytes of RAM with these extents, data filled with 1s.
    fn crafted(size: u64, extents: &[(u64, u64)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&PACK_MAGIC);
        out.extend_from_slice(&PACK_VERSION.to_le_bytes());
        out.extend_from_slice(&(PAGE as u32).to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&(extents.len() as u64).to_le_bytes());
        for (offset, len) in extents {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        let data: u64 = extents.iter().map(|(_, len)| len).sum();
        out.resize(out.len() + data as usize, 1);
        out
    }

    #[test]
    fn refuses_malformed_packs() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("memory.ram");
        let size = 1u64 << 20;
        let page = PAGE as u64;
        let good = crafted(size, &[(0, page), (2 * page, page)]);
        unpack_vec(&good, size, &dst).unwrap();
        let refused = |pack: &[u8], size: u64, expected: &str| {
            let error = unpack_vec(pack, size, &dst).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            assert!(
                error.to_string().contains(expected),
                "{error:?} does not say {expected:?}"
            );
        };
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        refused(&bad_magic, size, "wrong magic");
        let mut version = good.clone();
        version[8] = 2;
        refused(&version, size, "format version 2");
        let mut page_size = good.clone();
        page_size[13] = 0x20;
        refused(&page_size, size, "page size");
        refused(&good, size * 2, "expected");
        refused(&good[..20], size, "cut short");
        refused(&good[..good.len() - 1], size, "call for");
        let mut trailing = good.clone();
        trailing.push(0);
        refused(&trailing, size, "call for");
        // The length given must match too: a reader that has more.
        let error = unpack(&mut &trailing[..], good.len() as u64, size, &dst).unwrap_err();
        assert!(error.to_string().contains("follow"), "{error}");
        let error =
            unpack(&mut &good[..good.len() - 1], good.len() as u64, size, &dst).unwrap_err();
        assert!(error.to_string().contains("cut short"), "{error}");
        refused(
            &crafted(size, &[(2 * page, page), (0, page)]),
            size,
            "does not start after",
        );
        refused(
            &crafted(size, &[(0, 2 * page), (page, page)]),
            size,
            "does not start after",
        );
        refused(
            &crafted(size, &[(0, page), (page, page)]),
            size,
            "does not start after",
        );
        refused(
            &crafted(size, &[(size - page, 2 * page)]),
            size,
            "ends past",
        );
        refused(
            &crafted(size, &[(u64::MAX - page + 1, page)]),
            size,
            "ends past",
        );
        refused(&crafted(size, &[(1, page)]), size, "page-aligned");
        refused(&crafted(size, &[(0, 100)]), size, "page-aligned");
        refused(&crafted(size, &[(0, 0)]), size, "page-aligned");
        // A count that cannot fit is refused before anything is allocated.
        let mut huge = crafted(size, &[]);
        huge[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        refused(&huge, size, "cannot fit");
        let mut many = crafted(size, &[]);
        many[24..32].copy_from_slice(&(size / page).to_le_bytes());
        refused(&many, size, "cannot fit");
    }
}
