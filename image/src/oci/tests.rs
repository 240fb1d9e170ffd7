use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;
use tar::{EntryType, Header};
use tempfile::TempDir;

use super::*;

const GZIP_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
}

fn tar_layer(entries: &[E]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let (kind, path, data, mode): (_, _, &[u8], _) = match entry {
            E::Dir(path) => (EntryType::Directory, path, b"", 0o755),
            E::File(path, data) => (EntryType::Regular, path, data, 0o644),
        };
        let mut header = Header::new_ustar();
        header.set_entry_type(kind);
        header.set_path(path).unwrap();
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// An OCI layout under construction in a temporary directory.
struct TestLayout {
    dir: TempDir,
}

impl TestLayout {
    fn new() -> TestLayout {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("blobs/sha256")).unwrap();
        fs::write(
            dir.path().join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        TestLayout { dir }
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.path().join("blobs/sha256").join(digest.hex())
    }

    fn blob(&self, media_type: &str, data: &[u8]) -> Descriptor {
        let digest = Digest::of(data);
        fs::write(self.path(&digest), data).unwrap();
        Descriptor {
            media_type: media_type.to_owned(),
            digest,
            size: data.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
        }
    }

    fn json_blob(&self, media_type: &str, value: &impl Serialize) -> Descriptor {
        self.blob(media_type, &serde_json::to_vec(value).unwrap())
    }

    /// Writes a config and manifest for `layers`; returns the manifest's descriptor.
    fn image(&self, arch: &str, run: RunConfig, layers: Vec<Descriptor>) -> Descriptor {
        let config = ImageConfig {
            architecture: arch.to_owned(),
            os: "linux".to_owned(),
            config: Some(run),
            rootfs: RootFs {
                kind: "layers".to_owned(),
                diff_ids: layers.iter().map(|l| l.digest.clone()).collect(),
            },
        };
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_MANIFEST.to_owned()),
            config: self.json_blob(MEDIA_TYPE_CONFIG, &config),
            layers,
        };
        self.json_blob(MEDIA_TYPE_MANIFEST, &manifest)
    }

    fn index(&self, manifests: Vec<Descriptor>) {
        let index = Index {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
            manifests,
        };
        fs::write(
            self.dir.path().join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    fn open(&self) -> OciLayout {
        OciLayout::open(self.dir.path()).unwrap()
    }

    /// Opens the layout with an empty index, for tests that use blobs directly.
    fn open_unchecked(&self) -> OciLayout {
        if !self.dir.path().join("index.json").exists() {
            self.index(vec![]);
        }
        self.open()
    }

    /// Overwrites the blob's bytes in place, keeping its name.
    fn tamper(&self, descriptor: &Descriptor, edit: impl FnOnce(&mut Vec<u8>)) -> Digest {
        let path = self.path(&descriptor.digest);
        let mut data = fs::read(&path).unwrap();
        edit(&mut data);
        fs::write(&path, &data).unwrap();
        Digest::of(&data)
    }
}

fn named(mut descriptor: Descriptor, name: &str) -> Descriptor {
    descriptor
        .annotations
        .insert(ANNOTATION_REF_NAME.to_owned(), name.to_owned());
    descriptor
}

fn on(mut descriptor: Descriptor, arch: &str) -> Descriptor {
    descriptor.platform = Some(Platform {
        architecture: arch.to_owned(),
        os: "linux".to_owned(),
        variant: None,
    });
    descriptor
}

fn run_config(cmd: &str) -> RunConfig {
    RunConfig {
        cmd: Some(vec![cmd.to_owned()]),
        ..RunConfig::default()
    }
}

/// A one-layer image whose `/arch` file says `arch`.
fn arch_image(layout: &TestLayout, arch: &str) -> Descriptor {
    let layer = layout.blob(TAR_LAYER, &tar_layer(&[E::File("arch", arch.as_bytes())]));
    on(layout.image(arch, run_config(arch), vec![layer]), arch)
}

fn read(root: &Path, path: &str) -> String {
    fs::read_to_string(root.join(path)).unwrap()
}

#[test]
fn two_layer_image_resolves_and_unpacks_with_whiteouts() {
    let layout = TestLayout::new();
    let lower = tar_layer(&[
        E::Dir("etc"),
        E::File("etc/keep", b"kept"),
        E::File("etc/old", b"removed"),
        E::Dir("bin"),
        E::File("bin/sh", b"shell"),
    ]);
    let upper = tar_layer(&[E::File("etc/.wh.old", b""), E::File("etc/new", b"added")]);
    let layers = vec![
        layout.blob(GZIP_LAYER, &gzip(&lower)),
        layout.blob(TAR_LAYER, &upper),
    ];
    let run = RunConfig {
        entrypoint: Some(vec!["/bin/sh".to_owned(), "-c".to_owned()]),
        cmd: Some(vec!["echo hi".to_owned()]),
        env: Some(vec!["PATH=/bin".to_owned(), "LANG=C".to_owned()]),
        working_dir: Some("/srv".to_owned()),
        user: Some("1000:1000".to_owned()),
        ..RunConfig::default()
    };
    let manifest = layout.image("amd64", run, layers.clone());
    layout.index(vec![named(manifest, "latest")]);

    let oci = layout.open();
    let (manifest, config) = oci.resolve(None).unwrap();
    assert_eq!(oci.resolve(Some("latest")).unwrap().0, manifest);
    assert_eq!(manifest.layers, layers);
    assert_eq!(config.rootfs.diff_ids.len(), 2);
    let run = config.config.unwrap();
    assert_eq!(run.entrypoint.unwrap(), ["/bin/sh", "-c"]);
    assert_eq!(run.cmd.unwrap(), ["echo hi"]);
    assert_eq!(run.env.unwrap(), ["PATH=/bin", "LANG=C"]);
    assert_eq!(run.working_dir.as_deref(), Some("/srv"));
    assert_eq!(run.user.as_deref(), Some("1000:1000"));

    let root = tempfile::tempdir().unwrap();
    let stats = unpack_image(&oci, &manifest, root.path(), &UnpackOptions::default()).unwrap();
    assert_eq!(stats.len(), 2);
    assert_eq!(stats[0].files, 3);
    assert_eq!(stats[1].whiteouts, 1);
    assert_eq!(read(root.path(), "etc/keep"), "kept");
    assert_eq!(read(root.path(), "etc/new"), "added");
    assert_eq!(read(root.path(), "bin/sh"), "shell");
    assert!(!root.path().join("etc/old").exists());
    assert!(!root.path().join("etc/.wh.old").exists());
}

#[test]
fn run_config_uses_the_spec_key_names() {
    let json = r#"{"Entrypoint":["/init"],"Cmd":null,"Env":["A=1"],"WorkingDir":"/w",
        "User":"nobody","ExposedPorts":{"80/tcp":{}},"Labels":{"k":"v"}}"#;
    let run: RunConfig = serde_json::from_str(json).unwrap();
    assert_eq!(run.entrypoint.unwrap(), ["/init"]);
    assert_eq!(run.cmd, None);
    assert_eq!(run.working_dir.as_deref(), Some("/w"));
    assert_eq!(run.user.as_deref(), Some("nobody"));
    let ports = run.exposed_ports.unwrap();
    assert_eq!(ports.keys().collect::<Vec<_>>(), ["80/tcp"]);
    assert_eq!(run.labels.unwrap()["k"], "v");
}

#[test]
fn nested_index_picks_linux_amd64() {
    let layout = TestLayout::new();
    let entries = vec![arch_image(&layout, "arm64"), arch_image(&layout, "amd64")];
    let nested = Index {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
        manifests: entries,
    };
    let nested = layout.json_blob(MEDIA_TYPE_INDEX, &nested);
    layout.index(vec![named(nested, "v1")]);

    let oci = layout.open();
    let (manifest, config) = oci.resolve(Some("v1")).unwrap();
    assert_eq!(config.architecture, "amd64");
    let root = tempfile::tempdir().unwrap();
    unpack_image(&oci, &manifest, root.path(), &UnpackOptions::default()).unwrap();
    assert_eq!(read(root.path(), "arch"), "amd64");
}

#[test]
fn no_platform_match_lists_the_available_ones() {
    let layout = TestLayout::new();
    let arm = arch_image(&layout, "arm64");
    let ppc = arch_image(&layout, "ppc64le");
    let nested = Index {
        schema_version: 2,
        media_type: None,
        manifests: vec![arm.clone(), ppc.clone()],
    };
    let nested = layout.json_blob(MEDIA_TYPE_DOCKER_LIST, &nested);
    layout.index(vec![nested]);

    let err = layout.open().resolve(None).unwrap_err();
    let OciError::NoMatch { wanted, available } = &err else {
        panic!("unexpected error: {err}");
    };
    assert_eq!(wanted, "platform linux/amd64");
    assert_eq!(
        available,
        &[
            format!("linux/arm64 {}", arm.digest),
            format!("linux/ppc64le {}", ppc.digest)
        ]
    );
    assert!(err.to_string().contains("linux/ppc64le"), "{err}");
}

#[test]
fn references_select_by_ref_name() {
    let layout = TestLayout::new();
    let a = layout.image("amd64", run_config("a"), vec![]);
    let b = layout.image("amd64", run_config("b"), vec![]);
    layout.index(vec![named(a.clone(), "a"), named(b.clone(), "b")]);
    let oci = layout.open();

    let (_, config) = oci.resolve(Some("b")).unwrap();
    assert_eq!(config.config.unwrap().cmd.unwrap(), ["b"]);

    let listed = [format!("`a` {}", a.digest), format!("`b` {}", b.digest)];
    match oci.resolve(Some("c")).unwrap_err() {
        OciError::NoMatch { wanted, available } => {
            assert_eq!(wanted, "reference `c`");
            assert_eq!(available, listed);
        }
        err => panic!("unexpected error: {err}"),
    }
    match oci.resolve(None).unwrap_err() {
        OciError::Ambiguous { available } => assert_eq!(available, listed),
        err => panic!("unexpected error: {err}"),
    }
}

#[test]
fn config_for_another_platform_is_refused() {
    let layout = TestLayout::new();
    layout.index(vec![layout.image("arm64", RunConfig::default(), vec![])]);
    let err = layout.open().resolve(None).unwrap_err();
    assert!(
        matches!(&err, OciError::WrongPlatform { architecture, .. } if architecture == "arm64"),
        "{err}"
    );
}

#[test]
fn tampered_layer_fails_with_both_digests() {
    let layout = TestLayout::new();
    let layer = layout.blob(TAR_LAYER, &tar_layer(&[E::File("f", b"genuine")]));
    let manifest = layout.image("amd64", RunConfig::default(), vec![layer.clone()]);
    layout.index(vec![manifest]);
    let actual = layout.tamper(&layer, |data| {
        let at = data.windows(7).position(|w| w == b"genuine").unwrap();
        data[at..at + 7].copy_from_slice(b"altered");
    });

    let oci = layout.open();
    let (manifest, _) = oci.resolve(None).unwrap();
    let root = tempfile::tempdir().unwrap();
    let err = unpack_image(&oci, &manifest, root.path(), &UnpackOptions::default()).unwrap_err();
    let message = err.to_string();
    match err {
        OciError::DigestMismatch {
            expected,
            actual: found,
        } => {
            assert_eq!(expected, layer.digest);
            assert_eq!(found, actual);
        }
        err => panic!("unexpected error: {err}"),
    }
    assert!(message.contains(&layer.digest.to_string()), "{message}");
    assert!(message.contains(&actual.to_string()), "{message}");
}

#[test]
fn tampered_compressed_layer_reports_the_mismatch_over_the_decoder_error() {
    let layout = TestLayout::new();
    let blob = gzip(&tar_layer(&[E::File("f", b"data")]));
    let layer = layout.blob(GZIP_LAYER, &blob);
    let actual = layout.tamper(&layer, |data| {
        let middle = data.len() / 2;
        data[middle] ^= 0xff;
    });
    let root = tempfile::tempdir().unwrap();
    let err = layout
        .open_unchecked()
        .unpack_layer(&layer, root.path(), &UnpackOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, OciError::DigestMismatch { actual: found, .. } if *found == actual),
        "{err}"
    );
}

#[test]
fn tampered_config_fails_with_both_digests() {
    let layout = TestLayout::new();
    let manifest = layout.image("amd64", run_config("x"), vec![]);
    layout.index(vec![manifest]);
    let oci = layout.open();
    let (manifest, _) = oci.resolve(None).unwrap();
    let actual = layout.tamper(&manifest.config, |data| {
        let at = data.windows(3).position(|w| w == b"[\"x").unwrap();
        data[at + 2] = b'y';
    });

    let err = oci.resolve(None).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(&manifest.config.digest.to_string()),
        "{message}"
    );
    assert!(message.contains(&actual.to_string()), "{message}");
    assert!(matches!(err, OciError::DigestMismatch { .. }), "{message}");
}

#[test]
fn size_mismatches_are_detected() {
    let layout = TestLayout::new();
    let mut layer = layout.blob(TAR_LAYER, &tar_layer(&[E::File("f", b"x")]));
    layer.size += 1;
    let root = tempfile::tempdir().unwrap();
    let err = layout
        .open_unchecked()
        .unpack_layer(&layer, root.path(), &UnpackOptions::default())
        .unwrap_err();
    assert!(
        matches!(&err, OciError::SizeMismatch { expected, actual, .. }
            if *expected == layer.size && *actual == layer.size - 1),
        "{err}"
    );

    // A stream that ends early is caught by the streaming check too.
    let data = b"short";
    let mut reader = VerifyingReader::new(&data[..], Digest::of(data), 6);
    let mut sink = Vec::new();
    assert!(reader.read_to_end(&mut sink).is_err());
    let err = reader.finish().unwrap_err();
    assert!(
        matches!(
            err,
            OciError::SizeMismatch {
                expected: 6,
                actual: 5,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn verifying_reader_passes_intact_content_read_partly() {
    let data = b"0123456789";
    let mut reader = VerifyingReader::new(&data[..], Digest::of(data), 10);
    let mut head = [0u8; 3];
    reader.read_exact(&mut head).unwrap();
    reader.finish().unwrap();
}

#[test]
fn unknown_layer_media_types_fall_back_to_detection() {
    let layout = TestLayout::new();
    let blob = gzip(&tar_layer(&[E::File("f", b"detected")]));
    let layer = layout.blob("application/octet-stream", &blob);
    let root = tempfile::tempdir().unwrap();
    layout
        .open_unchecked()
        .unpack_layer(&layer, root.path(), &UnpackOptions::default())
        .unwrap();
    assert_eq!(read(root.path(), "f"), "detected");
}

#[test]
fn invalid_digests_are_rejected() {
    let hex = "a".repeat(64);
    let bad = [
        "sha256:../../x".to_owned(),
        format!("sha256:{}", &hex[1..]),
        format!("sha256:{hex}0"),
        format!("sha256:{}", hex.to_uppercase()),
        format!("sha256:{}/..", &hex[3..]),
        format!("md5:{}", &hex[..32]),
        format!("sha512:{hex}{hex}"),
        hex.clone(),
        String::new(),
    ];
    for value in bad {
        let err = Digest::parse(&value).unwrap_err();
        assert_eq!(err.value, value);
        assert!(err.to_string().contains(&format!("`{value}`")), "{err}");
    }
    let good = Digest::parse(&format!("sha256:{hex}")).unwrap();
    assert_eq!(good.hex(), hex);
    assert_eq!(good.to_string(), format!("sha256:{hex}"));
}

#[test]
fn invalid_digest_in_index_fails_to_open() {
    let layout = TestLayout::new();
    fs::write(
        layout.dir.path().join("index.json"),
        br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:../../etc/passwd","size":1}]}"#,
    )
    .unwrap();
    let err = OciLayout::open(layout.dir.path()).unwrap_err();
    let OciError::Json { path, source } = &err else {
        panic!("unexpected error: {err}");
    };
    assert!(path.ends_with("index.json"));
    assert!(
        source.to_string().contains("sha256:../../etc/passwd"),
        "{source}"
    );
}

#[test]
fn unknown_layout_versions_are_refused() {
    let layout = TestLayout::new();
    layout.index(vec![]);
    fs::write(
        layout.dir.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"2.0.0"}"#,
    )
    .unwrap();
    let err = OciLayout::open(layout.dir.path()).unwrap_err();
    assert!(
        matches!(&err, OciError::LayoutVersion { found, .. } if found == "2.0.0"),
        "{err}"
    );
}
