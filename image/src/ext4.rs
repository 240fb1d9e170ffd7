//! Packs an unpacked root file system tree into an ext4 image with `mkfs.ext4 -d`, which copies
//! the tree without mounting anything (so it works unprivileged and in containers).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// ext4 block size the image is aligned to.
const BLOCK: u64 = 4096;
/// Per-inode allowance: the inode itself, its directory entry and a partly used last block.
const INODE_OVERHEAD: u64 = 4096;
/// Fixed allowance for the journal, group descriptors, bitmaps and reserved blocks.
const FIXED_OVERHEAD: u64 = 64 << 20;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("walking `{}`", path.display())]
    Walk {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating the image file `{}`", path.display())]
    CreateImage {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running mkfs.ext4 (is e2fsprogs 1.43 or later installed?)")]
    Spawn {
        #[source]
        source: io::Error,
    },
    #[error("mkfs.ext4 for `{}` failed ({status}): {stderr}", image.display())]
    Mkfs {
        image: PathBuf,
        status: ExitStatus,
        stderr: String,
    },
}

/// Estimates the image size, in bytes, that `dir` needs:
/// `apparent_bytes * 1.2 + inodes * 4 KiB + 64 MiB`, rounded up to a 4 KiB block.
///
/// The 20 % covers extent trees and partly filled blocks, the per-inode term covers small files
/// and directories that each cost at least a block, and the constant covers the journal and
/// metadata. Hard-linked files are counted once; symlinks are not followed.
pub fn tree_size(dir: &Path) -> Result<u64, Ext4Error> {
    let mut totals = Totals::default();
    totals.walk(dir)?;
    let estimate = totals.bytes + totals.bytes / 5 + totals.inodes * INODE_OVERHEAD;
    Ok((estimate + FIXED_OVERHEAD).div_ceil(BLOCK) * BLOCK)
}

#[derive(Default)]
struct Totals {
    bytes: u64,
    inodes: u64,
    seen: HashSet<(u64, u64)>,
}

impl Totals {
    fn walk(&mut self, dir: &Path) -> Result<(), Ext4Error> {
        let walk_err = |source| Ext4Error::Walk {
            path: dir.to_path_buf(),
            source,
        };
        for child in fs::read_dir(dir).map_err(walk_err)? {
            let child = child.map_err(walk_err)?;
            let path = child.path();
            let meta = fs::symlink_metadata(&path).map_err(|source| Ext4Error::Walk {
                path: path.clone(),
                source,
            })?;
            if !self.seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            self.inodes += 1;
            self.bytes += meta.len();
            if meta.is_dir() {
                self.walk(&path)?;
            }
        }
        Ok(())
    }
}

/// Creates `image` as a sparse file of `size_bytes` (rounded up to 4 KiB) holding an ext4 file
/// system labelled `rootfs` with the contents of `dir`.
///
/// Ownership and modes are copied as they are in `dir`, so the tree should be unpacked with
/// owners preserved when the image is meant to boot.
pub fn make_ext4(dir: &Path, image: &Path, size_bytes: u64) -> Result<(), Ext4Error> {
    let size = size_bytes.div_ceil(BLOCK) * BLOCK;
    let create_err = |source| Ext4Error::CreateImage {
        path: image.to_path_buf(),
        source,
    };
    let file = fs::File::create(image).map_err(create_err)?;
    file.set_len(size).map_err(create_err)?;
    drop(file);
    let output = Command::new("mkfs.ext4")
        // Inode tables and journal are written now, so a guest's first mount does not write
        // them into every sandbox's disk layer; no blocks are reserved for root.
        .args(["-q", "-F", "-b", "4096", "-m", "0"])
        .args(["-E", "lazy_itable_init=0,lazy_journal_init=0", "-d"])
        .arg(dir)
        .args(["-L", "rootfs"])
        .arg(image)
        .arg(format!("{}k", size / 1024))
        .output()
        .map_err(|source| Ext4Error::Spawn { source })?;
    if !output.status.success() {
        return Err(Ext4Error::Mkfs {
            image: image.to_path_buf(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// What `debugfs -R REQUEST IMAGE` prints: the crate's tests read ext4 images with it.
#[cfg(test)]
pub(crate) fn debugfs(image: &Path, request: &str) -> String {
    let output = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs runs (e2fsprogs)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfs_available() -> bool {
        let found = Command::new("mkfs.ext4").arg("-V").output().is_ok();
        if !found {
            eprintln!("skipping: mkfs.ext4 is not installed");
        }
        found
    }

    #[test]
    fn tree_size_counts_bytes_inodes_and_hard_links_once() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a"), vec![0u8; 10_000]).unwrap();
        fs::hard_link(tmp.path().join("a"), tmp.path().join("b")).unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        let dir_len = fs::symlink_metadata(tmp.path().join("d")).unwrap().len();
        let bytes = 10_000 + dir_len;
        let expected = (bytes + bytes / 5 + 2 * INODE_OVERHEAD + FIXED_OVERHEAD).div_ceil(BLOCK);
        assert_eq!(tree_size(tmp.path()).unwrap(), expected * BLOCK);
    }

    #[test]
    fn make_ext4_contains_the_tree() {
        if !mkfs_available() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("tree");
        fs::create_dir_all(tree.join("etc")).unwrap();
        fs::write(tree.join("hello.txt"), b"hello from arrakis\n").unwrap();
        fs::write(tree.join("etc/hostname"), b"sandbox\n").unwrap();
        let image = tmp.path().join("rootfs.ext4");
        let size = tree_size(&tree).unwrap();
        make_ext4(&tree, &image, size).unwrap();

        assert_eq!(fs::metadata(&image).unwrap().len(), size);
        let listing = debugfs(&image, "ls -l /");
        assert!(listing.contains("hello.txt"), "listing: {listing}");
        assert!(listing.contains("etc"), "listing: {listing}");
        assert_eq!(debugfs(&image, "cat /hello.txt"), "hello from arrakis\n");
        let stats = debugfs(&image, "stats");
        assert!(
            stats.contains("Filesystem volume name:   rootfs"),
            "{stats}"
        );
    }

    #[test]
    fn make_ext4_reports_mkfs_stderr() {
        if !mkfs_available() {
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("rootfs.ext4");
        let err = make_ext4(&tmp.path().join("missing"), &image, 16 << 20).unwrap_err();
        match err {
            Ext4Error::Mkfs { stderr, .. } => assert!(!stderr.is_empty()),
            other => panic!("expected a mkfs failure, got {other:?}"),
        }
    }
}
