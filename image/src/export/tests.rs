use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, MetadataExt};

use tar::{EntryType, Header};

use super::disk::{self, Kind};
use super::*;
use crate::archive;
use crate::unpack::{self, Compression, UnpackOptions};

const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// Mount points the store's `prepare` adds when missing; the test trees have them so a
/// converted image holds exactly the tree.
const MOUNT_POINTS: &[&str] = &["proc", "sys", "dev", "run", "tmp", "root"];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: owners and device nodes need root");
    }
    root
}

fn r(reference: &str) -> ImageRef {
    ImageRef::parse(reference).unwrap()
}

use crate::ext4::debugfs;

// ---- describing trees, on the host and in an ext4 image, in one format ----

fn device_numbers(rdev: u64) -> (u64, u64) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major, minor)
}

/// Every entry under `root` (not `root` itself): kind, mode, owner, mtime and content, link
/// target or device numbers; a second name of a file says which name it shares.
fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<String, String>,
        seen: &mut HashMap<u64, String>,
    ) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let kind = meta.file_type();
            if !kind.is_dir() {
                if let Some(first) = seen.get(&meta.ino()) {
                    out.insert(rel, format!("same file as {first}"));
                    continue;
                }
                seen.insert(meta.ino(), rel.clone());
            }
            let detail = if kind.is_dir() {
                "dir".to_owned()
            } else if kind.is_file() {
                format!(
                    "file {:?}",
                    String::from_utf8_lossy(&fs::read(&path).unwrap())
                )
            } else if kind.is_symlink() {
                format!("symlink -> {}", fs::read_link(&path).unwrap().display())
            } else {
                use std::os::unix::fs::FileTypeExt;
                let (major, minor) = device_numbers(meta.rdev());
                if kind.is_fifo() {
                    "fifo".to_owned()
                } else if kind.is_char_device() {
                    format!("char {major}:{minor}")
                } else if kind.is_block_device() {
                    format!("block {major}:{minor}")
                } else {
                    "socket".to_owned()
                }
            };
            out.insert(
                rel,
                format!(
                    "{detail} mode={:o} owner={}:{} mtime={}",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    meta.mtime()
                ),
            );
            if kind.is_dir() {
                walk(root, &path, out, seen);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, &mut HashMap::new());
    out
}

/// [`describe_tree`] of an ext4 image, read with [`disk::read_disk`].
fn describe_disk(image: &Path) -> BTreeMap<String, String> {
    let scratch = tempfile::tempdir().unwrap();
    let tree = disk::read_disk(image, scratch.path()).unwrap();
    let mut out = BTreeMap::new();
    let mut seen: HashMap<u32, String> = HashMap::new();
    for node in &tree.nodes {
        let rel = node.path.to_string_lossy().into_owned();
        if node.kind != Kind::Dir {
            if let Some(first) = seen.get(&node.ino) {
                out.insert(rel, format!("same file as {first}"));
                continue;
            }
            seen.insert(node.ino, rel.clone());
        }
        let dumped = tree.dumped(node);
        let stat = tree.inodes.get(&node.ino).copied().unwrap_or_default();
        let (detail, mtime) = match node.kind {
            Kind::Dir => ("dir".to_owned(), fs::metadata(&dumped).unwrap().mtime()),
            Kind::Regular => (
                format!(
                    "file {:?}",
                    String::from_utf8_lossy(&fs::read(&dumped).unwrap())
                ),
                fs::metadata(&dumped).unwrap().mtime(),
            ),
            Kind::Symlink => (
                format!("symlink -> {}", fs::read_link(&dumped).unwrap().display()),
                stat.mtime,
            ),
            Kind::Fifo => ("fifo".to_owned(), stat.mtime),
            Kind::Char | Kind::Block => {
                let (major, minor) = stat.device.unwrap();
                let kind = if node.kind == Kind::Char {
                    "char"
                } else {
                    "block"
                };
                (format!("{kind} {major}:{minor}"), stat.mtime)
            }
            Kind::Socket => ("socket".to_owned(), stat.mtime),
        };
        out.insert(
            rel,
            format!(
                "{detail} mode={:o} owner={}:{} mtime={mtime}",
                node.mode, node.uid, node.gid
            ),
        );
    }
    out
}

// ---- a host tree with every kind of entry, packed into ext4 like a build does ----

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn set_mtime(path: &Path, secs: i64) {
    let times = [
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: secs,
            tv_nsec: 0,
        },
    ];
    let path = c_path(path);
    // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
}

fn mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A tree with directories, files of other owners, setuid and sticky bits, symlinks (one
/// dangling, one owned by a user), a hard link, a FIFO, a character device, a socket, odd
/// and long names, and a distinct mtime on everything. Needs root.
fn build_tree(root: &Path) {
    for dir in MOUNT_POINTS.iter().chain(&["etc", "bin", "opt/app"]) {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join("etc/hello"), "hello\n").unwrap();
    fs::hard_link(root.join("etc/hello"), root.join("etc/hello-again")).unwrap();
    fs::write(root.join("opt/app/secret"), "secret\n").unwrap();
    lchown(root.join("opt/app/secret"), Some(1000), Some(1000)).unwrap();
    mode(&root.join("opt/app/secret"), 0o600);
    lchown(root.join("opt/app"), Some(1000), Some(1000)).unwrap();
    mode(&root.join("opt/app"), 0o750);
    fs::write(root.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    mode(&root.join("bin/tool"), 0o4755);
    mode(&root.join("tmp"), 0o1777);
    std::os::unix::fs::symlink("../etc/hello", root.join("bin/hello")).unwrap();
    std::os::unix::fs::symlink("/nowhere", root.join("dangling")).unwrap();
    lchown(root.join("dangling"), Some(1000), Some(1000)).unwrap();
    fs::write(root.join("etc/odd\nname with space"), "odd\n").unwrap();
    let long = root.join(format!("opt/{}/{}", "d".repeat(70), "f".repeat(90)));
    fs::create_dir_all(long.parent().unwrap()).unwrap();
    fs::write(&long, "long\n").unwrap();
    let fifo = c_path(&root.join("run/pipe"));
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    let device = c_path(&root.join("dev/null"));
    // SAFETY: a NUL-terminated path; mknod takes no other pointer.
    let rc = unsafe { libc::mknod(device.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    std::os::unix::net::UnixListener::bind(root.join("run/socket")).unwrap();

    // Children first, so setting a child's time does not move its parent's.
    let mut all: Vec<PathBuf> = describe_tree(root)
        .keys()
        .map(|rel| root.join(rel))
        .collect();
    all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (n, path) in all.iter().enumerate() {
        set_mtime(path, 1_600_000_000 + n as i64 * 1000);
    }
}

fn built_config() -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Env": ["PATH=/bin", "BUILT=yes"], "WorkingDir": "/opt/app", "User": "1000",
            "Cmd": ["sh"], "Entrypoint": ["/bin/tool"], "ExposedPorts": {"80/tcp": {}},
            "Labels": {"team": "sandbox"},
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    })
}

/// A built-style image (a disk and a manifest without layers) of `tree`, tagged `reference`.
fn add_built(store: &ImageStore, tree: &Path, reference: &str) -> PreparedDisk {
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("rootfs.ext4");
    crate::ext4::make_ext4(tree, &image, crate::ext4::tree_size(tree).unwrap()).unwrap();
    let config = serde_json::to_vec(&built_config()).unwrap();
    let prepared = store
        .add_disk_image(&r(reference), &config, &image, "test-build")
        .unwrap();
    PreparedDisk {
        digest: prepared.digest,
        rootfs: prepared.rootfs,
    }
}

struct PreparedDisk {
    digest: Digest,
    rootfs: PathBuf,
}

// ---- reading exported layouts ----

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &Digest) -> Vec<u8> {
    fs::read(layout.join("blobs/sha256").join(digest.hex())).unwrap()
}

fn only_manifest(layout: &Path) -> (Descriptor, Manifest) {
    let index: Index = read_json(&layout.join("index.json"));
    assert_eq!(index.manifests.len(), 1, "{index:?}");
    let entry = index.manifests[0].clone();
    let manifest = serde_json::from_slice(&blob(layout, &entry.digest)).unwrap();
    (entry, manifest)
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

// ---- pulled-style images: layers in the store ----

fn header(path: &str, kind: EntryType, mode: u32, owner: u64, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_path(path).unwrap();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(owner);
    header.set_gid(owner);
    header.set_mtime(1_700_000_000);
    header.set_size(size);
    header.set_cksum();
    header
}

fn lower_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for dir in MOUNT_POINTS.iter().chain(&["etc", "srv", "old"]) {
        let header = header(dir, EntryType::Directory, 0o755, 0, 0);
        tar.append(&header, io::empty()).unwrap();
    }
    let files: &[(&str, u32, u64, &[u8])] = &[
        ("etc/motd", 0o644, 0, b"hi there\n"),
        ("srv/owned", 0o600, 1000, b"mine\n"),
        ("srv/tool", 0o4755, 0, b"#!/bin/sh\n"),
        ("old/gone", 0o644, 0, b"deleted above\n"),
    ];
    for (path, mode, owner, data) in files {
        let header = header(path, EntryType::Regular, *mode, *owner, data.len() as u64);
        tar.append(&header, *data).unwrap();
    }
    let mut link = header("srv/motd-link", EntryType::Link, 0o644, 0, 0);
    link.set_link_name("etc/motd").unwrap();
    link.set_cksum();
    tar.append(&link, io::empty()).unwrap();
    let mut symlink = header("srv/motd", EntryType::Symlink, 0o777, 0, 0);
    symlink.set_link_name("../etc/motd").unwrap();
    symlink.set_cksum();
    tar.append(&symlink, io::empty()).unwrap();
    let fifo = header("run/fifo", EntryType::Fifo, 0o600, 0, 0);
    tar.append(&fifo, io::empty()).unwrap();
    tar.into_inner().unwrap()
}

fn upper_layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let whiteout = header("old/.wh.gone", EntryType::Regular, 0o644, 0, 0);
    tar.append(&whiteout, io::empty()).unwrap();
    let data = b"added above\n";
    let file = header("srv/new", EntryType::Regular, 0o644, 0, data.len() as u64);
    tar.append(&file, &data[..]).unwrap();
    tar.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// Stores a two-layer image (one gzip layer, one plain) and tags it; returns its manifest.
fn add_layered(store: &ImageStore, reference: &str) -> Descriptor {
    let lower = lower_layer();
    let upper = upper_layer();
    let lower_blob = gzip(&lower);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["GREETING=hello"], "WorkingDir": "/srv"},
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(&lower).to_string(), Digest::of(&upper).to_string()]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let write = |bytes: &[u8]| store.blobs().write_bytes(bytes).unwrap();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_MANIFEST.to_owned()),
        config: plain(MEDIA_TYPE_CONFIG, write(&config), config.len() as u64),
        layers: vec![
            plain(
                MEDIA_TYPE_LAYER_GZIP,
                write(&lower_blob),
                lower_blob.len() as u64,
            ),
            plain(TAR_LAYER, write(&upper), upper.len() as u64),
        ],
    };
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let descriptor = plain(MEDIA_TYPE_MANIFEST, write(&manifest), manifest.len() as u64);
    store.tag(&r(reference), &descriptor).unwrap();
    descriptor
}

#[test]
fn a_pulled_image_is_copied_byte_for_byte_and_imports_back_to_the_same_files() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("a")).unwrap();
    let tagged = add_layered(&store, "localhost:5000/team/app:1");
    let original = store.prepare(&tagged, 1 << 20).unwrap();

    let dest = tmp.path().join("out/layout");
    let exported = export_image(&store, "localhost:5000/team/app:1", &dest).unwrap();
    assert_eq!(exported.manifest.digest, tagged.digest);
    assert_eq!(exported.flattened, None);
    assert_eq!(
        fs::read(dest.join("oci-layout")).unwrap(),
        LAYOUT_MARKER.to_vec()
    );
    let (entry, manifest) = only_manifest(&dest);
    assert_eq!(entry.digest, tagged.digest);
    assert_eq!(
        entry.ref_name(),
        Some("localhost:5000/team/app:1"),
        "{entry:?}"
    );
    assert_eq!(
        entry.annotations[ANNOTATION_IMAGE_NAME],
        "localhost:5000/team/app:1"
    );
    // Every blob is the store's, byte for byte, and nothing else is there.
    let mut expected: Vec<&Digest> = vec![&tagged.digest, &manifest.config.digest];
    expected.extend(manifest.layers.iter().map(|l| &l.digest));
    let mut present: Vec<String> = fs::read_dir(dest.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    let mut wanted: Vec<String> = expected.iter().map(|d| d.hex().to_owned()).collect();
    wanted.sort();
    assert_eq!(present, wanted);
    for digest in expected {
        assert_eq!(
            blob(&dest, digest),
            fs::read(store.blobs().path(digest)).unwrap(),
            "{digest}"
        );
    }

    // Imported into another store, it converts to the same files.
    let other = ImageStore::open(&tmp.path().join("b")).unwrap();
    let imported = archive::import_layout_dir(&dest, other.blobs()).unwrap();
    assert_eq!(imported.len(), 1);
    assert_eq!(
        imported[0].references,
        vec!["localhost:5000/team/app:1".to_owned()]
    );
    assert_eq!(imported[0].manifest.digest, tagged.digest);
    let again = other.prepare(&imported[0].manifest, 1 << 20).unwrap();
    assert_eq!(
        describe_disk(&again.rootfs),
        describe_disk(&original.rootfs)
    );
    assert_eq!(debugfs(&again.rootfs, "cat /srv/owned"), "mine\n");
    assert_eq!(debugfs(&again.rootfs, "cat /srv/new"), "added above\n");
    assert!(debugfs(&again.rootfs, "ls /old").contains('.'));
    assert!(!debugfs(&again.rootfs, "ls /old").contains("gone"));
}

#[test]
fn a_built_image_becomes_one_layer_that_unpacks_to_the_same_tree() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    build_tree(&tree);
    let store = ImageStore::open(&tmp.path().join("images")).unwrap();
    let built = add_built(&store, &tree, "built:1");
    // The disk holds the tree (lost+found aside): what the export reads.
    let mut on_disk = describe_tree(&tree);
    assert_eq!(describe_disk(&built.rootfs), on_disk);

    let dest = tmp.path().join("layout");
    let exported = export_image(&store, "built:1", &dest).unwrap();
    assert_eq!(exported.reference, r("built:1"));
    let stats = exported.flattened.clone().unwrap();
    assert_eq!(stats.hardlinks, 1, "{stats:?}");
    assert_eq!(stats.symlinks, 2, "{stats:?}");
    assert_eq!(stats.devices, 2, "{stats:?}");
    assert_eq!(stats.sockets_skipped, 1, "{stats:?}");

    let (entry, manifest) = only_manifest(&dest);
    assert_eq!(entry.digest, exported.manifest.digest);
    assert_eq!(entry.ref_name(), Some("docker.io/library/built:1"));
    assert_eq!(
        entry.platform.as_ref().map(ToString::to_string).as_deref(),
        Some("linux/amd64")
    );
    assert_eq!(manifest.layers.len(), 1);
    assert_eq!(manifest.layers[0].media_type, MEDIA_TYPE_LAYER_GZIP);
    let layer = blob(&dest, &manifest.layers[0].digest);
    assert_eq!(Digest::of(&layer), manifest.layers[0].digest);
    let config: serde_json::Value =
        serde_json::from_slice(&blob(&dest, &manifest.config.digest)).unwrap();
    assert_eq!(
        config["config"],
        built_config()["config"],
        "run config kept"
    );
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([Digest::of(&gunzip(&layer)).to_string()])
    );

    // The entries are sorted, parents first, with numeric owners only.
    let plain_tar = gunzip(&layer);
    let mut archive = tar::Archive::new(&plain_tar[..]);
    let mut names = Vec::new();
    for entry in archive.entries().unwrap() {
        let entry = entry.unwrap();
        assert_eq!(entry.header().username_bytes(), Some(&[][..]));
        names.push(entry.path().unwrap().into_owned());
    }
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("lost+found")));

    // Unpacked as an image layer, it is the tree again (the socket aside).
    let unpacked = tmp.path().join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    unpack::apply_layer_compressed(
        &layer[..],
        Compression::Gzip,
        &unpacked,
        &UnpackOptions::for_current_user(),
    )
    .unwrap();
    on_disk.remove("run/socket").unwrap();
    assert_eq!(describe_tree(&unpacked), on_disk);

    // The same disk gives the same layer, whatever the destination.
    let tar_dest = tmp.path().join("again.tar");
    let again = export_image(&store, &built.digest.to_string(), &tar_dest).unwrap();
    assert_eq!(again.manifest, exported.manifest);
}

#[test]
fn a_built_image_survives_a_round_trip_through_a_tar() {
    if !is_root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    build_tree(&tree);
    let store = ImageStore::open(&tmp.path().join("a")).unwrap();
    let built = add_built(&store, &tree, "localhost:5000/built:2");

    let dest = tmp.path().join("image.tar");
    export_image(&store, "localhost:5000/built:2", &dest).unwrap();
    let mut names: Vec<String> = tar::Archive::new(File::open(&dest).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let blobs = names
        .iter()
        .filter(|n| n.starts_with("blobs/sha256/") && n.len() > "blobs/sha256/".len())
        .count();
    assert_eq!(blobs, 3, "manifest, config, layer: {names:?}");
    names.retain(|n| !n.starts_with("blobs/sha256/") || n.len() == "blobs/sha256/".len());
    assert_eq!(
        names,
        ["blobs/", "blobs/sha256/", "index.json", "oci-layout"],
        "{names:?}"
    );

    let other = ImageStore::open(&tmp.path().join("b")).unwrap();
    let imported = archive::import_archive(&dest, other.blobs()).unwrap();
    assert_eq!(
        imported[0].references,
        vec!["localhost:5000/built:2".to_owned()]
    );
    let again = other.prepare(&imported[0].manifest, 1 << 20).unwrap();
    let mut expected = describe_disk(&built.rootfs);
    expected.remove("run/socket").unwrap();
    assert_eq!(describe_disk(&again.rootfs), expected);
    assert_eq!(debugfs(&again.rootfs, "cat /opt/app/secret"), "secret\n");
    let stat = debugfs(&again.rootfs, "stat /bin/tool");
    assert!(stat.contains("Mode:  04755"), "{stat}");
    assert_eq!(
        ImageStore::converted_config(&again.rootfs)
            .unwrap()
            .config
            .unwrap()
            .env,
        Some(vec!["PATH=/bin".to_owned(), "BUILT=yes".to_owned()])
    );
}

#[test]
fn errors_name_the_problem_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("images")).unwrap();
    let tagged = add_layered(&store, "app:1");
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let leftovers = || {
        let mut names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    let err = export_image(&store, "nothing:1", &out.join("x")).unwrap_err();
    assert!(
        matches!(err, ExportError::Store(StoreError::NotFound { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("no image \"nothing:1\""), "{err}");
    assert!(err.to_string().contains("app:1"), "{err}");

    fs::write(out.join("taken.txt"), "mine").unwrap();
    let err = export_image(&store, "app:1", &out).unwrap_err();
    assert!(
        matches!(err, ExportError::DestinationNotEmpty { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("is not empty"), "{err}");
    let err = export_image(&store, "app:1", &out.join("taken.txt")).unwrap_err();
    assert!(
        matches!(err, ExportError::DestinationExists { .. }),
        "{err:?}"
    );
    fs::write(out.join("full.tar"), "x").unwrap();
    let err = export_image(&store, "app:1", &out.join("full.tar")).unwrap_err();
    assert!(
        matches!(err, ExportError::DestinationExists { .. }),
        "{err:?}"
    );
    assert_eq!(fs::read(out.join("full.tar")).unwrap(), b"x");

    // A corrupted blob fails the export, which leaves nothing.
    let manifest: Manifest =
        serde_json::from_slice(&fs::read(store.blobs().path(&tagged.digest)).unwrap()).unwrap();
    let layer = store.blobs().path(&manifest.layers[1].digest);
    let mut bytes = fs::read(&layer).unwrap();
    bytes[600] ^= 1;
    fs::write(&layer, bytes).unwrap();
    for dest in ["broken", "broken.tar"] {
        let err = export_image(&store, "app:1", &out.join(dest)).unwrap_err();
        let chain = crate_error_chain(&err);
        assert!(
            chain.contains("blob content does not match its digest"),
            "{chain}"
        );
    }
    assert_eq!(leftovers(), ["full.tar", "taken.txt"]);

    // A built image whose disk is gone.
    let disk_tree = tmp.path().join("tree");
    fs::create_dir(&disk_tree).unwrap();
    fs::write(disk_tree.join("f"), "f").unwrap();
    let built = add_built(&store, &disk_tree, "built:1");
    fs::remove_dir_all(built.rootfs.parent().unwrap()).unwrap();
    let err = export_image(&store, "built:1", &out.join("built")).unwrap_err();
    assert!(
        matches!(err, ExportError::Store(StoreError::DiskMissing { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("disk is gone"), "{err}");
    assert_eq!(leftovers(), ["full.tar", "taken.txt"]);

    // A disk that is not ext4: debugfs's own words say why.
    let junk = add_built(&store, &disk_tree, "junk:1");
    fs::write(&junk.rootfs, vec![0u8; 1 << 16]).unwrap();
    let err = export_image(&store, "junk:1", &out.join("junk.tar")).unwrap_err();
    assert!(matches!(err, ExportError::DebugfsOutput { .. }), "{err:?}");
    assert!(err.to_string().contains("while trying to open"), "{err}");
    assert_eq!(leftovers(), ["full.tar", "taken.txt"]);
    let scratch = store.blobs().layout().join(SCRATCH_PARENT);
    assert_eq!(fs::read_dir(scratch).unwrap().count(), 0);
}

fn crate_error_chain(error: &dyn std::error::Error) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        chain.push_str(": ");
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    chain
}

#[test]
fn listings_are_read_field_by_field() {
    let output = b"debugfs: ls -p <2>\n/2/040755/0/0/.//\n/2/040755/0/0/..//\n\
        /12/100600/-2/1000/odd\nname/7/\n/13/120777/0/0/link/4/\n\n\
        debugfs: ls -p <14>\n/14/040755/0/0/.//\n/2/040755/0/0/..//\n\n";
    let listings = disk::parse_listings(output).unwrap();
    let root = &listings[&2];
    assert_eq!(root.len(), 4);
    assert_eq!(root[2].name, b"odd\nname");
    assert_eq!(root[2].mode, 0o100600);
    assert_eq!(root[2].uid, u32::MAX - 1);
    assert_eq!(root[2].gid, 1000);
    assert_eq!(root[3].ino, 13);
    assert_eq!(listings[&14].len(), 2);
    assert!(disk::parse_listings(b"debugfs: ls -p <2>\n/2/040755/0/0/.").is_err());
    assert!(disk::parse_listings(b"garbage\n").is_err());
}

#[test]
fn stats_give_mtimes_and_device_numbers() {
    let output = "debugfs: stat <13>\n\
        Inode: 13   Type: character special    Mode:  0644   Flags: 0x0\n \
        ctime: 0x6b061dd1:00000000 -- Tue Nov 24 23:29:21 2026\n \
        mtime: 0x5f5e1000:00000001 -- ...\n\
        Device major/minor number: 01:03 (hex 01:03)\n\
        debugfs: stat <14>\n\
        Inode: 14   Type: symlink    Mode:  0777   Flags: 0x0\n\
        mtime: 0xffffffff -- Wed Dec 31 23:59:59 1969\n\
        Fast link dest: \"x\n mtime: 0x00000001\"\n";
    let stats = disk::parse_stats(output.as_bytes()).unwrap();
    assert_eq!(stats[&13].mtime, 0x5f5e1000 + (1 << 32));
    assert_eq!(stats[&13].device, Some((1, 3)));
    assert_eq!(stats[&14].mtime, -1);
    assert_eq!(stats[&14].device, None);
}
