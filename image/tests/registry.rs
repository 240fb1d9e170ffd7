//! Pulls from a real registry: Debian's `docker-registry` (distribution 2.8) serving on
//! 127.0.0.1, one per test, with images built and pushed by the test itself.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;

use arrakis_image::blobs::BlobDir;
use arrakis_image::oci::{
    Digest, MEDIA_TYPE_CONFIG, MEDIA_TYPE_DOCKER_CONFIG, MEDIA_TYPE_DOCKER_LIST,
    MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_INDEX, MEDIA_TYPE_MANIFEST,
};
use arrakis_image::registry::{
    pull, Credentials, NoProgress, PullOptions, PullProgress, PulledImage, RegistryError,
};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;

#[path = "common/fake_registry.rs"]
mod fake_registry;
#[path = "common/registry.rs"]
mod registry;

use fake_registry::{base64_encode, FakeRegistry, Fault, Request, TokenAuth, SERVICE};
use registry::{free_port, TestRegistry};

/// The media types an image is built with.
struct MediaTypes {
    manifest: &'static str,
    config: &'static str,
    layer: &'static str,
}

const OCI: MediaTypes = MediaTypes {
    manifest: MEDIA_TYPE_MANIFEST,
    config: MEDIA_TYPE_CONFIG,
    layer: "application/vnd.oci.image.layer.v1.tar+gzip",
};
const DOCKER: MediaTypes = MediaTypes {
    manifest: MEDIA_TYPE_DOCKER_MANIFEST,
    config: MEDIA_TYPE_DOCKER_CONFIG,
    layer: "application/vnd.docker.image.rootfs.diff.tar.gzip",
};

/// An image built in memory: gzip layers, an OCI config and manifest.
struct TestImage {
    types: &'static MediaTypes,
    layers: Vec<Vec<u8>>,
    config: Vec<u8>,
    manifest: Vec<u8>,
}

impl TestImage {
    fn new(architecture: &str, layers: Vec<Vec<u8>>) -> TestImage {
        TestImage::with_types(architecture, layers, &OCI)
    }

    fn with_types(
        architecture: &str,
        layers: Vec<Vec<u8>>,
        types: &'static MediaTypes,
    ) -> TestImage {
        let diff_ids: Vec<String> = layers
            .iter()
            .map(|layer| {
                let mut tar = Vec::new();
                flate2::read::GzDecoder::new(&layer[..])
                    .read_to_end(&mut tar)
                    .unwrap();
                Digest::of(&tar).to_string()
            })
            .collect();
        let config = serde_json::to_vec(&json!({
            "architecture": architecture,
            "os": "linux",
            "config": {"Cmd": ["/bin/hello"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let layer_descriptors: Vec<_> = layers
            .iter()
            .map(|layer| descriptor(types.layer, layer))
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": types.manifest,
            "config": descriptor(types.config, &config),
            "layers": layer_descriptors,
        }))
        .unwrap();
        TestImage {
            types,
            layers,
            config,
            manifest,
        }
    }

    fn manifest_digest(&self) -> Digest {
        Digest::of(&self.manifest)
    }

    fn layer_digests(&self) -> Vec<Digest> {
        self.layers.iter().map(|l| Digest::of(l)).collect()
    }
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": Digest::of(blob).to_string(), "size": blob.len()})
}

/// A gzip-compressed tar holding one file.
fn layer(name: &str, content: &[u8]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append_data(&mut header, name, content).unwrap();
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// Bytes gzip cannot shrink, so a layer's size is about `len`.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn push_client() -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..ClientConfig::default()
    })
}

/// Pushes the image's blobs and its manifest under `reference` (a tag or a digest).
async fn push(reference: &str, image: &TestImage, auth: &RegistryAuth) {
    let reference: Reference = reference.parse().unwrap();
    let client = push_client();
    client
        .store_auth_if_needed(reference.resolve_registry(), auth)
        .await;
    for blob in image.layers.iter().chain([&image.config]) {
        client
            .push_blob(&reference, blob, &Digest::of(blob).to_string())
            .await
            .unwrap();
    }
    client
        .push_manifest_raw(
            &reference,
            image.manifest.clone(),
            image.types.manifest.parse().unwrap(),
        )
        .await
        .unwrap();
}

/// Pushes each image by digest and an OCI index of them under `reference`; returns the
/// index bytes.
async fn push_index(reference: &str, images: &[(&str, &TestImage)]) -> Vec<u8> {
    let repository = reference.rsplit_once(':').unwrap().0;
    let mut entries = Vec::new();
    for (architecture, image) in images {
        let digest = image.manifest_digest();
        push(
            &format!("{repository}@{digest}"),
            image,
            &RegistryAuth::Anonymous,
        )
        .await;
        let mut entry = descriptor(MEDIA_TYPE_MANIFEST, &image.manifest);
        entry["platform"] = json!({"os": "linux", "architecture": architecture});
        entries.push(entry);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": entries,
    }))
    .unwrap();
    push_client()
        .push_manifest_raw(
            &reference.parse().unwrap(),
            index.clone(),
            MEDIA_TYPE_INDEX.parse().unwrap(),
        )
        .await
        .unwrap();
    index
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Resolved {
        reference: String,
        manifest: Digest,
        layers: Vec<Digest>,
    },
    Progress {
        digest: Digest,
        done: u64,
        total: u64,
    },
    Done {
        digest: Digest,
        cached: bool,
    },
}

/// Records every progress call in order.
#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap().clone()
    }

    fn progress_of(&self, wanted: &Digest) -> Vec<u64> {
        self.events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Progress { digest, done, .. } if &digest == wanted => Some(done),
                _ => None,
            })
            .collect()
    }
}

impl PullProgress for Recorder {
    fn resolved(
        &self,
        reference: &str,
        manifest: &Digest,
        layers: &[arrakis_image::oci::Descriptor],
    ) {
        self.0.lock().unwrap().push(Event::Resolved {
            reference: reference.to_owned(),
            manifest: manifest.clone(),
            layers: layers.iter().map(|l| l.digest.clone()).collect(),
        });
    }

    fn layer_progress(&self, digest: &Digest, done: u64, total: u64) {
        self.0.lock().unwrap().push(Event::Progress {
            digest: digest.clone(),
            done,
            total,
        });
    }

    fn layer_done(&self, digest: &Digest, cached: bool) {
        self.0.lock().unwrap().push(Event::Done {
            digest: digest.clone(),
            cached,
        });
    }
}

fn insecure() -> PullOptions {
    PullOptions {
        insecure: true,
        ..PullOptions::default()
    }
}

fn store() -> (tempfile::TempDir, BlobDir) {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobDir::create(dir.path()).unwrap();
    (dir, blobs)
}

fn stored(blobs: &BlobDir, blob: &[u8]) -> bool {
    fs::read(blobs.path(&Digest::of(blob))).is_ok_and(|content| content == blob)
}

fn stored_blob_count(layout: &Path) -> usize {
    fs::read_dir(layout.join("blobs/sha256")).unwrap().count()
}

fn assert_image_stored(blobs: &BlobDir, image: &TestImage, pulled: &PulledImage) {
    assert_eq!(pulled.manifest.digest, image.manifest_digest());
    assert_eq!(pulled.manifest.size, image.manifest.len() as u64);
    assert_eq!(pulled.manifest.media_type, image.types.manifest);
    assert_eq!(
        (
            pulled.config.os.as_str(),
            pulled.config.architecture.as_str()
        ),
        ("linux", "amd64")
    );
    for blob in image.layers.iter().chain([&image.config, &image.manifest]) {
        assert!(stored(blobs, blob), "blob {} is stored", Digest::of(blob));
    }
}

#[tokio::test]
async fn pulls_an_image_and_skips_cached_layers() {
    let registry = TestRegistry::start();
    let host = registry.host();
    let image = TestImage::new(
        "amd64",
        vec![
            layer("bin/hello", b"#!/bin/sh\necho hello\n"),
            layer("etc/motd", &noise(64 << 10, 7)),
            layer("etc/hostname", b"sandbox\n"),
        ],
    );
    push(
        &format!("{host}/test/app:v1"),
        &image,
        &RegistryAuth::Anonymous,
    )
    .await;
    push(
        &format!("{host}/test/app:latest"),
        &image,
        &RegistryAuth::Anonymous,
    )
    .await;
    let (dir, blobs) = store();

    let recorder = Recorder::default();
    let options = PullOptions {
        parallel: 1,
        ..insecure()
    };
    let pulled = pull(&format!("{host}/test/app:v1"), &blobs, &options, &recorder)
        .await
        .unwrap();
    assert_eq!(pulled.reference, format!("{host}/test/app:v1"));
    assert_image_stored(&blobs, &image, &pulled);
    let run = pulled.config.config.as_ref().unwrap();
    assert_eq!(run.cmd.as_deref(), Some(&["/bin/hello".to_owned()][..]));
    assert!(!dir.path().join("index.json").exists(), "pull does not tag");

    // One layer at a time: each layer's progress ends with its completion, in order.
    let mut expected_order = image.layer_digests().into_iter();
    let events = recorder.events();
    assert_eq!(
        events[0],
        Event::Resolved {
            reference: pulled.reference.clone(),
            manifest: image.manifest_digest(),
            layers: image.layer_digests(),
        }
    );
    let mut current = None;
    for event in &events[1..] {
        match event {
            Event::Progress {
                digest,
                done,
                total,
            } => {
                if current.as_ref() != Some(digest) {
                    assert_eq!(Some(digest), expected_order.next().as_ref());
                    current = Some(digest.clone());
                }
                assert!(done <= total);
            }
            Event::Done { digest, cached } => {
                assert_eq!(current.take().as_ref(), Some(digest));
                assert!(!cached);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(expected_order.next(), None, "every layer was downloaded");
    for (digest, layer) in image.layer_digests().iter().zip(&image.layers) {
        assert_eq!(
            recorder.progress_of(digest).last(),
            Some(&(layer.len() as u64))
        );
    }

    // Pulled again (no tag means `latest`, here the same image): every layer is cached.
    let recorder = Recorder::default();
    let pulled = pull(&format!("{host}/test/app"), &blobs, &insecure(), &recorder)
        .await
        .unwrap();
    assert_eq!(pulled.reference, format!("{host}/test/app:latest"));
    assert_eq!(pulled.manifest.digest, image.manifest_digest());
    let done: Vec<Event> = recorder
        .events()
        .into_iter()
        .filter(|e| !matches!(e, Event::Resolved { .. }))
        .collect();
    assert_eq!(done.len(), image.layers.len(), "{done:?}");
    for digest in image.layer_digests() {
        assert!(done.contains(&Event::Done {
            digest,
            cached: true
        }));
    }

    // By digest: the manifest is checked against it.
    let by_digest = format!("{host}/test/app@{}", image.manifest_digest());
    let pulled = pull(&by_digest, &blobs, &insecure(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(pulled.reference, by_digest);
    assert_image_stored(&blobs, &image, &pulled);
}

#[tokio::test]
async fn picks_linux_amd64_from_an_index() {
    let registry = TestRegistry::start();
    let host = registry.host();
    let amd64 = TestImage::new("amd64", vec![layer("arch", b"amd64\n")]);
    let arm64 = TestImage::new("arm64", vec![layer("arch", b"arm64\n")]);
    let index = push_index(
        &format!("{host}/multi:1"),
        &[("arm64", &arm64), ("amd64", &amd64)],
    )
    .await;
    let (_dir, blobs) = store();

    let pulled = pull(&format!("{host}/multi:1"), &blobs, &insecure(), &NoProgress)
        .await
        .unwrap();
    assert_image_stored(&blobs, &amd64, &pulled);
    assert_eq!(
        pulled.manifest.platform.as_ref().map(ToString::to_string),
        Some("linux/amd64".to_owned())
    );
    assert!(stored(&blobs, &index), "the index is kept");
    for blob in arm64.layers.iter().chain([&arm64.config, &arm64.manifest]) {
        assert!(!blobs.path(&Digest::of(blob)).exists(), "nothing of arm64");
    }

    push_index(&format!("{host}/multi:arm"), &[("arm64", &arm64)]).await;
    let err = pull(
        &format!("{host}/multi:arm"),
        &blobs,
        &insecure(),
        &NoProgress,
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, RegistryError::NoPlatform { .. }), "{message}");
    assert!(
        message.contains("no linux/amd64 image") && message.contains("linux/arm64"),
        "{message}"
    );
}

#[tokio::test]
async fn unknown_tags_and_repositories_are_not_found() {
    let registry = TestRegistry::start();
    let host = registry.host();
    let image = TestImage::new("amd64", vec![layer("a", b"a")]);
    push(&format!("{host}/app:v1"), &image, &RegistryAuth::Anonymous).await;
    let (dir, blobs) = store();

    for missing in [format!("{host}/app:nope"), format!("{host}/other:v1")] {
        let err = pull(&missing, &blobs, &insecure(), &NoProgress)
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, RegistryError::NotFound { .. }), "{message}");
        assert!(
            message.contains(&missing)
                && message.contains(&format!("not found in registry {host}")),
            "{message}"
        );
    }
    assert_eq!(stored_blob_count(dir.path()), 0);
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let host = format!("127.0.0.1:{}", free_port());
    let (dir, blobs) = store();
    let err = pull(&format!("{host}/app:v1"), &blobs, &insecure(), &NoProgress)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, RegistryError::Unreachable { .. }),
        "{message}"
    );
    assert_eq!(message, format!("cannot reach registry {host}"));
    assert_eq!(stored_blob_count(dir.path()), 0);
}

#[tokio::test]
async fn a_corrupted_layer_is_rejected_and_not_stored() {
    let registry = TestRegistry::start();
    let host = registry.host();
    let image = TestImage::new("amd64", vec![layer("data", &noise(32 << 10, 3))]);
    push(&format!("{host}/app:v1"), &image, &RegistryAuth::Anonymous).await;
    let layer_digest = Digest::of(&image.layers[0]);
    let mut corrupted = image.layers[0].clone();
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0xff;
    fs::write(registry.blob_data(&layer_digest), &corrupted).unwrap();
    let (_dir, blobs) = store();

    let err = pull(&format!("{host}/app:v1"), &blobs, &insecure(), &NoProgress)
        .await
        .unwrap_err();
    match &err {
        RegistryError::DigestMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &layer_digest);
            assert_eq!(actual, &Digest::of(&corrupted));
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(!blobs.path(&layer_digest).exists());
    assert!(!blobs.partial_path(&layer_digest).exists());
    assert!(
        !blobs.path(&image.manifest_digest()).exists(),
        "the manifest is stored only once its layers are"
    );
}

#[tokio::test]
async fn an_interrupted_download_resumes_from_its_partial_file() {
    let registry = TestRegistry::start();
    let host = registry.host();
    let image = TestImage::new("amd64", vec![layer("big", &noise(1 << 20, 11))]);
    push(&format!("{host}/app:v1"), &image, &RegistryAuth::Anonymous).await;
    let blob = &image.layers[0];
    let digest = Digest::of(blob);
    let half = blob.len() / 2;
    let (_dir, blobs) = store();
    let (mut partial, kept) = blobs.open_partial(&digest).unwrap();
    assert_eq!(kept, 0);
    partial.write_all(&blob[..half]).unwrap();
    drop(partial);

    let recorder = Recorder::default();
    pull(&format!("{host}/app:v1"), &blobs, &insecure(), &recorder)
        .await
        .unwrap();
    assert!(stored(&blobs, blob));
    assert!(!blobs.partial_path(&digest).exists());
    let progress = recorder.progress_of(&digest);
    assert_eq!(
        progress.first(),
        Some(&(half as u64)),
        "resumed at the half"
    );
    assert!(
        progress.iter().all(|done| *done >= half as u64),
        "{progress:?}"
    );
    assert_eq!(progress.last(), Some(&(blob.len() as u64)));
}

#[tokio::test]
async fn a_stale_partial_file_is_discarded_and_downloaded_again() {
    let registry = TestRegistry::start();
    let host = registry.host();
    let image = TestImage::new("amd64", vec![layer("big", &noise(256 << 10, 5))]);
    push(&format!("{host}/app:v1"), &image, &RegistryAuth::Anonymous).await;
    let blob = &image.layers[0];
    let digest = Digest::of(blob);
    let (_dir, blobs) = store();
    let (mut partial, _) = blobs.open_partial(&digest).unwrap();
    partial.write_all(&vec![0u8; blob.len() / 2]).unwrap();
    drop(partial);

    let recorder = Recorder::default();
    pull(&format!("{host}/app:v1"), &blobs, &insecure(), &recorder)
        .await
        .unwrap();
    assert!(stored(&blobs, blob));
    let progress = recorder.progress_of(&digest);
    assert!(progress.contains(&0), "started over: {progress:?}");
}

#[tokio::test]
async fn basic_auth_is_required_and_checked() {
    let registry = TestRegistry::start_with(Some(("tester", "s3cret")));
    let host = registry.host();
    let image = TestImage::new("amd64", vec![layer("secret", b"classified\n")]);
    let good = RegistryAuth::Basic("tester".into(), "s3cret".into());
    push(&format!("{host}/private:v1"), &image, &good).await;
    let reference = format!("{host}/private:v1");
    let (dir, blobs) = store();

    let err = pull(&reference, &blobs, &insecure(), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::CredentialsNeeded { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("needs credentials"), "{err}");

    let wrong = PullOptions {
        credentials: Credentials::Basic {
            username: "tester".into(),
            password: "guess".into(),
        },
        ..insecure()
    };
    let err = pull(&reference, &blobs, &wrong, &NoProgress)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, RegistryError::CredentialsRefused { .. }),
        "{message}"
    );
    assert!(
        message.contains(&format!("registry {host} refused the credentials"))
            && !message.contains("guess"),
        "{message}"
    );
    assert_eq!(stored_blob_count(dir.path()), 0);

    let right = PullOptions {
        credentials: Credentials::Basic {
            username: "tester".into(),
            password: "s3cret".into(),
        },
        ..insecure()
    };
    let pulled = pull(&reference, &blobs, &right, &NoProgress).await.unwrap();
    assert_image_stored(&blobs, &image, &pulled);
}

/// A fake registry serving `image` as `app:v1`, with `fault` on its first layer.
fn fake_serving(image: &TestImage, fault: Fault) -> FakeRegistry {
    let faults = vec![(Digest::of(&image.layers[0]).to_string(), fault)];
    serve_app(image, faults, None)
}

/// A fake registry serving `image` as `app:v1` with these faults and auth.
fn serve_app(
    image: &TestImage,
    faults: Vec<(String, Fault)>,
    auth: Option<TokenAuth>,
) -> FakeRegistry {
    let mut blobs = image.layers.clone();
    blobs.push(image.config.clone());
    let manifests = vec![(
        "v1".to_owned(),
        MEDIA_TYPE_MANIFEST.to_owned(),
        image.manifest.clone(),
    )];
    FakeRegistry::start_with_auth("app", manifests, blobs, faults, auth)
}

/// The `Range` header of each request the fake registry got for the blob.
fn ranges_asked(fake: &FakeRegistry, digest: &Digest) -> Vec<Option<String>> {
    let path = format!("/v2/app/blobs/{digest}");
    fake.requests()
        .into_iter()
        .filter(|request| request.path == path)
        .map(|request| request.range)
        .collect()
}

#[tokio::test]
async fn a_broken_download_is_retried_from_where_it_stopped() {
    let image = TestImage::new("amd64", vec![layer("big", &noise(256 << 10, 13))]);
    let fake = fake_serving(&image, Fault::CutFirstAfter(100_000));
    let digest = Digest::of(&image.layers[0]);
    let (_dir, blobs) = store();

    let recorder = Recorder::default();
    let reference = format!("{}/app:v1", fake.host());
    let pulled = pull(&reference, &blobs, &insecure(), &recorder)
        .await
        .unwrap();
    assert_image_stored(&blobs, &image, &pulled);
    assert_eq!(
        ranges_asked(&fake, &digest),
        [None, Some("bytes=100000-".to_owned())]
    );
    assert!(recorder.progress_of(&digest).contains(&100_000));
}

#[tokio::test]
async fn a_registry_ignoring_ranges_gets_a_whole_download() {
    let image = TestImage::new("amd64", vec![layer("big", &noise(128 << 10, 17))]);
    let fake = fake_serving(&image, Fault::IgnoreRange);
    let blob = &image.layers[0];
    let digest = Digest::of(blob);
    let half = blob.len() / 2;
    let (_dir, blobs) = store();
    let (mut partial, _) = blobs.open_partial(&digest).unwrap();
    partial.write_all(&blob[..half]).unwrap();
    drop(partial);

    let recorder = Recorder::default();
    let reference = format!("{}/app:v1", fake.host());
    pull(&reference, &blobs, &insecure(), &recorder)
        .await
        .unwrap();
    assert!(stored(&blobs, blob));
    assert_eq!(
        ranges_asked(&fake, &digest),
        [Some(format!("bytes={half}-"))]
    );
    assert_eq!(
        recorder.progress_of(&digest).first(),
        Some(&0),
        "started over"
    );
}

#[tokio::test]
async fn server_errors_are_retried_but_a_missing_blob_is_not() {
    let image = TestImage::new("amd64", vec![layer("a", b"a")]);
    let digest = Digest::of(&image.layers[0]);
    let fake = fake_serving(&image, Fault::FailFirst(503));
    let (_dir, blobs) = store();
    let reference = format!("{}/app:v1", fake.host());
    let pulled = pull(&reference, &blobs, &insecure(), &NoProgress)
        .await
        .unwrap();
    assert_image_stored(&blobs, &image, &pulled);
    assert_eq!(ranges_asked(&fake, &digest).len(), 2);

    let fake = fake_serving(&image, Fault::FailFirst(404));
    let (_dir, blobs) = store();
    let reference = format!("{}/app:v1", fake.host());
    let err = pull(&reference, &blobs, &insecure(), &NoProgress)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{message}");
    assert_eq!(
        message,
        format!("blob {digest} not found in registry {}", fake.host())
    );
    assert_eq!(ranges_asked(&fake, &digest).len(), 1);
}

#[tokio::test]
async fn docker_media_types_are_pulled_and_other_artifacts_refused() {
    let image = TestImage::with_types("amd64", vec![layer("d", b"docker\n")], &DOCKER);
    let mut entry = descriptor(MEDIA_TYPE_DOCKER_MANIFEST, &image.manifest);
    entry["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_DOCKER_LIST,
        "manifests": [entry],
    }))
    .unwrap();
    const HELM: MediaTypes = MediaTypes {
        manifest: MEDIA_TYPE_MANIFEST,
        config: "application/vnd.cncf.helm.config.v1+json",
        layer: "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
    };
    let chart = TestImage::with_types("amd64", vec![layer("c", b"chart\n")], &HELM);
    let fake = FakeRegistry::start(
        "app",
        vec![
            ("docker".into(), MEDIA_TYPE_DOCKER_LIST.into(), list.clone()),
            (
                image.manifest_digest().to_string(),
                MEDIA_TYPE_DOCKER_MANIFEST.into(),
                image.manifest.clone(),
            ),
            (
                "chart".into(),
                MEDIA_TYPE_MANIFEST.into(),
                chart.manifest.clone(),
            ),
        ],
        [&image, &chart]
            .iter()
            .flat_map(|i| i.layers.iter().chain([&i.config]).cloned())
            .collect(),
        Vec::new(),
    );
    let (_dir, blobs) = store();

    let reference = format!("{}/app:docker", fake.host());
    let pulled = pull(&reference, &blobs, &insecure(), &NoProgress)
        .await
        .unwrap();
    assert_image_stored(&blobs, &image, &pulled);
    assert!(stored(&blobs, &list));

    let reference = format!("{}/app:chart", fake.host());
    let err = pull(&reference, &blobs, &insecure(), &NoProgress)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, RegistryError::UnsupportedMediaType { .. }),
        "{message}"
    );
    assert!(message.contains(HELM.config), "{message}");
    assert!(!blobs.path(&Digest::of(&chart.layers[0])).exists());
}

/// A fake registry serving `image` as `app:v1` behind Docker's token flow: `/token` grants
/// `token` (to anyone, or only to `basic` credentials) and every `/v2/` request needs it.
fn token_registry(image: &TestImage, token: &str, basic: Option<(&str, &str)>) -> FakeRegistry {
    let auth = TokenAuth {
        token: token.to_owned(),
        basic: basic.map(|(user, password)| (user.to_owned(), password.to_owned())),
    };
    serve_app(image, Vec::new(), Some(auth))
}

fn with_credentials(credentials: Credentials) -> PullOptions {
    PullOptions {
        credentials,
        ..insecure()
    }
}

fn basic(username: &str, password: &str) -> Credentials {
    Credentials::Basic {
        username: username.to_owned(),
        password: password.to_owned(),
    }
}

/// The token request oci-client makes for a pull of `app` from the fake.
fn token_path() -> String {
    format!("/token?scope=repository%3Aapp%3Apull&service={SERVICE}")
}

/// The requests for the repository's manifests and blobs (not the `/v2/` ping or tokens).
fn repository_requests(requests: &[Request]) -> Vec<&Request> {
    requests
        .iter()
        .filter(|r| r.path.starts_with("/v2/app/"))
        .collect()
}

/// Asserts that `requests` fetched the manifest and every blob of `image`, all with
/// `Authorization: Bearer <token>`.
fn assert_fetched_with_token(requests: &[Request], image: &TestImage, token: &str) {
    let fetched = repository_requests(requests);
    for request in &fetched {
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {token}").as_str()),
            "{request:?}"
        );
    }
    let paths: Vec<&str> = fetched.iter().map(|r| r.path.as_str()).collect();
    assert!(paths.contains(&"/v2/app/manifests/v1"), "{paths:?}");
    for blob in image.layers.iter().chain([&image.config]) {
        let path = format!("/v2/app/blobs/{}", Digest::of(blob));
        assert!(paths.contains(&path.as_str()), "{path} in {paths:?}");
    }
}

#[tokio::test]
async fn an_anonymous_pull_gets_a_token_from_the_realm() {
    let image = TestImage::new(
        "amd64",
        vec![layer("a", b"first\n"), layer("b", &noise(16 << 10, 19))],
    );
    let fake = token_registry(&image, "anon-token", None);
    let (_dir, blobs) = store();

    let reference = format!("{}/app:v1", fake.host());
    let pulled = pull(&reference, &blobs, &insecure(), &NoProgress)
        .await
        .unwrap();
    assert_image_stored(&blobs, &image, &pulled);

    let requests = fake.requests();
    // The client pings `/v2/` without credentials, follows the challenge to the realm
    // anonymously, then sends the token it got with every request, asking only once.
    assert_eq!(
        requests[..2],
        [
            Request {
                path: "/v2/".to_owned(),
                range: None,
                authorization: None,
            },
            Request {
                path: token_path(),
                range: None,
                authorization: None,
            },
        ]
    );
    assert_eq!(
        requests
            .iter()
            .filter(|r| r.path.starts_with("/token"))
            .count(),
        1,
        "{requests:?}"
    );
    assert_eq!(
        requests.len(),
        2 + repository_requests(&requests).len(),
        "{requests:?}"
    );
    assert_fetched_with_token(&requests, &image, "anon-token");
}

#[tokio::test]
async fn basic_credentials_are_exchanged_for_a_token() {
    let image = TestImage::new("amd64", vec![layer("secret", b"classified\n")]);
    let fake = token_registry(&image, "user-token", Some(("tester", "s3cret")));
    let reference = format!("{}/app:v1", fake.host());
    let (dir, blobs) = store();

    // Without credentials the realm gives no token, so the manifest request goes without
    // one and is refused.
    let err = pull(&reference, &blobs, &insecure(), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegistryError::CredentialsNeeded { .. }),
        "{err}"
    );
    let requests = fake.take_requests();
    assert!(
        repository_requests(&requests)
            .iter()
            .all(|r| r.authorization.is_none()),
        "{requests:?}"
    );

    // A wrong password: the realm refuses it, oci-client drops that error and sends the
    // manifest request without a token; its 401 becomes `CredentialsRefused`.
    let err = pull(
        &reference,
        &blobs,
        &with_credentials(basic("tester", "guess")),
        &NoProgress,
    )
    .await
    .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, RegistryError::CredentialsRefused { .. }),
        "{message}"
    );
    assert_eq!(
        message,
        format!(
            "registry {} refused the credentials given for `{reference}`",
            fake.host()
        )
    );
    assert!(!message.contains("guess"), "{message}");
    assert_eq!(
        fake.take_requests(),
        [
            Request {
                path: "/v2/".to_owned(),
                range: None,
                authorization: None,
            },
            Request {
                path: token_path(),
                range: None,
                authorization: Some(format!("Basic {}", base64_encode("tester:guess"))),
            },
            Request {
                path: "/v2/app/manifests/v1".to_owned(),
                range: None,
                authorization: None,
            },
        ]
    );
    assert_eq!(stored_blob_count(dir.path()), 0);

    // The right password goes to the realm only; the registry sees the token.
    let pulled = pull(
        &reference,
        &blobs,
        &with_credentials(basic("tester", "s3cret")),
        &NoProgress,
    )
    .await
    .unwrap();
    assert_image_stored(&blobs, &image, &pulled);
    let requests = fake.take_requests();
    let token_requests: Vec<&Request> = requests
        .iter()
        .filter(|r| r.path.starts_with("/token"))
        .collect();
    assert_eq!(
        token_requests,
        [&Request {
            path: token_path(),
            range: None,
            authorization: Some(format!("Basic {}", base64_encode("tester:s3cret"))),
        }]
    );
    assert_fetched_with_token(&requests, &image, "user-token");
}

#[tokio::test]
async fn a_bearer_token_is_sent_as_is_without_asking_the_realm() {
    let image = TestImage::new("amd64", vec![layer("t", b"token\n")]);
    // The realm would refuse the client anything it can send: a pull that works used the
    // given token directly.
    let fake = token_registry(&image, "given-token", Some(("nobody", "unguessable")));
    let reference = format!("{}/app:v1", fake.host());
    let (dir, blobs) = store();

    let wrong = with_credentials(Credentials::Bearer("stale-token".into()));
    let err = pull(&reference, &blobs, &wrong, &NoProgress)
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, RegistryError::CredentialsRefused { .. }),
        "{message}"
    );
    assert!(!message.contains("stale-token"), "{message}");
    assert_eq!(
        fake.take_requests(),
        [Request {
            path: "/v2/app/manifests/v1".to_owned(),
            range: None,
            authorization: Some("Bearer stale-token".to_owned()),
        }]
    );
    assert_eq!(stored_blob_count(dir.path()), 0);

    let right = with_credentials(Credentials::Bearer("given-token".into()));
    let pulled = pull(&reference, &blobs, &right, &NoProgress).await.unwrap();
    assert_image_stored(&blobs, &image, &pulled);
    let requests = fake.take_requests();
    // No `/v2/` ping and no token request: only the repository's manifest and blobs.
    assert_eq!(
        repository_requests(&requests).len(),
        requests.len(),
        "{requests:?}"
    );
    assert_fetched_with_token(&requests, &image, "given-token");
}
