use std::io::Write;

use serde::Serialize;
use tar::{EntryType, Header};
use tempfile::TempDir;

use super::*;
use crate::oci::{Platform, RootFs};
use crate::unpack::UnpackOptions;

/// A file of an image layer: path and content.
type LayerFile<'a> = (&'a str, &'a [u8]);

fn tar_of(files: &[LayerFile]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = Header::new_ustar();
        header.set_entry_type(EntryType::Regular);
        header.set_path(path).unwrap();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

fn config_json(arch: &str, uncompressed_layers: &[&[u8]]) -> Vec<u8> {
    serde_json::to_vec(&ImageConfig {
        architecture: arch.to_owned(),
        os: "linux".to_owned(),
        config: None,
        rootfs: RootFs {
            kind: "layers".to_owned(),
            diff_ids: uncompressed_layers.iter().map(|l| Digest::of(l)).collect(),
        },
    })
    .unwrap()
}

/// An archive's content under construction: entries in the order they will be written.
#[derive(Default, Clone)]
struct Files {
    entries: Vec<Entry>,
}

#[derive(Clone)]
enum Entry {
    File(String, Vec<u8>),
    Symlink(String, String),
}

impl Files {
    fn add(&mut self, name: &str, data: &[u8]) {
        self.entries
            .push(Entry::File(name.to_owned(), data.to_vec()));
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entries
            .push(Entry::Symlink(name.to_owned(), target.to_owned()));
    }

    fn remove(&mut self, name: &str) {
        self.entries
            .retain(|e| !matches!(e, Entry::File(n, _) if n == name));
    }

    fn blob(&mut self, media_type: &str, data: &[u8]) -> Descriptor {
        let digest = Digest::of(data);
        self.add(&format!("blobs/sha256/{}", digest.hex()), data);
        plain_descriptor(media_type, digest, data.len() as u64)
    }

    fn json_blob(&mut self, media_type: &str, value: &impl Serialize) -> Descriptor {
        self.blob(media_type, &serde_json::to_vec(value).unwrap())
    }

    /// An OCI image of one gzip layer holding `files` and one plain layer holding `extra`;
    /// returns the manifest's descriptor and the layers' descriptors.
    fn oci_image(
        &mut self,
        arch: &str,
        files: &[LayerFile],
        extra: &[LayerFile],
    ) -> (Descriptor, Vec<Descriptor>) {
        let (lower, upper) = (tar_of(files), tar_of(extra));
        let layers = vec![
            self.blob(MEDIA_TYPE_LAYER_GZIP, &gzip(&lower)),
            self.blob(MEDIA_TYPE_LAYER, &upper),
        ];
        let config = self.blob(MEDIA_TYPE_CONFIG, &config_json(arch, &[&lower, &upper]));
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_MANIFEST.to_owned()),
            config,
            layers: layers.clone(),
        };
        (self.json_blob(MEDIA_TYPE_MANIFEST, &manifest), layers)
    }

    fn oci_index(&mut self, manifests: Vec<Descriptor>) {
        self.add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index = Index {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
            manifests,
        };
        self.add("index.json", &serde_json::to_vec(&index).unwrap());
    }

    fn tar(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for entry in &self.entries {
            let mut header = Header::new_ustar();
            header.set_mode(0o644);
            header.set_mtime(1_700_000_000);
            match entry {
                Entry::File(name, data) => {
                    header.set_entry_type(EntryType::Regular);
                    header.set_path(name).unwrap();
                    header.set_size(data.len() as u64);
                    header.set_cksum();
                    builder.append(&header, &data[..]).unwrap();
                }
                Entry::Symlink(name, target) => {
                    header.set_entry_type(EntryType::Symlink);
                    header.set_path(name).unwrap();
                    header.set_link_name(target).unwrap();
                    header.set_size(0);
                    header.set_cksum();
                    builder.append(&header, io::empty()).unwrap();
                }
            }
        }
        builder.into_inner().unwrap()
    }

    fn write_dir(&self, dir: &Path) {
        for entry in &self.entries {
            let Entry::File(name, data) = entry else {
                panic!("directories are written without links");
            };
            let path = dir.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, data).unwrap();
        }
    }
}

fn with_name(mut descriptor: Descriptor, key: &str, name: &str) -> Descriptor {
    descriptor
        .annotations
        .insert(key.to_owned(), name.to_owned());
    descriptor
}

fn platform(mut descriptor: Descriptor, arch: &str) -> Descriptor {
    descriptor.platform = Some(Platform {
        architecture: arch.to_owned(),
        os: "linux".to_owned(),
        variant: None,
    });
    descriptor
}

/// A fresh blob store, and the archive written next to it.
struct Env {
    dir: TempDir,
    blobs: BlobDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobDir::create(&dir.path().join("store")).unwrap();
        Env { dir, blobs }
    }

    fn archive(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        path
    }

    fn import(&self, files: &Files) -> Result<Vec<ImportedImage>, ArchiveError> {
        import_archive(&self.archive("image.tar", &files.tar()), &self.blobs)
    }

    fn scratch_is_clean(&self) -> bool {
        fs::read_dir(self.blobs.layout().join(SCRATCH_PARENT))
            .unwrap()
            .next()
            .is_none()
    }

    /// Names `manifest` in the store's index.json, resolves it with [`OciLayout`] and
    /// unpacks it; checks the tree holds exactly `expected` as regular files.
    fn assert_unpacks(&self, manifest: &Descriptor, expected: &[LayerFile]) {
        let entry = with_name(manifest.clone(), ANNOTATION_REF_NAME, "test");
        let index = Index {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
            manifests: vec![entry],
        };
        let layout_dir = self.blobs.layout();
        fs::write(
            layout_dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        let layout = OciLayout::open(layout_dir).unwrap();
        let (resolved, config) = layout.resolve(Some("test")).unwrap();
        assert_eq!(config.rootfs.diff_ids.len(), resolved.layers.len());
        let root = tempfile::tempdir().unwrap();
        oci::unpack_image(&layout, &resolved, root.path(), &UnpackOptions::default()).unwrap();
        let mut found = Vec::new();
        collect_files(root.path(), root.path(), &mut found);
        found.sort();
        let mut expected: Vec<(String, Vec<u8>)> = expected
            .iter()
            .map(|(p, d)| (p.to_string(), d.to_vec()))
            .collect();
        expected.sort();
        assert_eq!(found, expected);
    }
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(root, &path, out);
        } else {
            let name = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push((name, fs::read(&path).unwrap()));
        }
    }
}

const BASE: &[LayerFile] = &[("etc/os-release", b"ID=test\n"), ("bin/sh", b"#!shell")];
const APP: &[LayerFile] = &[("app/run", b"echo hi\n")];

fn all_files() -> Vec<LayerFile<'static>> {
    BASE.iter().chain(APP).copied().collect()
}

#[test]
fn an_oci_layout_directory_is_imported() {
    let mut files = Files::default();
    let (manifest, layers) = files.oci_image("amd64", BASE, APP);
    let entry = with_name(manifest.clone(), ANNOTATION_REF_NAME, "1");
    let entry = with_name(entry, ANNOTATION_IMAGE_NAME, "docker.io/library/hello:1");
    files.oci_index(vec![entry]);
    let env = Env::new();
    let dir = env.dir.path().join("layout");
    files.write_dir(&dir);

    let images = import_layout_dir(&dir, &env.blobs).unwrap();

    assert_eq!(
        images,
        vec![ImportedImage {
            references: vec!["docker.io/library/hello:1".to_owned()],
            manifest: manifest.clone(),
        }]
    );
    for layer in &layers {
        assert!(env.blobs.contains(&layer.digest, layer.size));
    }
    env.assert_unpacks(&manifest, &all_files());
}

#[test]
fn oci_layout_tars_plain_gzip_and_zstd_are_imported() {
    let mut files = Files::default();
    let (manifest, _) = files.oci_image("amd64", BASE, APP);
    files.oci_index(vec![with_name(
        manifest.clone(),
        ANNOTATION_REF_NAME,
        "hello:latest",
    )]);
    let tar = files.tar();
    let zstd = zstd::encode_all(&tar[..], 3).unwrap();
    for (name, bytes) in [
        ("image.tar", tar.clone()),
        ("image.tar.gz", gzip(&tar)),
        ("image.tar.zst", zstd),
    ] {
        let env = Env::new();
        let images = import_archive(&env.archive(name, &bytes), &env.blobs).unwrap();
        assert_eq!(images.len(), 1, "{name}");
        assert_eq!(images[0].references, ["hello:latest"], "{name}");
        assert_eq!(images[0].manifest, manifest, "{name}");
        assert!(
            env.scratch_is_clean(),
            "{name}: the scratch directory is removed"
        );
        env.assert_unpacks(&manifest, &all_files());
    }
}

#[test]
fn a_multi_platform_index_imports_the_amd64_image() {
    let mut files = Files::default();
    let (amd64, _) = files.oci_image("amd64", &[("arch", b"amd64")], &[]);
    // Like `docker save` of a multi-platform image: the arm64 manifest is listed but its blobs
    // were never pulled, and an attestation manifest of unknown platform sits alongside.
    let arm64 = plain_descriptor(MEDIA_TYPE_MANIFEST, Digest::of(b"arm64"), 5);
    let mut attestation = plain_descriptor(MEDIA_TYPE_MANIFEST, Digest::of(b"att"), 3);
    attestation.platform = Some(Platform {
        architecture: "unknown".to_owned(),
        os: "unknown".to_owned(),
        variant: None,
    });
    let nested = files.json_blob(
        MEDIA_TYPE_INDEX,
        &Index {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_INDEX.to_owned()),
            manifests: vec![
                platform(arm64.clone(), "arm64"),
                platform(amd64.clone(), "amd64"),
                attestation,
            ],
        },
    );
    files.oci_index(vec![with_name(
        nested.clone(),
        ANNOTATION_IMAGE_NAME,
        "example.com/multi:2",
    )]);
    let env = Env::new();

    let images = env.import(&files).unwrap();

    assert_eq!(images.len(), 1);
    assert_eq!(images[0].references, ["example.com/multi:2"]);
    assert_eq!(images[0].manifest, platform(amd64.clone(), "amd64"));
    assert!(env.blobs.contains(&nested.digest, nested.size));
    assert!(!env.blobs.path(&arm64.digest).exists());
    env.assert_unpacks(&amd64, &[("arch", b"amd64")]);
}

/// A legacy `docker save` of `busybox` (one layer, two tags) and `app` built on it: the shared
/// layer is written once and linked, as Docker does, and app's own layer is gzip-compressed.
fn docker_save() -> (Files, [Vec<u8>; 2], Vec<u8>) {
    let base = tar_of(BASE);
    let app = tar_of(APP);
    let app_gz = gzip(&app);
    let busybox_config = config_json("amd64", &[&base]);
    let app_config = config_json("amd64", &[&base, &app]);
    let name = |config: &[u8]| format!("{}.json", Digest::of(config).hex());
    let mut files = Files::default();
    files.add(&name(&busybox_config), &busybox_config);
    files.add(&name(&app_config), &app_config);
    files.add("1111/layer.tar", &base);
    files.symlink("2222/layer.tar", "../1111/layer.tar");
    files.add("3333/layer.tar", &app_gz);
    let manifest = serde_json::json!([
        {"Config": name(&busybox_config), "RepoTags": ["busybox:latest", "busybox:1.36"],
         "Layers": ["1111/layer.tar"]},
        {"Config": name(&app_config), "RepoTags": null,
         "Layers": ["2222/layer.tar", "3333/layer.tar"]},
    ]);
    files.add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    files.add("repositories", b"{}");
    (files, [busybox_config, app_config], app_gz)
}

#[test]
fn a_legacy_docker_save_gets_oci_manifests() {
    let (files, [busybox_config, app_config], app_gz) = docker_save();
    let env = Env::new();

    let images = env.import(&files).unwrap();

    assert_eq!(images.len(), 2);
    assert_eq!(images[0].references, ["busybox:latest", "busybox:1.36"]);
    assert!(images[1].references.is_empty());
    let read_manifest = |image: &ImportedImage| -> Manifest {
        assert_eq!(image.manifest.media_type, MEDIA_TYPE_MANIFEST);
        let bytes = fs::read(env.blobs.path(&image.manifest.digest)).unwrap();
        assert_eq!(bytes.len() as u64, image.manifest.size);
        serde_json::from_slice(&bytes).unwrap()
    };
    let busybox = read_manifest(&images[0]);
    assert_eq!(busybox.schema_version, 2);
    assert_eq!(busybox.media_type.as_deref(), Some(MEDIA_TYPE_MANIFEST));
    assert_eq!(busybox.config.media_type, MEDIA_TYPE_CONFIG);
    assert_eq!(busybox.config.digest, Digest::of(&busybox_config));
    let base_layer = plain_descriptor(
        MEDIA_TYPE_LAYER,
        Digest::of(&tar_of(BASE)),
        tar_of(BASE).len() as u64,
    );
    assert_eq!(busybox.layers, std::slice::from_ref(&base_layer));
    let app = read_manifest(&images[1]);
    assert_eq!(app.config.digest, Digest::of(&app_config));
    let app_layer = plain_descriptor(
        MEDIA_TYPE_LAYER_GZIP,
        Digest::of(&app_gz),
        app_gz.len() as u64,
    );
    assert_eq!(app.layers, [base_layer, app_layer]);

    env.assert_unpacks(&images[0].manifest, BASE);
    env.assert_unpacks(&images[1].manifest, &all_files());
    assert!(env.scratch_is_clean());
}

/// What Docker >= 25 writes: an OCI layout and a legacy manifest.json over the same blobs.
fn docker_25_save() -> (Files, Descriptor) {
    let mut files = Files::default();
    let (manifest, layers) = files.oci_image("amd64", BASE, APP);
    let config = Digest::of(&config_json("amd64", &[&tar_of(BASE), &tar_of(APP)]));
    let blob_name = |digest: &Digest| format!("blobs/sha256/{}", digest.hex());
    let legacy = serde_json::json!([{
        "Config": blob_name(&config),
        "RepoTags": ["busybox:latest"],
        "Layers": layers.iter().map(|l| blob_name(&l.digest)).collect::<Vec<_>>(),
    }]);
    files.add("manifest.json", &serde_json::to_vec(&legacy).unwrap());
    let entry = with_name(manifest.clone(), ANNOTATION_REF_NAME, "latest");
    let entry = with_name(
        entry,
        ANNOTATION_IMAGE_NAME,
        "docker.io/library/busybox:latest",
    );
    files.oci_index(vec![entry]);
    (files, manifest)
}

#[test]
fn a_docker_25_save_is_read_as_oci() {
    let (files, manifest) = docker_25_save();
    let env = Env::new();

    let images = env.import(&files).unwrap();

    assert_eq!(
        images,
        [ImportedImage {
            references: vec!["docker.io/library/busybox:latest".to_owned()],
            manifest: manifest.clone(),
        }]
    );
    env.assert_unpacks(&manifest, &all_files());
}

#[test]
fn a_docker_25_save_without_its_oci_index_is_read_as_legacy() {
    let (mut files, oci_manifest) = docker_25_save();
    files.remove("index.json");
    let env = Env::new();

    let images = env.import(&files).unwrap();

    assert_eq!(images.len(), 1);
    assert_eq!(images[0].references, ["busybox:latest"]);
    // The test serializes its OCI manifest as this module does, so the synthesized manifest
    // comes out byte for byte the same.
    assert_eq!(images[0].manifest, oci_manifest);
    env.assert_unpacks(&images[0].manifest, &all_files());
}

#[test]
fn a_tampered_layer_is_refused_and_not_stored() {
    let mut files = Files::default();
    let (manifest, layers) = files.oci_image("amd64", BASE, APP);
    files.oci_index(vec![manifest.clone()]);
    let name = format!("blobs/sha256/{}", layers[1].digest.hex());
    let mut tampered = tar_of(APP);
    tampered[0] ^= 1;
    files.remove(&name);
    files.add(&name, &tampered);
    let env = Env::new();

    let err = env.import(&files).unwrap_err();

    assert!(
        matches!(
            &err,
            ArchiveError::Import { source: OciError::DigestMismatch { expected, .. }, .. }
                if *expected == layers[1].digest
        ),
        "{err:?}"
    );
    assert!(!env.blobs.path(&layers[1].digest).exists());
    assert!(!env.blobs.path(&Digest::of(&tampered)).exists());
    assert!(!env.blobs.path(&manifest.digest).exists());
    assert!(env.scratch_is_clean());
}

#[test]
fn a_legacy_layer_must_match_its_diff_id() {
    let (mut files, _, _) = docker_save();
    files.remove("1111/layer.tar");
    let mut tampered = tar_of(BASE);
    tampered[0] ^= 1;
    files.add("1111/layer.tar", &tampered);
    let env = Env::new();

    let err = env.import(&files).unwrap_err();

    assert!(
        matches!(
            &err,
            ArchiveError::Import {
                source: OciError::DigestMismatch { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!env.blobs.path(&Digest::of(&tampered)).exists());
}

#[test]
fn missing_blobs_and_files_are_named() {
    let mut files = Files::default();
    let (manifest, layers) = files.oci_image("amd64", BASE, APP);
    files.oci_index(vec![manifest]);
    files.remove(&format!("blobs/sha256/{}", layers[0].digest.hex()));
    let err = Env::new().import(&files).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::MissingBlob { digest, .. } if *digest == layers[0].digest),
        "{err:?}"
    );

    let (mut files, _, _) = docker_save();
    files.remove("3333/layer.tar");
    let err = Env::new().import(&files).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::MissingFile { name } if name == "3333/layer.tar"),
        "{err:?}"
    );
}

#[test]
fn legacy_layer_counts_must_match_the_config() {
    let layer = tar_of(BASE);
    let config = config_json("amd64", &[&layer, &layer]);
    let mut files = Files::default();
    files.add("config.json", &config);
    files.add("1/layer.tar", &layer);
    let manifest = r#"[{"Config":"config.json","RepoTags":["x:1"],"Layers":["1/layer.tar"]}]"#;
    files.add("manifest.json", manifest.as_bytes());

    let err = Env::new().import(&files).unwrap_err();

    assert!(
        matches!(
            err,
            ArchiveError::LayerCount {
                layers: 1,
                diff_ids: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn bad_json_names_the_file() {
    let mut files = Files::default();
    files.add("manifest.json", b"[{\"Config\": ");
    let err = Env::new().import(&files).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::Json { file, .. } if file == "manifest.json"),
        "{err:?}"
    );
}

#[test]
fn legacy_names_must_stay_inside_the_archive() {
    let mut files = Files::default();
    let manifest = r#"[{"Config":"../../etc/passwd","RepoTags":[],"Layers":[]}]"#;
    files.add("manifest.json", manifest.as_bytes());
    let err = Env::new().import(&files).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::UnsafeName { name, .. } if name == "../../etc/passwd"),
        "{err:?}"
    );
}

/// A tar holding `manifest.json` and then one raw entry with `name`, written byte for byte
/// (the tar crate refuses to write unsafe names).
fn tar_with_raw_entry(name: &[u8], kind: EntryType, link: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(if kind == EntryType::Regular { 1 } else { 0 });
    let old = header.as_old_mut();
    old.name[..name.len()].copy_from_slice(name);
    old.linkname[..link.len()].copy_from_slice(link);
    header.set_cksum();
    let data: &[u8] = if kind == EntryType::Regular {
        b"x"
    } else {
        b""
    };
    builder.append(&header, data).unwrap();
    builder.into_inner().unwrap()
}

#[test]
fn unsafe_entries_are_refused() {
    let cases: &[(&[u8], EntryType, &[u8])] = &[
        (b"../x", EntryType::Regular, b""),
        (b"a/../../x", EntryType::Regular, b""),
        (b"/etc/x", EntryType::Regular, b""),
        (b"link", EntryType::Symlink, b"/etc/passwd"),
        (b"a/link", EntryType::Symlink, b"../../etc/passwd"),
        (b"hard", EntryType::Link, b"../outside"),
        (b"dev/null", EntryType::Char, b""),
        (b"fifo", EntryType::Fifo, b""),
    ];
    for (name, kind, link) in cases {
        let env = Env::new();
        let archive = env.archive("bad.tar", &tar_with_raw_entry(name, *kind, link));
        let err = import_archive(&archive, &env.blobs).unwrap_err();
        let shown = String::from_utf8_lossy(name);
        assert!(
            matches!(&err, ArchiveError::UnsafeName { name, .. } if *name == shown),
            "{shown}: {err:?}"
        );
        assert!(env.scratch_is_clean(), "{shown}: scratch removed on error");
        assert!(!env.dir.path().join("x").exists());
    }
}

#[test]
fn unrelated_files_are_not_archives() {
    let env = Env::new();
    let tar = tar_of(&[("hello.txt", b"hi"), ("src/main.rs", b"fn main() {}")]);
    let err = import_archive(&env.archive("other.tar", &tar), &env.blobs).unwrap_err();
    assert!(
        matches!(&err, ArchiveError::NotRecognised { found, .. } if found == &["hello.txt", "src"]),
        "{err:?}"
    );
    assert!(err.to_string().contains("manifest.json"), "{err}");

    let not_tar = vec![b'#'; 2048];
    let err = import_archive(&env.archive("text", &not_tar), &env.blobs).unwrap_err();
    assert!(matches!(err, ArchiveError::Tar { .. }), "{err:?}");

    let mut files = Files::default();
    files.oci_index(vec![]);
    let err = env.import(&files).unwrap_err();
    assert!(matches!(err, ArchiveError::Empty { .. }), "{err:?}");
    assert!(env.scratch_is_clean());
}

#[test]
fn a_rootfs_tarball_becomes_a_one_layer_image() {
    let store_dir = tempfile::tempdir().unwrap();
    let blobs = BlobDir::create(store_dir.path()).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_path("etc/os-release").unwrap();
    header.set_size(5);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(1);
    header.set_cksum();
    builder.append(&header, &b"test\n"[..]).unwrap();
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    let archive = store_dir.path().join("rootfs.tar.gz");
    fs::write(&archive, gz.finish().unwrap()).unwrap();

    let manifest = import_rootfs(&archive, &blobs).unwrap();
    let index = Index {
        schema_version: 2,
        media_type: None,
        manifests: vec![manifest],
    };
    fs::write(
        store_dir.path().join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let layout = OciLayout::open(store_dir.path()).unwrap();
    let (image, config) = layout.resolve(None).unwrap();
    assert_eq!(image.layers.len(), 1);
    assert_eq!(image.layers[0].media_type, MEDIA_TYPE_LAYER_GZIP);
    assert_eq!(config.rootfs.diff_ids, vec![Digest::of(&tar)]);
    let root = tempfile::tempdir().unwrap();
    oci::unpack_image(
        &layout,
        &image,
        root.path(),
        &unpack::UnpackOptions::for_current_user(),
    )
    .unwrap();
    assert_eq!(
        fs::read(root.path().join("etc/os-release")).unwrap(),
        b"test\n"
    );
}
