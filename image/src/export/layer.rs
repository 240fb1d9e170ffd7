//! Writes a dumped disk ([`DiskTree`]) as one gzip-compressed layer tarball, deterministically:
//! entries in the tree's order (sorted by name, parents first), GNU headers with numeric
//! owners only, mtimes from the file system, a gzip header without name or time. The same
//! disk always gives the same bytes, hence the same digest.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};

use super::disk::{DiskTree, Kind, Node};
use super::{io_err, ExportError, FlattenStats};
use crate::oci::Digest;

/// A layer blob written to a file.
#[derive(Debug)]
pub(super) struct LayerFile {
    pub path: PathBuf,
    /// Of the compressed blob.
    pub digest: Digest,
    pub size: u64,
    /// Of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: Digest,
    pub stats: FlattenStats,
}

/// Writes `tree` as a `tar+gzip` layer to `path`.
pub(super) fn write_layer(tree: &DiskTree, path: &Path) -> Result<LayerFile, ExportError> {
    let file = File::create(path).map_err(io_err("creating", path))?;
    let compressed = Hashing::new(BufWriter::new(file));
    let gzip = GzBuilder::new().write(compressed, Compression::default());
    let mut builder = tar::Builder::new(Hashing::new(gzip));
    let mut stats = FlattenStats::default();
    let mut first_name: HashMap<u32, &Path> = HashMap::new();
    for node in &tree.nodes {
        if node.kind == Kind::Socket {
            stats.sockets_skipped += 1;
            continue;
        }
        if node.kind != Kind::Dir {
            if let Some(target) = first_name.get(&node.ino) {
                let mut header = header(node, EntryType::Link, mtime_of(tree, node)?);
                builder
                    .append_link(&mut header, &node.path, target)
                    .map_err(io_err("writing the layer", path))?;
                stats.hardlinks += 1;
                continue;
            }
            first_name.insert(node.ino, &node.path);
        }
        append(&mut builder, tree, node, &mut stats).map_err(|e| match e {
            Append::Export(e) => e,
            Append::Write(source) => io_err("writing the layer", path)(source),
        })?;
    }
    let uncompressed = builder
        .into_inner()
        .map_err(io_err("writing the layer", path))?;
    let diff_id = Digest::from_sha256(uncompressed.hasher);
    let compressed = uncompressed
        .inner
        .finish()
        .map_err(io_err("writing the layer", path))?;
    let digest = Digest::from_sha256(compressed.hasher);
    let size = compressed.size;
    let file = compressed
        .inner
        .into_inner()
        .map_err(|e| io_err("writing the layer", path)(e.into_error()))?;
    file.sync_all().map_err(io_err("syncing", path))?;
    Ok(LayerFile {
        path: path.to_path_buf(),
        digest,
        size,
        diff_id,
        stats,
    })
}

/// An error reading the dumped tree, or writing the tar stream.
enum Append {
    Export(ExportError),
    Write(io::Error),
}

impl From<io::Error> for Append {
    fn from(error: io::Error) -> Append {
        Append::Write(error)
    }
}

fn append<W: Write>(
    builder: &mut tar::Builder<W>,
    tree: &DiskTree,
    node: &Node,
    stats: &mut FlattenStats,
) -> Result<(), Append> {
    let dumped = tree.dumped(node);
    let missing = |source| {
        Append::Export(ExportError::Dump {
            path: node.path.clone(),
            debugfs: tree.dump_complaints.clone(),
            source,
        })
    };
    match node.kind {
        Kind::Dir => {
            let meta = fs::symlink_metadata(&dumped).map_err(missing)?;
            let mut header = header(node, EntryType::Directory, meta.mtime());
            builder.append_data(&mut header, &node.path, io::empty())?;
            stats.dirs += 1;
        }
        Kind::Regular => {
            let file = File::open(&dumped).map_err(missing)?;
            let meta = file.metadata().map_err(missing)?;
            if !meta.is_file() {
                return Err(missing(io::Error::other("not a regular file")));
            }
            let mut header = header(node, EntryType::Regular, meta.mtime());
            header.set_size(meta.len());
            builder.append_data(&mut header, &node.path, file)?;
            stats.files += 1;
        }
        Kind::Symlink => {
            let target = fs::read_link(&dumped).map_err(missing)?;
            let times = tree.inodes.get(&node.ino).copied().unwrap_or_default();
            let mut header = header(node, EntryType::Symlink, times.mtime);
            builder.append_link(&mut header, &node.path, &target)?;
            stats.symlinks += 1;
        }
        Kind::Char | Kind::Block | Kind::Fifo => {
            let kind = match node.kind {
                Kind::Char => EntryType::Char,
                Kind::Block => EntryType::Block,
                _ => EntryType::Fifo,
            };
            let times = tree.inodes.get(&node.ino).copied().unwrap_or_default();
            let mut header = header(node, kind, times.mtime);
            if kind != EntryType::Fifo {
                let (major, minor) = times.device.unwrap_or_default();
                header.set_device_major(major)?;
                header.set_device_minor(minor)?;
            }
            builder.append_data(&mut header, &node.path, io::empty())?;
            stats.devices += 1;
        }
        Kind::Socket => {}
    }
    Ok(())
}

/// The mtime of a node: from the dump for files and directories (rdump sets it), from
/// `stat` for the rest.
fn mtime_of(tree: &DiskTree, node: &Node) -> Result<i64, ExportError> {
    match node.kind {
        Kind::Dir | Kind::Regular => fs::symlink_metadata(tree.dumped(node))
            .map(|m| m.mtime())
            .map_err(|source| ExportError::Dump {
                path: node.path.clone(),
                debugfs: tree.dump_complaints.clone(),
                source,
            }),
        _ => Ok(tree.inodes.get(&node.ino).map_or(0, |t| t.mtime)),
    }
}

fn header(node: &Node, kind: EntryType, mtime: i64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(node.mode);
    header.set_uid(node.uid.into());
    header.set_gid(node.gid.into());
    // ustar has no negative times; files from before 1970 get the epoch.
    header.set_mtime(mtime.max(0) as u64);
    header.set_size(0);
    header
}

/// Passes writes through, hashing and counting them.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
