//! Layers are built in memory with `tar::Builder` and applied to temporary roots.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tar::{EntryType, Header};

use super::*;

/// One entry of a test layer. Paths are written raw so hostile ones can be expressed.
enum E<'a> {
    Dir(&'a str, u32, u64),
    File(&'a str, &'a [u8], u32, u64),
    Symlink(&'a str, &'a str),
    Link(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Fifo(&'a str),
    /// A PAX extended header record set applying to the next entry.
    Pax(&'a [(&'a str, &'a [u8])]),
}

fn header(kind: EntryType, path: &str, mode: u32, mtime: u64, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    let name = &mut header.as_old_mut().name;
    name[..path.len()].copy_from_slice(path.as_bytes());
    header.set_mode(mode);
    header.set_mtime(mtime);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    header
}

fn pax_records(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in records {
        let body_len = key.len() + value.len() + 3;
        let mut len = body_len + 1;
        while format!("{len}").len() + body_len != len {
            len = format!("{len}").len() + body_len;
        }
        write!(out, "{len} {key}=").unwrap();
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let (header, data): (Header, Vec<u8>) = match entry {
            E::Dir(p, mode, mtime) => (header(EntryType::Directory, p, *mode, *mtime, 0), vec![]),
            E::File(p, data, mode, mtime) => (
                header(EntryType::Regular, p, *mode, *mtime, data.len() as u64),
                data.to_vec(),
            ),
            E::Symlink(p, target) | E::Link(p, target) => {
                let kind = match entry {
                    E::Symlink(..) => EntryType::Symlink,
                    _ => EntryType::Link,
                };
                let mut h = header(kind, p, 0o777, 1_000, 0);
                h.set_link_name_literal(target).unwrap();
                h.set_cksum();
                (h, vec![])
            }
            E::Char(p, major, minor) => {
                let mut h = header(EntryType::Char, p, 0o666, 1_000, 0);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                h.set_cksum();
                (h, vec![])
            }
            E::Fifo(p) => (header(EntryType::Fifo, p, 0o600, 1_000, 0), vec![]),
            E::Pax(records) => {
                let data = pax_records(records);
                let h = header(EntryType::XHeader, "PaxHeader", 0o644, 0, data.len() as u64);
                (h, data)
            }
        };
        builder.append(&header, data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap()
}

fn apply(root: &Path, entries: &[E]) -> Result<LayerStats, UnpackError> {
    apply_layer(
        layer(entries).as_slice(),
        root,
        &UnpackOptions::for_current_user(),
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn mtime(path: &Path) -> i64 {
    fs::symlink_metadata(path).unwrap().mtime()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn rejected_path(err: UnpackError) -> (PathBuf, String) {
    let message = err.to_string();
    match err {
        UnpackError::Rejected { path, .. } => (path, message),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn files_dirs_links_modes_and_mtimes_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let stats = apply(
        root,
        &[
            E::Dir("usr/", 0o755, 1_111),
            E::Dir("usr/bin/", 0o750, 2_222),
            E::File("usr/bin/su", b"#!su", 0o4755, 3_333),
            E::File("usr/bin/wall", b"wall", 0o2711, 4_444),
            E::Dir("tmp/", 0o1777, 5_555),
            E::Symlink("usr/bin/sudo", "/usr/bin/su"),
            E::Link("usr/bin/su2", "usr/bin/su"),
            E::File("implicit/parent/file", b"x", 0o600, 6_666),
            E::Fifo("run/initctl"),
        ],
    )
    .unwrap();

    let su = root.join("usr/bin/su");
    assert_eq!(fs::read(&su).unwrap(), b"#!su");
    assert_eq!(mode(&su), 0o4755);
    assert_eq!(mode(&root.join("usr/bin/wall")), 0o2711);
    assert_eq!(mode(&root.join("tmp")), 0o1777);
    assert_eq!(mode(&root.join("usr/bin")), 0o750);
    assert_eq!(mode(&root.join("implicit/parent")), 0o755);
    assert_eq!(mtime(&su), 3_333);
    assert_eq!(
        mtime(&root.join("usr")),
        1_111,
        "dir mtime set after its children"
    );
    assert_eq!(mtime(&root.join("usr/bin")), 2_222);
    assert_eq!(
        fs::read_link(root.join("usr/bin/sudo")).unwrap(),
        Path::new("/usr/bin/su")
    );
    assert_eq!(mtime(&root.join("usr/bin/sudo")), 1_000);
    let su2 = fs::metadata(root.join("usr/bin/su2")).unwrap();
    assert_eq!(su2.ino(), fs::metadata(&su).unwrap().ino());
    assert!(fs::symlink_metadata(root.join("run/initctl"))
        .unwrap()
        .file_type()
        .is_fifo());
    let expected = LayerStats {
        files: 3,
        dirs: 3,
        symlinks: 1,
        hardlinks: 1,
        devices: 1,
        bytes: 9,
        ..LayerStats::default()
    };
    assert_eq!(stats, expected);
}

#[test]
fn owners_are_preserved_only_when_asked() {
    if !is_root() {
        eprintln!("skipping: chown needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut h = header(EntryType::Regular, "owned", 0o4755, 1, 0);
    h.set_uid(1234);
    h.set_gid(5678);
    h.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&h, &[][..]).unwrap();
    let tar = builder.into_inner().unwrap();

    let options = UnpackOptions {
        preserve_owner: true,
        ..UnpackOptions::default()
    };
    apply_layer(tar.as_slice(), tmp.path(), &options).unwrap();
    let meta = fs::metadata(tmp.path().join("owned")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o4755,
        "setuid survives chown"
    );

    let unowned = tempfile::tempdir().unwrap();
    apply_layer(tar.as_slice(), unowned.path(), &UnpackOptions::default()).unwrap();
    assert_eq!(fs::metadata(unowned.path().join("owned")).unwrap().uid(), 0);
}

#[test]
fn pax_records_override_times_ids_and_set_xattrs() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = apply(
        tmp.path(),
        &[
            E::Pax(&[
                ("mtime", b"1700000000.25"),
                ("SCHILY.xattr.user.arrakis", b"spice"),
            ]),
            E::File("f", b"data", 0o644, 1),
        ],
    )
    .unwrap();
    let meta = fs::metadata(tmp.path().join("f")).unwrap();
    assert_eq!(
        (meta.mtime(), meta.mtime_nsec()),
        (1_700_000_000, 250_000_000)
    );
    let mut value = [0u8; 16];
    let path = CString::new(tmp.path().join("f").as_os_str().as_bytes()).unwrap();
    // SAFETY: the path and name are NUL-terminated; the buffer length is passed.
    let len = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"user.arrakis".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if stats.skipped_xattrs == 0 {
        assert_eq!(&value[..len as usize], b"spice");
    } else {
        assert_eq!(
            stats.skipped_xattrs, 1,
            "the only xattr was counted as skipped"
        );
    }
}

#[test]
fn pax_time_parsing() {
    let t = |secs, nanos| Some(Timestamp { secs, nanos });
    assert_eq!(parse_pax_time("12"), t(12, 0));
    assert_eq!(parse_pax_time("12.5"), t(12, 500_000_000));
    assert_eq!(parse_pax_time("12.1234567891"), t(12, 123_456_789));
    assert_eq!(parse_pax_time("-3.5"), t(-3, 0));
    assert_eq!(parse_pax_time("x"), None);
}

#[test]
fn whiteouts_remove_lower_files_and_trees() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    apply(
        root,
        &[
            E::File("a/keep", b"k", 0o644, 1),
            E::File("a/gone", b"g", 0o644, 1),
            E::File("tree/x/y/z", b"z", 0o644, 1),
        ],
    )
    .unwrap();
    let stats = apply(
        root,
        &[
            E::File("a/.wh.gone", b"", 0o644, 1),
            E::File(".wh.tree", b"", 0, 1),
        ],
    )
    .unwrap();

    assert_eq!(names(root), ["a"]);
    assert_eq!(
        names(&root.join("a")),
        ["keep"],
        "the whiteout itself is not created"
    );
    assert_eq!(stats.whiteouts, 2);
    assert_eq!(stats.files, 0);
}

#[test]
fn whiteouts_reject_names_that_would_hit_the_parent() {
    let tmp = tempfile::tempdir().unwrap();
    fs::create_dir(tmp.path().join("a")).unwrap();
    for name in ["a/.wh.", "a/.wh..", "a/.wh..."] {
        let err = apply(tmp.path(), &[E::File(name, b"", 0o644, 1)]).unwrap_err();
        let (path, _) = rejected_path(err);
        assert!(path.starts_with("a"));
    }
    assert!(tmp.path().join("a").is_dir());
}

#[test]
fn opaque_directory_keeps_same_layer_entries_in_any_order() {
    let orders: [&[usize]; 3] = [&[0, 1, 2, 3], &[3, 0, 1, 2], &[0, 3, 1, 2]];
    for order in orders {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        apply(
            root,
            &[
                E::File("d/old1", b"1", 0o644, 1),
                E::File("d/sub/old2", b"2", 0o644, 1),
                E::File("other/stays", b"s", 0o644, 1),
            ],
        )
        .unwrap();
        let upper = [
            E::File("d/new1", b"n", 0o644, 1),
            E::Dir("d/sub/", 0o755, 1),
            E::File("d/sub/new2", b"n", 0o644, 1),
            E::File("d/.wh..wh..opq", b"", 0o644, 1),
        ];
        let entries: Vec<E> = order.iter().map(|&i| clone_entry(&upper[i])).collect();
        let stats = apply(root, &entries).unwrap();

        assert_eq!(names(&root.join("d")), ["new1", "sub"], "order {order:?}");
        assert_eq!(names(&root.join("d/sub")), ["new2"], "order {order:?}");
        assert_eq!(names(&root.join("other")), ["stays"]);
        assert_eq!(stats.whiteouts, 1);
    }
}

fn clone_entry<'a>(entry: &E<'a>) -> E<'a> {
    match entry {
        E::File(p, d, m, t) => E::File(p, d, *m, *t),
        E::Dir(p, m, t) => E::Dir(p, *m, *t),
        _ => unreachable!("only files and dirs are reordered"),
    }
}

#[test]
fn type_changes_replace_the_old_node() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    apply(
        root,
        &[
            E::File("was_dir/deep/file", b"x", 0o644, 1),
            E::File("was_file", b"x", 0o644, 1),
            E::File("kept_dir/lower", b"x", 0o644, 1),
            E::File("target", b"t", 0o644, 1),
            E::Symlink("was_link", "target"),
        ],
    )
    .unwrap();
    apply(
        root,
        &[
            E::File("was_dir", b"now a file", 0o644, 1),
            E::Dir("was_file/", 0o700, 1),
            E::Dir("kept_dir/", 0o711, 1),
            E::File("was_link", b"own content", 0o644, 1),
        ],
    )
    .unwrap();

    assert_eq!(fs::read(root.join("was_dir")).unwrap(), b"now a file");
    assert!(fs::symlink_metadata(root.join("was_file"))
        .unwrap()
        .is_dir());
    assert_eq!(
        names(&root.join("kept_dir")),
        ["lower"],
        "existing dir is not wiped"
    );
    assert_eq!(mode(&root.join("kept_dir")), 0o711);
    assert_eq!(fs::read(root.join("was_link")).unwrap(), b"own content");
    assert_eq!(
        fs::read(root.join("target")).unwrap(),
        b"t",
        "old symlink not followed"
    );
}

#[test]
fn escaping_paths_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir(&root).unwrap();
    let absolute = format!("/arrakis-unpack-test-{}", std::process::id());
    for path in ["../x", absolute.as_str(), "a/../../x", "./../x"] {
        let err = apply(&root, &[E::File(path, b"evil", 0o644, 1)]).unwrap_err();
        let (named, message) = rejected_path(err);
        assert_eq!(named, Path::new(path));
        assert!(message.contains(path), "{message}");
    }
    assert!(!Path::new(&absolute).exists());
    assert_eq!(names(tmp.path()), ["root"]);
    assert!(names(&root).is_empty());
}

#[test]
fn dotdot_inside_the_root_is_normalized() {
    let tmp = tempfile::tempdir().unwrap();
    apply(tmp.path(), &[E::File("a/../b", b"b", 0o644, 1)]).unwrap();
    assert_eq!(names(tmp.path()), ["b"]);
}

#[test]
fn symlinked_parent_from_a_lower_layer_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let root_passwd_existed = Path::new("/passwd").exists();
    apply(
        &root,
        &[E::Symlink("etc", "/"), E::Symlink("up", "../outside")],
    )
    .unwrap();

    for path in ["etc/passwd", "up/passwd", "up/sub/file"] {
        let err = apply(&root, &[E::File(path, b"root::0:0::/:/bin/sh", 0o644, 1)]).unwrap_err();
        let (named, message) = rejected_path(err);
        assert_eq!(named, Path::new(path));
        assert!(message.contains("is a symlink"), "{message}");
    }
    let err = apply(&root, &[E::File("up/.wh..wh..opq", b"", 0, 1)]).unwrap_err();
    assert!(rejected_path(err).1.contains("symlink"));
    assert!(!root_passwd_existed || !Path::new("/passwd").exists());
    assert!(
        names(&outside).is_empty(),
        "nothing written outside the root"
    );
}

#[test]
fn hard_links_must_target_existing_paths_inside_the_root() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::write(tmp.path().join("outside"), b"secret").unwrap();
    apply(&root, &[E::Symlink("up", "..")]).unwrap();

    for target in ["../outside", "up/outside", "/etc/passwd", "missing"] {
        let err = apply(&root, &[E::Link("link", target)]).unwrap_err();
        let (named, message) = rejected_path(err);
        assert_eq!(named, Path::new("link"));
        assert!(message.contains("hard link target"), "{message}");
    }
    assert_eq!(names(&root), ["up"]);
    assert_eq!(fs::metadata(tmp.path().join("outside")).unwrap().nlink(), 1);
}

#[test]
fn compressed_layers_are_detected_and_applied() {
    let tar = layer(&[E::File("hello", b"hi", 0o644, 1)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    let gzip = gz.finish().unwrap();
    let zstd = zstd::encode_all(tar.as_slice(), 3).unwrap();

    for (blob, expected) in [
        (&tar, Compression::None),
        (&gzip, Compression::Gzip),
        (&zstd, Compression::Zstd),
    ] {
        let compression = detect(&blob[..4]);
        assert_eq!(compression, expected);
        let tmp = tempfile::tempdir().unwrap();
        let options = UnpackOptions::default();
        let stats =
            apply_layer_compressed(blob.as_slice(), compression, tmp.path(), &options).unwrap();
        assert_eq!(fs::read(tmp.path().join("hello")).unwrap(), b"hi");
        assert_eq!(stats.bytes, 2);
    }
}

#[test]
fn media_types_map_to_compression() {
    let gzip = Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip");
    assert_eq!(gzip, Some(Compression::Gzip));
    let docker = Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip");
    assert_eq!(docker, Some(Compression::Gzip));
    let zstd = Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd");
    assert_eq!(zstd, Some(Compression::Zstd));
    let plain = Compression::from_media_type("application/vnd.oci.image.layer.v1.tar");
    assert_eq!(plain, Some(Compression::None));
    assert_eq!(Compression::from_media_type("application/json"), None);
}

#[test]
fn devices_are_created_as_root_and_skipped_otherwise() {
    let entries = [E::Char("dev/null", 1, 3)];
    let tmp = tempfile::tempdir().unwrap();
    let skipped = apply_layer(
        layer(&entries).as_slice(),
        tmp.path(),
        &UnpackOptions::default(),
    )
    .unwrap();
    assert_eq!((skipped.devices, skipped.skipped_devices), (0, 1));
    assert!(!tmp.path().join("dev/null").exists());

    if !is_root() {
        eprintln!("skipping device creation: mknod needs root");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let options = UnpackOptions {
        create_devices: true,
        ..UnpackOptions::default()
    };
    let stats = apply_layer(layer(&entries).as_slice(), tmp.path(), &options).unwrap();
    let meta = fs::symlink_metadata(tmp.path().join("dev/null")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), libc::makedev(1, 3));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o666);
    assert_eq!((stats.devices, stats.skipped_devices), (1, 0));
}

#[test]
fn root_entry_updates_the_root_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let stats = apply(
        tmp.path(),
        &[E::Dir("./", 0o755, 42), E::File("./a", b"", 0o644, 1)],
    )
    .unwrap();
    assert_eq!(mode(tmp.path()), 0o755);
    assert_eq!(mtime(tmp.path()), 42);
    assert_eq!(stats.dirs, 1);
    let err = apply(tmp.path(), &[E::File("./", b"", 0o644, 1)]).unwrap_err();
    assert!(rejected_path(err).1.contains("root itself"));
}
