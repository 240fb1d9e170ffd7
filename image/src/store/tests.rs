use tar::{EntryType, Header};

use super::*;
use crate::oci::{Manifest, MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST};

const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::Regular);
        header.set_path(path).unwrap();
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn descriptor(media_type: &str, digest: Digest, size: usize) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest,
        size: size as u64,
        platform: None,
        annotations: BTreeMap::new(),
    }
}

/// Writes a one-layer image into the store's blobs and returns its manifest descriptor.
fn add_image(store: &ImageStore, files: &[(&str, &[u8])], env: &str) -> Descriptor {
    let layer = layer(files);
    let layer_digest = store.blobs().write_bytes(&layer).unwrap();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": [env], "WorkingDir": "/srv", "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = store.blobs().write_bytes(&config).unwrap();
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_MANIFEST.to_owned()),
        config: descriptor(MEDIA_TYPE_CONFIG, config_digest, config.len()),
        layers: vec![descriptor(TAR_LAYER, layer_digest, layer.len())],
    };
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let digest = store.blobs().write_bytes(&manifest).unwrap();
    descriptor(MEDIA_TYPE_MANIFEST, digest, manifest.len())
}

fn r(s: &str) -> ImageRef {
    ImageRef::parse(s).unwrap()
}

#[test]
fn references_normalize_like_docker() {
    assert_eq!(r("busybox").as_str(), "docker.io/library/busybox:latest");
    assert_eq!(r("busybox").familiar(), "busybox:latest");
    assert_eq!(r("team/app:2").as_str(), "docker.io/team/app:2");
    assert_eq!(r("team/app:2").familiar(), "team/app:2");
    assert_eq!(r("localhost:5000/app:1").as_str(), "localhost:5000/app:1");
    for bad in ["", " busybox", "UPPER/case", "a:b:c", "x@sha256:12"] {
        let err = ImageRef::parse(bad).unwrap_err().to_string();
        assert!(err.contains("invalid image reference"), "{bad:?}: {err}");
        assert!(err.contains("expected [REGISTRY/]NAME"), "{err}");
    }
}

#[test]
fn tags_are_found_by_reference_digest_and_id_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let one = add_image(&store, &[("a", b"1")], "A=1");
    let two = add_image(&store, &[("b", b"2")], "B=2");
    store.tag(&r("one"), &one).unwrap();
    store.tag(&r("localhost:5000/two:x"), &two).unwrap();

    assert_eq!(store.lookup("one").unwrap().1.digest, one.digest);
    assert_eq!(store.lookup("one:latest").unwrap().1.digest, one.digest);
    assert_eq!(
        store
            .lookup("docker.io/library/one:latest")
            .unwrap()
            .1
            .digest,
        one.digest
    );
    assert_eq!(
        store.lookup(&two.digest.to_string()).unwrap().0,
        r("localhost:5000/two:x")
    );
    assert_eq!(
        store.lookup(&two.digest.hex()[..12]).unwrap().1.digest,
        two.digest
    );
    let err = store.lookup("three").unwrap_err().to_string();
    assert!(err.contains("no image \"three\""), "{err}");
    assert!(
        err.contains("one:latest") && err.contains("localhost:5000/two:x"),
        "{err}"
    );

    // Retagging moves the reference; the list shows each reference once.
    store.tag(&r("one"), &two).unwrap();
    let listed: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|s| (s.reference.familiar().to_owned(), s.digest))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("one:latest".to_owned(), two.digest.clone()),
            ("localhost:5000/two:x".to_owned(), two.digest.clone()),
        ]
    );
}

#[test]
fn an_empty_store_says_how_to_get_images() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let err = store.lookup("busybox").unwrap_err().to_string();
    assert!(err.contains("arrakis image pull"), "{err}");
}

use crate::ext4::debugfs;

#[test]
fn prepare_builds_the_rootfs_once_with_room_and_mount_points() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let image = add_image(&store, &[("etc/motd", b"hi there\n")], "GREETING=hello");
    store.tag(&r("motd"), &image).unwrap();

    let prepared = store.prepare(&image, 64 << 20).unwrap();
    assert!(prepared.built);
    assert_eq!(prepared.rootfs, store.rootfs_path(&image.digest));
    assert_eq!(debugfs(&prepared.rootfs, "cat /etc/motd"), "hi there\n");
    let root = debugfs(&prepared.rootfs, "ls /");
    for dir in MOUNT_POINTS {
        assert!(root.contains(dir), "{dir} missing from {root}");
    }
    assert!(fs::metadata(&prepared.rootfs).unwrap().len() > 64 << 20);
    let config = ImageStore::converted_config(&prepared.rootfs).unwrap();
    let run = config.config.unwrap();
    assert_eq!(run.env.unwrap(), vec!["GREETING=hello".to_owned()]);
    assert_eq!(run.working_dir.as_deref(), Some("/srv"));

    let again = store.prepare(&image, 64 << 20).unwrap();
    assert!(!again.built);
    let listed = store.list().unwrap();
    assert!(listed[0].converted && listed[0].disk_bytes.unwrap() > 0);
    let leftovers: Vec<_> = fs::read_dir(store.dir().join("rootfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_tampered_layer_leaves_no_rootfs() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let image = add_image(&store, &[("f", b"original")], "A=1");
    let layout = OciLayout::open(store.blobs().layout()).unwrap();
    let (manifest, _) = layout.image(&image).unwrap();
    let layer_path = store.blobs().path(&manifest.layers[0].digest);
    let mut bytes = fs::read(&layer_path).unwrap();
    let at = bytes.windows(8).position(|w| w == b"original").unwrap();
    bytes[at] = b'O';
    fs::write(&layer_path, bytes).unwrap();

    let err = store.prepare(&image, 1 << 20).unwrap_err();
    assert!(
        matches!(err, StoreError::Oci(OciError::DigestMismatch { .. })),
        "{err:?}"
    );
    let entries: Vec<_> = fs::read_dir(store.dir().join("rootfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(entries.is_empty(), "{entries:?}");
}

#[test]
fn gc_keeps_tagged_and_in_use_images_and_drops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    let kept = add_image(&store, &[("k", b"kept")], "K=1");
    let used = add_image(&store, &[("u", b"used")], "U=1");
    let gone = add_image(&store, &[("g", b"gone")], "G=1");
    for (name, image) in [("kept", &kept), ("used", &used), ("gone", &gone)] {
        store.tag(&r(name), image).unwrap();
        store.prepare(image, 1 << 20).unwrap();
    }
    let (_, partial) = {
        let digest = Digest::of(b"never finished");
        store.blobs().open_partial(&digest).unwrap()
    };
    assert_eq!(partial, 0);

    store.untag(&r("used")).unwrap();
    store.untag(&r("gone")).unwrap();
    let used_rootfs = store.rootfs_path(&used.digest);
    let report = store.gc(&|path| path == used_rootfs, false).unwrap();
    assert_eq!(report.rootfs_removed, vec![gone.digest.clone()]);
    // The untagged images' manifest, config and layer blobs: 3 each.
    assert_eq!(report.blobs_removed, 6);
    assert!(store.rootfs_path(&kept.digest).is_file());
    assert!(used_rootfs.is_file());
    assert!(!store.rootfs_path(&gone.digest).exists());
    assert!(store.blobs().contains(&kept.digest, kept.size));
    assert!(!store.blobs().contains(&gone.digest, gone.size));
    assert_eq!(
        fs::read_dir(store.blobs().layout().join("blobs/.partial"))
            .unwrap()
            .count(),
        0
    );
    // What is left still converts and boots: the kept image's blobs are intact.
    store.prepare(&kept, 1 << 20).unwrap();
    let err = store.untag(&r("gone")).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
}

#[test]
fn gc_waits_for_pulls_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path()).unwrap();
    // A pull has written its blobs but not tagged them yet.
    let guard = store.hold().unwrap();
    let second = store.hold().unwrap();
    let pulled = add_image(&store, &[("p", b"pulled")], "P=1");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (store, done) = (store.clone(), done.clone());
        std::thread::spawn(move || {
            let report = store.gc(&|_| false, false).unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            report
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "gc ran during a pull"
    );
    store.tag(&r("pulled"), &pulled).unwrap();
    drop(second);
    drop(guard);
    let report = gc.join().unwrap();
    assert_eq!(
        report.blobs_removed, 0,
        "the tagged image's blobs were kept"
    );
    assert!(store.blobs().contains(&pulled.digest, pulled.size));
}
