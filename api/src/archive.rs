//! Streaming tar for directory transfers, both ways, without holding an
//! archive in memory: the `tar` crate builds and parses the 512-byte
//! headers; file contents flow between the HTTP body and the guest agent.
//!
//! Written archives are GNU format (long names as `././@LongLink`
//! entries). Read archives may be ustar, GNU or PAX (`path` and
//! `linkpath` records are honoured, the rest ignored).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

const BLOCK: usize = 512;

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink(String),
}

/// The header of one entry, to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryHeader {
    /// Relative, `/`-separated; directories without a trailing `/`.
    pub path: String,
    pub kind: Kind,
    pub size: u64,
    pub mode: u32,
    pub mtime: u64,
}

/// The header blocks of `entry` (two or more blocks when the path is long).
pub fn header(entry: &EntryHeader) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(BLOCK);
    let mut name = entry.path.clone();
    if entry.kind == Kind::Dir {
        name.push('/');
    }
    let mut head = tar::Header::new_gnu();
    if name.len() > 100 {
        long_link(&mut out, b'L', name.as_bytes())?;
        name.truncate(floor_char_boundary(&name, 100));
    }
    head.as_gnu_mut()
        .map(|gnu| {
            gnu.name = [0; 100];
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        })
        .ok_or_else(|| io::Error::other("not a GNU header"))?;
    match &entry.kind {
        Kind::File => {
            head.set_entry_type(tar::EntryType::Regular);
            head.set_size(entry.size);
        }
        Kind::Dir => {
            head.set_entry_type(tar::EntryType::Directory);
            head.set_size(0);
        }
        Kind::Symlink(target) => {
            head.set_entry_type(tar::EntryType::Symlink);
            head.set_size(0);
            if target.len() > 100 {
                long_link(&mut out, b'K', target.as_bytes())?;
            }
            let short = &target[..floor_char_boundary(target, 100)];
            head.set_link_name_literal(short)?;
        }
    }
    head.set_mode(entry.mode & 0o7777);
    head.set_mtime(entry.mtime);
    head.set_uid(0);
    head.set_gid(0);
    head.set_cksum();
    out.extend_from_slice(head.as_bytes());
    Ok(out)
}

fn floor_char_boundary(text: &str, max: usize) -> usize {
    (0..=max.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

/// A GNU `././@LongLink` entry (`kind` `L` for a name, `K` for a link
/// target) carrying `value`.
fn long_link(out: &mut Vec<u8>, kind: u8, value: &[u8]) -> io::Result<()> {
    let mut head = tar::Header::new_gnu();
    head.as_gnu_mut()
        .map(|gnu| gnu.name[..13].copy_from_slice(b"././@LongLink"))
        .ok_or_else(|| io::Error::other("not a GNU header"))?;
    head.set_entry_type(tar::EntryType::new(kind));
    head.set_size(value.len() as u64 + 1);
    head.set_mode(0o644);
    head.set_cksum();
    out.extend_from_slice(head.as_bytes());
    let start = out.len();
    out.extend_from_slice(value);
    out.push(0);
    out.resize(start + padded(value.len() as u64 + 1) as usize, 0);
    Ok(())
}

/// `size` rounded up to whole blocks.
pub fn padded(size: u64) -> u64 {
    size.div_ceil(BLOCK as u64) * BLOCK as u64
}

/// Zero bytes after `size` bytes of content, to the block boundary.
pub fn padding(size: u64) -> Vec<u8> {
    vec![0; (padded(size) - size) as usize]
}

/// The end-of-archive marker.
pub fn trailer() -> Vec<u8> {
    vec![0; 2 * BLOCK]
}

/// One entry read from an archive; its content (`size` bytes, then
/// padding) is next in the reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEntry {
    pub path: String,
    pub kind: ReadKind,
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadKind {
    File,
    Dir,
    Symlink(String),
    /// Hard links, devices, FIFOs: skipped.
    Unsupported(char),
}

/// Reads headers until the next real entry; `None` at the end of the
/// archive. Content of the returned entry is left in `reader`.
pub async fn next_entry<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<ReadEntry>> {
    let mut long_name: Option<String> = None;
    let mut long_link: Option<String> = None;
    loop {
        let mut block = [0u8; BLOCK];
        if !read_block(reader, &mut block).await? || block.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        let head = tar::Header::from_byte_slice(&block);
        let size = head.entry_size()?;
        let kind = head.entry_type();
        let stored_sum = head.cksum()?;
        let mut computed = tar::Header::from_byte_slice(&block).clone();
        computed.set_cksum();
        if computed.cksum()? != stored_sum {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a header's checksum does not match: not a tar archive, or a corrupt one",
            ));
        }
        match kind.as_byte() {
            b'L' | b'K' | b'x' => {
                const MAX_META: u64 = 1 << 20;
                if size > MAX_META {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a metadata entry of {size} bytes is too large"),
                    ));
                }
                let mut data = vec![0u8; padded(size) as usize];
                reader.read_exact(&mut data).await?;
                data.truncate(size as usize);
                match kind.as_byte() {
                    b'L' => long_name = Some(c_string(&data)),
                    b'K' => long_link = Some(c_string(&data)),
                    _ => {
                        for (key, value) in pax_records(&data) {
                            match key.as_str() {
                                "path" => long_name = Some(value),
                                "linkpath" => long_link = Some(value),
                                _ => {}
                            }
                        }
                    }
                }
                continue;
            }
            b'g' => {
                skip(reader, padded(size)).await?;
                continue;
            }
            _ => {}
        }
        let path = match long_name.take() {
            Some(path) => path,
            None => String::from_utf8_lossy(&head.path_bytes()).into_owned(),
        };
        let link = match long_link.take() {
            Some(link) => Some(link),
            None => head
                .link_name_bytes()
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
        };
        let read_kind = if kind.is_file() || kind.is_contiguous() {
            ReadKind::File
        } else if kind.is_dir() {
            ReadKind::Dir
        } else if kind.is_symlink() {
            ReadKind::Symlink(link.unwrap_or_default())
        } else {
            ReadKind::Unsupported(kind.as_byte() as char)
        };
        return Ok(Some(ReadEntry {
            path,
            kind: read_kind,
            size,
            mode: head.mode().unwrap_or(0o644) & 0o7777,
        }));
    }
}

/// Fills `block`; false at a clean end of input (no byte read).
async fn read_block<R: AsyncRead + Unpin>(reader: &mut R, block: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < block.len() {
        let n = reader.read(&mut block[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive ends inside a header",
            ));
        }
        filled += n;
    }
    Ok(true)
}

/// Reads and drops `count` bytes.
pub async fn skip<R: AsyncRead + Unpin>(reader: &mut R, count: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(count), &mut tokio::io::sink()).await?;
    if copied != count {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the archive ends inside an entry",
        ));
    }
    Ok(())
}

fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// `"<len> key=value\n"` records of a PAX header.
fn pax_records(mut data: &[u8]) -> Vec<(String, String)> {
    let mut records = Vec::new();
    while !data.is_empty() {
        let Some(space) = data.iter().position(|b| *b == b' ') else {
            break;
        };
        let Some(len) = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|len| *len > space + 1 && *len <= data.len())
        else {
            break;
        };
        let record = &data[space + 1..len];
        let record = record.strip_suffix(b"\n").unwrap_or(record);
        if let Some(eq) = record.iter().position(|b| *b == b'=') {
            records.push((
                String::from_utf8_lossy(&record[..eq]).into_owned(),
                String::from_utf8_lossy(&record[eq + 1..]).into_owned(),
            ));
        }
        data = &data[len..];
    }
    records
}

/// A relative archive path made safe to join under a directory: no
/// absolute paths, no `..`, no empty result. `.` components and a
/// trailing `/` are dropped.
pub fn safe_relative(path: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("entry {path:?} climbs out with '..'")),
            other if other.contains('\0') => return Err(format!("entry {path:?} contains NUL")),
            other => parts.push(other),
        }
    }
    if path.starts_with('/') {
        return Err(format!("entry {path:?} is absolute"));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(bytes: &[u8]) -> Vec<(ReadEntry, Vec<u8>)> {
        let mut reader = bytes;
        let mut out = Vec::new();
        while let Some(entry) = next_entry(&mut reader).await.unwrap() {
            let mut data = vec![0u8; entry.size as usize];
            reader.read_exact(&mut data).await.unwrap();
            skip(&mut reader, padded(entry.size) - entry.size)
                .await
                .unwrap();
            out.push((entry, data));
        }
        out
    }

    fn archive(entries: &[(EntryHeader, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (entry, data) in entries {
            out.extend(header(entry).unwrap());
            out.extend_from_slice(data);
            out.extend(padding(data.len() as u64));
        }
        out.extend(trailer());
        out
    }

    #[tokio::test]
    async fn what_is_written_reads_back_here_and_in_the_tar_crate() {
        let long = format!("{}/ü-file.bin", "d".repeat(150));
        let target = "t".repeat(130);
        let entries = [
            (
                EntryHeader {
                    path: "sub".into(),
                    kind: Kind::Dir,
                    size: 0,
                    mode: 0o755,
                    mtime: 1,
                },
                &b""[..],
            ),
            (
                EntryHeader {
                    path: long.clone(),
                    kind: Kind::File,
                    size: 3,
                    mode: 0o600,
                    mtime: 2,
                },
                &b"\x00\xff\n"[..],
            ),
            (
                EntryHeader {
                    path: "sub/link".into(),
                    kind: Kind::Symlink(target.clone()),
                    size: 0,
                    mode: 0o777,
                    mtime: 3,
                },
                &b""[..],
            ),
        ];
        let bytes = archive(&entries);
        let read = read_all(&bytes).await;
        assert_eq!(read.len(), 3);
        assert_eq!(read[0].0.path, "sub/");
        assert_eq!(read[0].0.kind, ReadKind::Dir);
        assert_eq!(read[1].0.path, long);
        assert_eq!(read[1].0.mode, 0o600);
        assert_eq!(read[1].1, b"\x00\xff\n");
        assert_eq!(read[2].0.kind, ReadKind::Symlink(target.clone()));

        let mut theirs = tar::Archive::new(&bytes[..]);
        let paths: Vec<String> = theirs
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(paths, ["sub/", long.as_str(), "sub/link"]);
    }

    #[tokio::test]
    async fn archives_from_the_tar_crate_read_here() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut head = tar::Header::new_ustar();
        head.set_size(5);
        head.set_mode(0o640);
        head.set_entry_type(tar::EntryType::Regular);
        let long = format!("{}/x", "p".repeat(200));
        builder
            .append_data(&mut head, &long, &b"hello"[..])
            .unwrap();
        let bytes = builder.into_inner().unwrap();
        let read = read_all(&bytes).await;
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].0.path, long);
        assert_eq!(read[0].1, b"hello");
        assert_eq!(read[0].0.mode, 0o640);
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let mut garbage: &[u8] = &[7u8; 600];
        assert!(next_entry(&mut garbage).await.is_err());
        let mut short: &[u8] = &[1u8; 100];
        assert!(next_entry(&mut short).await.is_err());
        let mut empty: &[u8] = &[];
        assert_eq!(next_entry(&mut empty).await.unwrap(), None);
    }

    #[test]
    fn relative_paths() {
        assert_eq!(safe_relative("./a/b/").unwrap(), "a/b");
        assert_eq!(safe_relative("a//b").unwrap(), "a/b");
        assert_eq!(safe_relative("./").unwrap(), "");
        assert!(safe_relative("/etc/passwd").is_err());
        assert!(safe_relative("a/../../b").is_err());
    }
}
