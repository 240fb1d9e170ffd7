//! Reads an ext4 disk image without mounting it, with e2fsprogs' `debugfs`.
//!
//! `rdump / DIR` copies the content out: regular files (with their rwx bits, owner when run
//! as root, and mtime in whole seconds), directories and symlink targets. It is not enough on
//! its own: it drops the setuid, setgid and sticky bits, writes every name of a hard-linked
//! file as a separate copy, leaves symlinks owned by the caller with the time of the dump,
//! and skips device nodes, FIFOs and sockets. So the tree's structure and metadata come from
//! the file system itself: `ls -p` on every directory (one debugfs run per tree level, by
//! inode number so no name is ever quoted) gives each entry's inode, full mode, owner and
//! name, and `stat` gives the mtime and device numbers of the entries rdump cannot carry.
//! Extended attributes (file capabilities, ACLs, SELinux labels) are not read.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::ExportError;

/// The root directory's inode number in every ext2/3/4 file system.
const ROOT_INO: u32 = 2;
/// Where `rdump` writes, under the scratch directory.
const DUMP_DIR: &str = "tree";
/// The directory `mkfs.ext4` makes at the root for `fsck`; not part of the image.
const LOST_AND_FOUND: &[u8] = b"lost+found";

const S_IFMT: u32 = 0o170_000;

/// What an entry is, from the type bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Dir,
    Regular,
    Symlink,
    Char,
    Block,
    Fifo,
    Socket,
}

impl Kind {
    fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & S_IFMT {
            0o040_000 => Kind::Dir,
            0o100_000 => Kind::Regular,
            0o120_000 => Kind::Symlink,
            0o020_000 => Kind::Char,
            0o060_000 => Kind::Block,
            0o010_000 => Kind::Fifo,
            0o140_000 => Kind::Socket,
            _ => return None,
        })
    }
}

/// One entry of the file system (the root itself excluded).
#[derive(Debug, Clone)]
pub(super) struct Node {
    /// Relative to the root, e.g. `etc/passwd`.
    pub path: PathBuf,
    pub ino: u32,
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// What `stat` tells about an inode rdump cannot carry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct InodeTimes {
    /// Seconds since the epoch (may be negative).
    pub mtime: i64,
    /// Major and minor numbers of a device node.
    pub device: Option<(u32, u32)>,
}

/// A dumped disk: the files under `root`, the entries in tar order (each directory's
/// children sorted by name, parents first), and the mtimes and device numbers of symlinks
/// and special files.
#[derive(Debug)]
pub(super) struct DiskTree {
    pub root: PathBuf,
    pub nodes: Vec<Node>,
    pub inodes: HashMap<u32, InodeTimes>,
    /// What `rdump` printed on stderr: why an entry would be missing from the dump.
    pub dump_complaints: String,
}

impl DiskTree {
    /// Where rdump put `node`'s content.
    pub fn dumped(&self, node: &Node) -> PathBuf {
        self.root.join(&node.path)
    }
}

/// Dumps `image` into `scratch/tree` and reads its structure (see the module documentation).
/// The root's `lost+found` directory is left out.
pub(super) fn read_disk(image: &Path, scratch: &Path) -> Result<DiskTree, ExportError> {
    let image = fs::canonicalize(image).map_err(super::io_err("resolving", image))?;
    let root = scratch.join(DUMP_DIR);
    fs::create_dir(&root).map_err(super::io_err("creating", &root))?;
    // Relative to the scratch directory, so no path is ever quoted for debugfs's parser.
    let command = format!("rdump / {DUMP_DIR}");
    let dumped = run_debugfs(&image, scratch, &["-R", &command])?;
    let children = list_dirs(&image, scratch)?;
    let nodes = order(&image, &children)?;
    let wanted: Vec<u32> = nodes
        .iter()
        .filter(|n| !matches!(n.kind, Kind::Dir | Kind::Regular))
        .map(|n| n.ino)
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let inodes = stat_inodes(&image, scratch, &wanted)?;
    let tree = DiskTree {
        root,
        nodes,
        inodes,
        dump_complaints: dumped.stderr,
    };
    make_readable(&tree)?;
    Ok(tree)
}

/// Directory listings of the whole tree, by directory inode, without `.` and `..`.
fn list_dirs(image: &Path, scratch: &Path) -> Result<HashMap<u32, Vec<RawEntry>>, ExportError> {
    let mut children = HashMap::new();
    let mut seen = HashSet::from([ROOT_INO]);
    let mut level = vec![ROOT_INO];
    while !level.is_empty() {
        let commands: Vec<String> = level.iter().map(|ino| format!("ls -p <{ino}>")).collect();
        let ran = run_batch(image, scratch, &commands)?;
        let error = |detail| output_error(image, detail, &ran.stderr);
        let mut listings = parse_listings(&ran.stdout).map_err(error)?;
        let mut next = Vec::new();
        for ino in level {
            let entries = listings
                .remove(&ino)
                .filter(|entries| entries.iter().any(|e| e.name == b"."))
                .ok_or_else(|| error(format!("no listing of directory <{ino}>")))?;
            let entries: Vec<RawEntry> = entries
                .into_iter()
                .filter(|e| e.name != b"." && e.name != b"..")
                .collect();
            for entry in &entries {
                if Kind::from_mode(entry.mode) == Some(Kind::Dir) {
                    if !seen.insert(entry.ino) {
                        return Err(error(format!(
                            "directory <{}> is reachable twice",
                            entry.ino
                        )));
                    }
                    next.push(entry.ino);
                }
            }
            children.insert(ino, entries);
        }
        level = next;
    }
    Ok(children)
}

/// The nodes in tar order: depth first, each directory's children sorted by name.
fn order(image: &Path, children: &HashMap<u32, Vec<RawEntry>>) -> Result<Vec<Node>, ExportError> {
    let sorted = |ino: u32, prefix: &Path| {
        let mut entries: Vec<&RawEntry> = children.get(&ino).into_iter().flatten().collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        entries
            .into_iter()
            .rev()
            .map(|e| (prefix.join(OsStr::from_bytes(&e.name)), e))
            .collect::<Vec<_>>()
    };
    let mut stack = sorted(ROOT_INO, Path::new(""));
    stack
        .retain(|(_, e)| !(e.name == LOST_AND_FOUND && Kind::from_mode(e.mode) == Some(Kind::Dir)));
    let mut nodes = Vec::new();
    while let Some((path, entry)) = stack.pop() {
        let kind = Kind::from_mode(entry.mode).ok_or_else(|| {
            output_error(
                image,
                format!(
                    "`{}` has mode {:o}, which is no known file type",
                    path.display(),
                    entry.mode
                ),
                "",
            )
        })?;
        if kind == Kind::Dir {
            stack.extend(sorted(entry.ino, &path));
        }
        nodes.push(Node {
            path,
            ino: entry.ino,
            kind,
            mode: entry.mode & 0o7777,
            uid: entry.uid,
            gid: entry.gid,
        });
    }
    Ok(nodes)
}

/// `stat` of every inode in `inodes`: mtime and device numbers.
fn stat_inodes(
    image: &Path,
    scratch: &Path,
    inodes: &[u32],
) -> Result<HashMap<u32, InodeTimes>, ExportError> {
    if inodes.is_empty() {
        return Ok(HashMap::new());
    }
    let commands: Vec<String> = inodes.iter().map(|ino| format!("stat <{ino}>")).collect();
    let ran = run_batch(image, scratch, &commands)?;
    let error = |detail| output_error(image, detail, &ran.stderr);
    let stats = parse_stats(&ran.stdout).map_err(error)?;
    for ino in inodes {
        if !stats.contains_key(ino) {
            return Err(error(format!("no stat of inode <{ino}>")));
        }
    }
    Ok(stats)
}

/// Gives the caller read access to the dumped files and directories (and write access to the
/// directories, so the scratch tree can be removed). Only matters when not running as root:
/// rdump applies the image's modes, and a `0600` file of another user, or a `0555`
/// directory, would otherwise be unreadable or unremovable. Times are not touched.
fn make_readable(tree: &DiskTree) -> Result<(), ExportError> {
    for node in &tree.nodes {
        let wanted = match node.kind {
            Kind::Dir => 0o700,
            Kind::Regular => 0o400,
            _ => continue,
        };
        let path = tree.dumped(node);
        let Ok(meta) = fs::symlink_metadata(&path) else {
            // Reported when the entry is read.
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & wanted != wanted {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode | wanted))
                .map_err(super::io_err("making readable", &path))?;
        }
    }
    Ok(())
}

/// Runs debugfs commands from a file in one process and returns what they printed.
fn run_batch(image: &Path, scratch: &Path, commands: &[String]) -> Result<Ran, ExportError> {
    let file = scratch.join("debugfs-commands");
    let mut script = commands.join("\n");
    script.push('\n');
    fs::write(&file, script).map_err(super::io_err("writing", &file))?;
    let output = run_debugfs(image, scratch, &["-f".as_ref(), file.as_os_str()]);
    let _ = fs::remove_file(&file);
    output
}

/// What a debugfs run printed: the commands' output, and its complaints (without the
/// version banner). debugfs exits with 0 even when it cannot open the image or a command
/// fails, so failures show as missing output, explained by `stderr`.
struct Ran {
    stdout: Vec<u8>,
    stderr: String,
}

fn run_debugfs<S: AsRef<OsStr>>(image: &Path, dir: &Path, args: &[S]) -> Result<Ran, ExportError> {
    let output = Command::new("debugfs")
        .args(args)
        .arg(image)
        .current_dir(dir)
        .env("DEBUGFS_PAGER", "__none__")
        .output()
        .map_err(|source| ExportError::DebugfsSpawn { source })?;
    if !output.status.success() {
        return Err(ExportError::Debugfs {
            image: image.to_path_buf(),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let stderr = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|line| !line.starts_with("debugfs 1.") && !line.trim().is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    Ok(Ran {
        stdout: output.stdout,
        stderr,
    })
}

fn output_error(image: &Path, detail: String, stderr: &str) -> ExportError {
    let detail = if stderr.is_empty() {
        detail
    } else {
        format!("{detail}; debugfs said: {stderr}")
    };
    ExportError::DebugfsOutput {
        image: image.to_path_buf(),
        detail,
    }
}

/// One line of `ls -p`: `/INODE/MODE/UID/GID/NAME/SIZE/` (SIZE empty for directories).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RawEntry {
    pub ino: u32,
    /// The full `i_mode`: type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub name: Vec<u8>,
}

/// Parses the output of a batch of `ls -p <INODE>` commands into listings by directory
/// inode. Names may hold any byte but `/` and NUL, newlines included, so entries are read
/// field by field rather than by line.
pub(super) fn parse_listings(output: &[u8]) -> Result<HashMap<u32, Vec<RawEntry>>, String> {
    let mut listings: HashMap<u32, Vec<RawEntry>> = HashMap::new();
    let mut current: Option<u32> = None;
    let mut rest = output;
    loop {
        while let [b'\n', tail @ ..] = rest {
            rest = tail;
        }
        if rest.is_empty() {
            return Ok(listings);
        }
        if let Some(tail) = rest.strip_prefix(b"debugfs: ") {
            let (line, tail) = split_at_byte(tail, b'\n').unwrap_or((tail, &[]));
            let ino = command_inode(line, "ls -p <")?;
            listings.insert(ino, Vec::new());
            current = Some(ino);
            rest = tail;
            continue;
        }
        let Some(mut tail) = rest.strip_prefix(b"/") else {
            return Err(format!(
                "unexpected line in a listing: {:?}",
                String::from_utf8_lossy(rest.split(|b| *b == b'\n').next().unwrap_or(rest))
            ));
        };
        let mut fields: [&[u8]; 6] = [&[]; 6];
        for field in &mut fields {
            let (value, after) = split_at_byte(tail, b'/').ok_or("a listing entry is cut short")?;
            *field = value;
            tail = after;
        }
        rest = tail.strip_prefix(b"\n").unwrap_or(tail);
        let number = |bytes: &[u8], radix: u32| -> Result<i64, String> {
            std::str::from_utf8(bytes)
                .ok()
                .and_then(|s| i64::from_str_radix(s, radix).ok())
                .ok_or_else(|| format!("bad number {:?}", String::from_utf8_lossy(bytes)))
        };
        let entry = RawEntry {
            ino: number(fields[0], 10)? as u32,
            mode: number(fields[1], 8)? as u32,
            // debugfs prints ids with `%d`: ids above 2^31 come out negative.
            uid: number(fields[2], 10)? as u32,
            gid: number(fields[3], 10)? as u32,
            name: fields[4].to_vec(),
        };
        let dir = current.ok_or("a listing entry before any command")?;
        listings.entry(dir).or_default().push(entry);
    }
}

/// Parses the output of a batch of `stat <INODE>` commands: the inode's mtime (its first
/// `mtime:` line, which comes before the extended attributes and link target) and, for
/// devices, the last `Device major/minor number:` line.
pub(super) fn parse_stats(output: &[u8]) -> Result<HashMap<u32, InodeTimes>, String> {
    let text = String::from_utf8_lossy(output);
    let mut stats: HashMap<u32, InodeTimes> = HashMap::new();
    let mut current: Option<(u32, bool)> = None;
    for line in text.lines() {
        if let Some(command) = line.strip_prefix("debugfs: ") {
            let ino = command_inode(command.as_bytes(), "stat <")?;
            stats.insert(ino, InodeTimes::default());
            current = Some((ino, false));
            continue;
        }
        let Some((ino, have_mtime)) = current.as_mut() else {
            continue;
        };
        let stat = stats.get_mut(ino).expect("inserted at its command");
        let trimmed = line.trim_start();
        if let Some(value) = trimmed.strip_prefix("mtime: 0x") {
            if !*have_mtime {
                stat.mtime = parse_time(value)?;
                *have_mtime = true;
            }
        } else if let Some(value) = trimmed.strip_prefix("Device major/minor number: ") {
            let numbers = value.split_whitespace().next().unwrap_or_default();
            let (major, minor) = numbers
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .ok_or_else(|| format!("bad device numbers {value:?}"))?;
            stat.device = Some((major, minor));
        }
    }
    Ok(stats)
}

/// `6553f100:00000000 -- Tue Nov 14 ...` or `6553f100 -- ...`: the 32-bit seconds, signed,
/// plus the epoch bits of the extra field.
fn parse_time(value: &str) -> Result<i64, String> {
    let hex = value.split_whitespace().next().unwrap_or_default();
    let (seconds, extra) = hex.split_once(':').unwrap_or((hex, "0"));
    let bad = || format!("bad time {value:?}");
    let seconds = u32::from_str_radix(seconds, 16).map_err(|_| bad())? as i32 as i64;
    let extra = u32::from_str_radix(extra, 16).map_err(|_| bad())?;
    Ok(seconds + (i64::from(extra & 3) << 32))
}

/// The inode number of a `debugfs: <command><N>` echo line.
fn command_inode(line: &[u8], command: &str) -> Result<u32, String> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|line| line.strip_prefix(command))
        .and_then(|rest| rest.strip_suffix('>'))
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| {
            format!(
                "unexpected command echo {:?}",
                String::from_utf8_lossy(line)
            )
        })
}

fn split_at_byte(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|b| *b == separator)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}
