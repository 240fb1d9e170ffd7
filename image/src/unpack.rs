//! Applies OCI image layers (tar streams, optionally gzip or zstd compressed) onto a directory,
//! following the layer rules of the OCI image spec (`layer.md`): whiteouts, opaque directories,
//! type changes, hard links, device nodes and metadata.
//!
//! Layers come from registries and are untrusted: every entry path is normalized, must stay
//! inside the root, and is never written through a symlink (see [`fsops`] for how).

mod fsops;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tar::EntryType;

use fsops::{MissingParents, NodeKind, Timestamp};

/// Marks a directory as opaque: lower layers' entries in it are hidden.
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Prefix of a whiteout file: `.wh.name` deletes `name` from lower layers.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// Names starting with this are reserved by the spec for markers other than whiteouts.
const RESERVED_PREFIX: &[u8] = b".wh..wh.";
const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Maps an OCI or Docker layer media type to its compression; `None` for unknown types
    /// (for instance foreign or encrypted layers) so the caller can refuse them by name.
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }

    /// A reader of what `reader` decompresses to (itself when uncompressed). Gzip streams may
    /// have several members, as `tar | gzip` of concatenated parts writes them.
    pub fn decoder<'a, R: Read + 'a>(self, reader: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(reader),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader)?),
        })
    }
}

/// Guesses the compression from the first bytes of a blob, for registries that serve layers
/// under a generic media type.
pub fn detect(first_bytes: &[u8]) -> Compression {
    if first_bytes.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if first_bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// What the unpacker may do beyond writing files, since both need root.
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// Chown every entry to the uid/gid recorded in the tar (needs root or CAP_CHOWN).
    /// Without it, entries belong to the unpacking user.
    pub preserve_owner: bool,
    /// Create character and block devices (needs CAP_MKNOD). Without it they are skipped and
    /// counted in [`LayerStats::skipped_devices`]. FIFOs need no privilege and are always made.
    pub create_devices: bool,
}

impl UnpackOptions {
    /// Everything the current user can do: full fidelity as root, files only otherwise.
    pub fn for_current_user() -> UnpackOptions {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        UnpackOptions {
            preserve_owner: root,
            create_devices: root,
        }
    }
}

/// Counts of what one layer did, for progress reporting and image size estimates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Device nodes and FIFOs created.
    pub devices: u64,
    /// Whiteout files and opaque markers applied.
    pub whiteouts: u64,
    /// Device nodes not created because [`UnpackOptions::create_devices`] was off.
    pub skipped_devices: u64,
    /// Extended attributes the file system or the caller's privileges did not accept.
    pub skipped_xattrs: u64,
    /// Regular file content bytes written.
    pub bytes: u64,
}

/// Why an entry was refused as unsafe or malformed.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    #[error("the path is absolute")]
    Absolute,
    #[error("`..` climbs above the root")]
    EscapesRoot,
    #[error("the path names the root itself")]
    IsRoot,
    #[error("parent `{}` is a symlink", .0.display())]
    SymlinkParent(PathBuf),
    #[error("parent `{}` is not a directory", .0.display())]
    ParentNotDir(PathBuf),
    #[error("whiteout names no file (`.wh.` followed by nothing, `.` or `..`)")]
    BadWhiteout,
    #[error("the entry has no link target")]
    MissingLinkName,
    #[error("hard link target `{}` does not exist in the root", .0.display())]
    MissingLinkTarget(PathBuf),
    #[error("hard link target `{}` is a directory", .0.display())]
    LinkToDirectory(PathBuf),
    #[error("hard link target: {0}")]
    LinkTarget(Box<Rejection>),
    #[error("entry type {0:?} is not supported")]
    UnsupportedType(EntryType),
}

/// Errors of [`apply_layer`] and [`apply_layer_compressed`].
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("reading the layer archive")]
    Archive {
        #[source]
        source: io::Error,
    },
    #[error("reading layer entry `{}`", path.display())]
    Entry {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting the {compression:?} decoder")]
    Decoder {
        compression: Compression,
        #[source]
        source: io::Error,
    },
    #[error("layer entry `{}` rejected: {reason}", path.display())]
    Rejected { path: PathBuf, reason: Rejection },
    #[error("{op} `{}`", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl UnpackError {
    fn rejected(path: &Path, reason: Rejection) -> UnpackError {
        UnpackError::Rejected {
            path: path.to_path_buf(),
            reason,
        }
    }

    fn io(op: &'static str, path: &Path, source: io::Error) -> UnpackError {
        UnpackError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    fn entry(path: &Path, source: io::Error) -> UnpackError {
        UnpackError::Entry {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Decompresses `reader` as `compression` says and applies the layer (see [`apply_layer`]).
pub fn apply_layer_compressed(
    reader: impl Read,
    compression: Compression,
    root: &Path,
    options: &UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let decoder = compression
        .decoder(reader)
        .map_err(|source| UnpackError::Decoder {
            compression,
            source,
        })?;
    apply_layer(decoder, root, options)
}

/// Applies one uncompressed layer tar stream on top of `root`, which holds the layers below.
///
/// `root` itself is trusted (it is the caller's scratch directory) and must not be modified by
/// anyone else while this runs; everything below it is treated as attacker-controlled.
pub fn apply_layer(
    reader: impl Read,
    root: &Path,
    options: &UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut layer = Layer {
        root,
        options,
        stats: LayerStats::default(),
        kept: HashSet::new(),
        dirs: Vec::new(),
    };
    let entries = archive
        .entries()
        .map_err(|source| UnpackError::Archive { source })?;
    for entry in entries {
        let mut entry = entry.map_err(|source| UnpackError::Archive { source })?;
        layer.apply_entry(&mut entry)?;
    }
    layer.finish_dirs()?;
    Ok(layer.stats)
}

/// Metadata of one entry, with PAX records applied over the ustar header fields.
struct EntryMeta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: Timestamp,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, path: &Path) -> Result<EntryMeta, UnpackError> {
        let header = entry.header();
        let field = |r: io::Result<u64>| r.map_err(|e| UnpackError::entry(path, e));
        let mut meta = EntryMeta {
            mode: header.mode().map_err(|e| UnpackError::entry(path, e))?,
            uid: field(header.uid())?,
            gid: field(header.gid())?,
            mtime: Timestamp {
                secs: i64::try_from(field(header.mtime())?).unwrap_or(i64::MAX),
                nanos: 0,
            },
            xattrs: Vec::new(),
        };
        let Some(extensions) = entry
            .pax_extensions()
            .map_err(|e| UnpackError::entry(path, e))?
        else {
            return Ok(meta);
        };
        for extension in extensions {
            let extension = extension.map_err(|e| UnpackError::entry(path, e))?;
            meta.apply_pax(extension.key_bytes(), extension.value_bytes());
        }
        Ok(meta)
    }

    /// PAX records override header fields that do not fit ustar (large ids, sub-second times).
    fn apply_pax(&mut self, key: &[u8], value: &[u8]) {
        let text = std::str::from_utf8(value).unwrap_or("");
        match key {
            b"uid" => self.uid = text.parse().unwrap_or(self.uid),
            b"gid" => self.gid = text.parse().unwrap_or(self.gid),
            b"mtime" => self.mtime = parse_pax_time(text).unwrap_or(self.mtime),
            _ => {
                if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                    self.xattrs.push((name.to_vec(), value.to_vec()));
                }
            }
        }
    }
}

/// Parses a PAX time such as `1700000000.5`; negative fractional times keep only whole seconds.
fn parse_pax_time(text: &str) -> Option<Timestamp> {
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    let secs: i64 = secs.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let nanos = if secs < 0 || digits.is_empty() {
        0
    } else {
        format!("{digits:0<9}").parse().ok()?
    };
    Some(Timestamp { secs, nanos })
}

/// A directory whose mode and mtime are applied after the whole layer is written: writing
/// entries inside would bump its mtime, and a read-only mode would block those writes.
struct PendingDir {
    rel: PathBuf,
    mode: u32,
    mtime: Timestamp,
}

/// State of one layer being applied.
struct Layer<'a> {
    root: &'a Path,
    options: &'a UnpackOptions,
    stats: LayerStats,
    /// Paths this layer wrote, and all their ancestors. Whiteouts and opaque markers only act on
    /// lower layers, so whatever is in here survives them whatever the order in the tar.
    kept: HashSet<PathBuf>,
    dirs: Vec<PendingDir>,
}

impl Layer<'_> {
    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry
            .path()
            .map_err(|source| UnpackError::Archive { source })?
            .into_owned();
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            return Ok(());
        }
        let rel = fsops::normalize(&raw).map_err(|reason| UnpackError::rejected(&raw, reason))?;
        if let Some(name) = rel.file_name() {
            if name.as_bytes().starts_with(WHITEOUT_PREFIX) {
                return self.whiteout(&rel, name);
            }
        } else if !kind.is_dir() {
            return Err(UnpackError::rejected(&raw, Rejection::IsRoot));
        }
        let meta = EntryMeta::read(entry, &raw)?;
        fsops::resolve_parents(self.root, &rel, &raw, MissingParents::Create)?;
        let path = self.root.join(&rel);
        match kind {
            EntryType::Directory => self.directory(&path, &rel, meta)?,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.regular(entry, &path, meta)?
            }
            EntryType::Symlink => self.symlink(entry, &raw, &path, meta)?,
            EntryType::Link => self.hardlink(entry, &raw, &rel)?,
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.node(entry, &raw, &path, meta)?
            }
            other => {
                return Err(UnpackError::rejected(
                    &raw,
                    Rejection::UnsupportedType(other),
                ))
            }
        }
        self.keep(&rel);
        Ok(())
    }

    fn keep(&mut self, rel: &Path) {
        for ancestor in rel.ancestors() {
            if !self.kept.insert(ancestor.to_path_buf()) {
                break;
            }
        }
    }

    /// Applies `.wh.<name>` (delete `name` from lower layers) or the opaque marker.
    fn whiteout(&mut self, rel: &Path, name: &OsStr) -> Result<(), UnpackError> {
        let dir = rel.parent().unwrap_or(Path::new(""));
        let target = if name == OPAQUE_MARKER {
            None
        } else if name.as_bytes().starts_with(RESERVED_PREFIX) {
            return Ok(());
        } else {
            let target = &name.as_bytes()[WHITEOUT_PREFIX.len()..];
            if matches!(target, b"" | b"." | b"..") {
                return Err(UnpackError::rejected(rel, Rejection::BadWhiteout));
            }
            Some(dir.join(OsStr::from_bytes(target)))
        };
        if !fsops::resolve_parents(self.root, rel, rel, MissingParents::Report)? {
            return Ok(());
        }
        self.stats.whiteouts += 1;
        match target {
            Some(target) => self.prune_lower(&target),
            None => self.prune_children(dir),
        }
    }

    /// Removes what lower layers put at `rel`, keeping anything this layer wrote there.
    fn prune_lower(&self, rel: &Path) -> Result<(), UnpackError> {
        let path = self.root.join(rel);
        if !self.kept.contains(rel) {
            return fsops::remove_any(&path);
        }
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => self.prune_children(rel),
            _ => Ok(()),
        }
    }

    fn prune_children(&self, rel: &Path) -> Result<(), UnpackError> {
        let path = self.root.join(rel);
        let children = match fs::read_dir(&path) {
            Ok(children) => children,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(UnpackError::io("listing", &path, e)),
        };
        for child in children {
            let child = child.map_err(|e| UnpackError::io("listing", &path, e))?;
            self.prune_lower(&rel.join(child.file_name()))?;
        }
        Ok(())
    }

    /// Makes room for a new node at `path`: removes anything there unless it is a directory
    /// and `keep_dir` is set. Returns whether an existing directory was kept.
    fn clear(&self, path: &Path, keep_dir: bool) -> Result<bool, UnpackError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if keep_dir && meta.is_dir() => Ok(true),
            Ok(_) => fsops::remove_any(path).map(|()| false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(UnpackError::io("inspecting", path, e)),
        }
    }

    fn directory(&mut self, path: &Path, rel: &Path, meta: EntryMeta) -> Result<(), UnpackError> {
        if !self.clear(path, true)? {
            fsops::create_dir(path, 0o700)?;
        }
        self.owner_and_xattrs(path, &meta)?;
        self.dirs.push(PendingDir {
            rel: rel.to_path_buf(),
            mode: meta.mode,
            mtime: meta.mtime,
        });
        self.stats.dirs += 1;
        Ok(())
    }

    fn regular<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        meta: EntryMeta,
    ) -> Result<(), UnpackError> {
        self.clear(path, false)?;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| UnpackError::io("creating", path, e))?;
        let written = io::copy(entry, &mut file).map_err(|e| UnpackError::entry(path, e))?;
        drop(file);
        self.stats.bytes += written;
        self.stats.files += 1;
        self.finish_node(path, &meta)
    }

    fn symlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        raw: &Path,
        path: &Path,
        meta: EntryMeta,
    ) -> Result<(), UnpackError> {
        let target = link_name(entry, raw)?;
        self.clear(path, false)?;
        std::os::unix::fs::symlink(&target, path)
            .map_err(|e| UnpackError::io("creating symlink", path, e))?;
        self.stats.symlinks += 1;
        self.owner_and_xattrs(path, &meta)?;
        fsops::set_mtime(path, meta.mtime)
    }

    /// Links `rel` to another path of the root. The target is an archive path too, so it gets
    /// the same checks; `link(2)` itself never follows a symlink target.
    fn hardlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        raw: &Path,
        rel: &Path,
    ) -> Result<(), UnpackError> {
        let reject = |reason| UnpackError::rejected(raw, Rejection::LinkTarget(Box::new(reason)));
        let target_raw = link_name(entry, raw)?;
        let target_rel = fsops::normalize(&target_raw).map_err(reject)?;
        let present = fsops::resolve_parents(self.root, &target_rel, raw, MissingParents::Report)
            .map_err(|e| match e {
            UnpackError::Rejected { reason, .. } => reject(reason),
            other => other,
        })?;
        let target = self.root.join(&target_rel);
        match fs::symlink_metadata(&target) {
            Ok(meta) if meta.is_dir() => {
                return Err(reject(Rejection::LinkToDirectory(target_rel)));
            }
            Ok(_) if present => {}
            _ => return Err(reject(Rejection::MissingLinkTarget(target_rel))),
        }
        if target_rel == rel {
            return Ok(());
        }
        let path = self.root.join(rel);
        self.clear(&path, false)?;
        fs::hard_link(&target, &path).map_err(|e| UnpackError::io("hard linking", &path, e))?;
        self.stats.hardlinks += 1;
        Ok(())
    }

    fn node<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        raw: &Path,
        path: &Path,
        meta: EntryMeta,
    ) -> Result<(), UnpackError> {
        let header = entry.header();
        let number = |r: io::Result<Option<u32>>| {
            r.map(Option::unwrap_or_default)
                .map_err(|e| UnpackError::entry(raw, e))
        };
        // FIFOs carry no device numbers, and some writers leave those fields blank for them.
        let kind = match header.entry_type() {
            EntryType::Fifo => NodeKind::Fifo,
            block_or_char => {
                let major = number(header.device_major())?;
                let minor = number(header.device_minor())?;
                if block_or_char == EntryType::Block {
                    NodeKind::Block { major, minor }
                } else {
                    NodeKind::Char { major, minor }
                }
            }
        };
        if !matches!(kind, NodeKind::Fifo) && !self.options.create_devices {
            self.stats.skipped_devices += 1;
            return Ok(());
        }
        self.clear(path, false)?;
        fsops::make_node(path, kind, meta.mode)?;
        self.stats.devices += 1;
        self.finish_node(path, &meta)
    }

    /// Owner, then mode (chown clears setuid bits), then xattrs (chown clears file
    /// capabilities), then mtime last so nothing bumps it again.
    fn finish_node(&mut self, path: &Path, meta: &EntryMeta) -> Result<(), UnpackError> {
        if self.options.preserve_owner {
            fsops::set_owner(path, meta.uid, meta.gid)?;
        }
        fsops::set_mode(path, meta.mode)?;
        self.xattrs(path, meta)?;
        fsops::set_mtime(path, meta.mtime)
    }

    fn owner_and_xattrs(&mut self, path: &Path, meta: &EntryMeta) -> Result<(), UnpackError> {
        if self.options.preserve_owner {
            fsops::set_owner(path, meta.uid, meta.gid)?;
        }
        self.xattrs(path, meta)
    }

    /// Unprivileged unpacks tolerate EPERM (e.g. `security.capability`) as well as EOPNOTSUPP.
    fn xattrs(&mut self, path: &Path, meta: &EntryMeta) -> Result<(), UnpackError> {
        let tolerate_eperm = !self.options.preserve_owner;
        for (name, value) in &meta.xattrs {
            if !fsops::set_xattr(path, name, value, tolerate_eperm)? {
                self.stats.skipped_xattrs += 1;
            }
        }
        Ok(())
    }

    /// Applies directory modes and mtimes, deepest last-written first. Later entries may have
    /// replaced a directory (or one of its parents, even by a symlink), so each is re-checked
    /// and silently dropped when it is no longer a real directory reachable without symlinks.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        for dir in self.dirs.iter().rev() {
            let reachable = matches!(
                fsops::resolve_parents(self.root, &dir.rel, &dir.rel, MissingParents::Report),
                Ok(true)
            );
            let path = self.root.join(&dir.rel);
            let is_dir = fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            if reachable && is_dir {
                fsops::set_mode(&path, dir.mode)?;
                fsops::set_mtime(&path, dir.mtime)?;
            }
        }
        Ok(())
    }
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>, raw: &Path) -> Result<PathBuf, UnpackError> {
    entry
        .link_name()
        .map_err(|e| UnpackError::entry(raw, e))?
        .map(|name| name.into_owned())
        .ok_or_else(|| UnpackError::rejected(raw, Rejection::MissingLinkName))
}
