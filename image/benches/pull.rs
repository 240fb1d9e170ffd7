//! Image pull benchmark: pulling a ~100 MiB image from a local registry and
//! converting it to an ext4 root file system, against the bare work done on
//! the same blobs in the same run (absolute numbers vary by machine):
//!
//! - cold: `registry::pull` into a new store, `tag`, then `prepare` (verify,
//!   unpack, `mkfs.ext4 -d`, sync); the pull and convert parts are also shown;
//! - baseline: the manifest, config and layers fetched with plain HTTP/1.0
//!   GETs (layers on as many threads as pull's default parallelism), each
//!   layer gunzipped and untarred in process, in order, into one tree (the
//!   `flate2` and `tar` crates arrakis also uses), and the tree packed by
//!   `mkfs.ext4 -d` at the size `ext4::tree_size` gives: no digest checked,
//!   nothing synced, the tree left in place;
//! - cache hit: the pull again into a store that has the image (manifest and
//!   config fetched, layers found) plus `tag` and `prepare` (rootfs found);
//!   and `open` + `lookup` + `prepare` alone, what a sandbox create pays.
//!
//! Variants run interleaved, each round starting one further along, after an
//! untimed round. What a variant wrote is deleted right after it, before it
//! reaches the disk (deleting written files can cost more than writing them,
//! e.g. with online discard), and dirty pages are flushed (`sync`) before the
//! next one, so none pays for another's writeback. Then a few parts are timed
//! alone: sha256 and gunzip of the layers in memory, and arrakis's unpack of
//! the image into a tree.
//!
//! The image is built here from a fixed seed: a layer of 60 MiB of random
//! bytes in 6 files, one of 40 MiB of text in 4096 files, and a small one.
//! The registry is Debian's `docker-registry` on 127.0.0.1, with storage in a
//! temporary directory; everything is removed (and the registry killed) on
//! exit, also on a panic.
//!
//! Run with `cargo bench -p arrakis-image --bench pull` (or `scripts/bench`);
//! `ARRAKIS_BENCH_RUNS` sets the number of timed rounds (default 5). Skipped
//! when `docker-registry` or `mkfs.ext4` is missing.

use std::cell::Cell;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context;
use arrakis_image::ext4;
use arrakis_image::oci::{
    self, Digest, Manifest, OciLayout, MEDIA_TYPE_CONFIG, MEDIA_TYPE_MANIFEST,
};
use arrakis_image::registry::{pull, NoProgress, PullOptions};
use arrakis_image::store::{ImageRef, ImageStore};
use arrakis_image::unpack::UnpackOptions;
use oci_client::client::{ClientConfig, ClientProtocol};
use serde_json::json;

#[path = "../tests/common/registry.rs"]
#[allow(dead_code)]
mod registry;

use registry::{TestRegistry, REGISTRY_BINARY};

const REPOSITORY: &str = "bench/app";
const TAG: &str = "v1";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MIB: f64 = 1024.0 * 1024.0;
/// Untimed rounds of every variant before the timed ones.
const WARMUP_ROUNDS: usize = 1;
/// Runs of each part timed alone.
const PART_RUNS: usize = 3;
const RANDOM_FILES: usize = 6;
const RANDOM_FILE_BYTES: usize = 10 << 20;
const TEXT_DIRS: usize = 64;
const TEXT_FILES_PER_DIR: usize = 64;
/// Text files are this size on average (between half and one and a half).
const TEXT_FILE_BYTES: usize = 10 << 10;
const WORDS: [&str; 32] = [
    "sandbox", "kernel", "image", "layer", "the", "of", "and", "to", "a", "in", "is", "for",
    "microvm", "guest", "host", "snapshot", "restore", "fork", "network", "port", "file", "system",
    "process", "memory", "disk", "block", "inode", "journal", "extent", "registry", "blob",
    "digest",
];

fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::var("ARRAKIS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    for (tool, arg) in [(REGISTRY_BINARY, "--version"), ("mkfs.ext4", "-V")] {
        if let Err(e) = Command::new(tool).arg(arg).output() {
            eprintln!("skipping the pull benchmark: cannot run {tool} ({e})");
            return Ok(());
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Declared before the scratch directory: dropped after it, killed last.
    let registry = TestRegistry::start();
    let scratch = tempfile::Builder::new()
        .prefix("arrakis-bench-pull")
        .tempdir()?;

    let started = Instant::now();
    let image = BenchImage::build();
    let reference = format!("{}/{REPOSITORY}:{TAG}", registry.host());
    runtime.block_on(image.push(&reference))?;
    eprintln!(
        "pull bench: image built and pushed in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let bench = Bench {
        runtime: &runtime,
        host: registry.host(),
        reference,
        scratch: scratch.path().to_path_buf(),
        warm: scratch.path().join("warm"),
        options: PullOptions {
            insecure: true,
            ..PullOptions::default()
        },
        owners: is_root(),
        disks: Cell::new((0, 0)),
    };
    // The store the cache hits use; also the first untimed cold pull.
    bench.cold(&bench.warm)?;
    let series = bench.rounds(runs)?;
    let parts = bench.parts(&image)?;
    report(&bench, &image, runs, &series, &parts);
    Ok(())
}

/// The variants, in the order the first round runs them.
#[derive(Debug, Clone, Copy)]
enum Variant {
    Cold,
    Baseline,
    CachePull,
    CacheLookup,
}

const VARIANTS: [Variant; 4] = [
    Variant::Cold,
    Variant::Baseline,
    Variant::CachePull,
    Variant::CacheLookup,
];

/// What every variant needs.
struct Bench<'a> {
    runtime: &'a tokio::runtime::Runtime,
    host: String,
    reference: String,
    scratch: PathBuf,
    /// The images directory of the store that has the image, converted.
    warm: PathBuf,
    options: PullOptions,
    /// Whether unpacking keeps the archives' owners (as root, like arrakis).
    owners: bool,
    /// Sizes of the last disk image made by the cold path and the baseline.
    disks: Cell<(u64, u64)>,
}

impl Bench<'_> {
    /// Runs every variant once per round; returns each variant's timed phases
    /// (seconds, the whole first) as one series per phase.
    fn rounds(&self, runs: usize) -> anyhow::Result<Vec<Vec<Vec<f64>>>> {
        let mut series: Vec<Vec<Vec<f64>>> = vec![Vec::new(); VARIANTS.len()];
        for round in 0..WARMUP_ROUNDS + runs {
            for k in 0..VARIANTS.len() {
                let i = (round + k) % VARIANTS.len();
                let dir = self.scratch.join(format!("run-{round}-{i}"));
                sync();
                let phases = match VARIANTS[i] {
                    Variant::Cold => self.cold(&dir),
                    Variant::Baseline => self.baseline(&dir),
                    Variant::CachePull => self.cache_pull(),
                    Variant::CacheLookup => self.cache_lookup(),
                }
                .with_context(|| format!("round {round}: {:?}", VARIANTS[i]))?;
                if dir.exists() {
                    fs::remove_dir_all(&dir)?;
                }
                if round >= WARMUP_ROUNDS {
                    let variant = &mut series[i];
                    variant.resize(phases.len(), Vec::new());
                    for (samples, value) in variant.iter_mut().zip(phases) {
                        samples.push(value);
                    }
                }
            }
        }
        Ok(series)
    }

    /// Pull, tag and convert into a new store under `dir`: whole, pull + tag, convert.
    fn cold(&self, dir: &Path) -> anyhow::Result<Vec<f64>> {
        let start = Instant::now();
        let store = ImageStore::open(dir)?;
        let pulled = self.runtime.block_on(pull(
            &self.reference,
            store.blobs(),
            &self.options,
            &NoProgress,
        ))?;
        store.tag(&ImageRef::parse(&pulled.reference)?, &pulled.manifest)?;
        let pulled_at = start.elapsed().as_secs_f64();
        let prepared = store.prepare(&pulled.manifest, 0)?;
        let total = start.elapsed().as_secs_f64();
        anyhow::ensure!(prepared.built, "a new store had the rootfs already");
        let (_, baseline) = self.disks.get();
        self.disks
            .set((fs::metadata(&prepared.rootfs)?.len(), baseline));
        Ok(vec![total, pulled_at, total - pulled_at])
    }

    /// The bare work under `dir`: whole, transfer, gunzip + untar, mkfs.
    fn baseline(&self, dir: &Path) -> anyhow::Result<Vec<f64>> {
        fs::create_dir(dir)?;
        let start = Instant::now();
        let blobs = self.fetch_raw(dir)?;
        let fetched = start.elapsed().as_secs_f64();
        let tree = dir.join("tree");
        fs::create_dir(&tree)?;
        for blob in &blobs {
            untar(blob, &tree, self.owners)
                .with_context(|| format!("unpacking {}", blob.display()))?;
        }
        let extracted = start.elapsed().as_secs_f64();
        let disk = dir.join("rootfs.ext4");
        ext4::make_ext4(&tree, &disk, ext4::tree_size(&tree)?)?;
        let total = start.elapsed().as_secs_f64();
        let (cold, _) = self.disks.get();
        self.disks.set((cold, fs::metadata(&disk)?.len()));
        Ok(vec![total, fetched, extracted - fetched, total - extracted])
    }

    /// GETs the manifest, then the config, then the layers `parallel` at a
    /// time into files in `dir`; returns the layer files in manifest order.
    fn fetch_raw(&self, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
        let mut bytes = Vec::new();
        let path = format!("/v2/{REPOSITORY}/manifests/{TAG}");
        http_get(&self.host, &path, MEDIA_TYPE_MANIFEST, &mut bytes)?;
        let manifest: Manifest = serde_json::from_slice(&bytes)?;
        let host = self.host.as_str();
        let get_blob = |digest: &Digest, file: &Path| -> anyhow::Result<()> {
            let mut out = File::create(file)?;
            let path = format!("/v2/{REPOSITORY}/blobs/{digest}");
            http_get(host, &path, "*/*", &mut out)
        };
        get_blob(&manifest.config.digest, &dir.join("config.json"))?;
        let files: Vec<PathBuf> = (0..manifest.layers.len())
            .map(|i| dir.join(format!("layer{i}.tar.gz")))
            .collect();
        let next = AtomicUsize::new(0);
        let workers = self.options.parallel.min(files.len()).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(layer) = manifest.layers.get(i) else {
                            return anyhow::Ok(());
                        };
                        get_blob(&layer.digest, &files[i])?;
                    })
                })
                .collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().expect("a download thread panicked"))
        })?;
        Ok(files)
    }

    /// Pull, tag and prepare into the store that has everything: whole, pull + tag.
    fn cache_pull(&self) -> anyhow::Result<Vec<f64>> {
        let start = Instant::now();
        let store = ImageStore::open(&self.warm)?;
        let pulled = self.runtime.block_on(pull(
            &self.reference,
            store.blobs(),
            &self.options,
            &NoProgress,
        ))?;
        store.tag(&ImageRef::parse(&pulled.reference)?, &pulled.manifest)?;
        let pulled_at = start.elapsed().as_secs_f64();
        let prepared = store.prepare(&pulled.manifest, 0)?;
        let total = start.elapsed().as_secs_f64();
        anyhow::ensure!(!prepared.built, "the cached rootfs was built again");
        Ok(vec![total, pulled_at])
    }

    /// Open, lookup and prepare in the store that has everything.
    fn cache_lookup(&self) -> anyhow::Result<Vec<f64>> {
        let start = Instant::now();
        let store = ImageStore::open(&self.warm)?;
        let (_, manifest) = store.lookup(&self.reference)?;
        let prepared = store.prepare(&manifest, 0)?;
        let total = start.elapsed().as_secs_f64();
        anyhow::ensure!(!prepared.built, "the cached rootfs was built again");
        Ok(vec![total])
    }

    /// Parts timed alone, medians: sha256 of the layers, gunzip of the layers
    /// (both in memory), arrakis's unpack of the image into a tree.
    fn parts(&self, image: &BenchImage) -> anyhow::Result<[f64; 3]> {
        let store = ImageStore::open(&self.warm)?;
        let layout = OciLayout::open(store.blobs().layout())?;
        let (_, descriptor) = store.lookup(&self.reference)?;
        let (manifest, _) = layout.image(&descriptor)?;
        let options = UnpackOptions::for_current_user();
        let mut times = [Vec::new(), Vec::new(), Vec::new()];
        for run in 0..PART_RUNS {
            let start = Instant::now();
            for layer in &image.layers {
                std::hint::black_box(Digest::of(layer));
            }
            times[0].push(start.elapsed().as_secs_f64());

            let start = Instant::now();
            for layer in &image.layers {
                io::copy(
                    &mut flate2::read::GzDecoder::new(&layer[..]),
                    &mut io::sink(),
                )?;
            }
            times[1].push(start.elapsed().as_secs_f64());

            let tree = self.scratch.join(format!("unpack-{run}"));
            fs::create_dir(&tree)?;
            sync();
            let start = Instant::now();
            oci::unpack_image(&layout, &manifest, &tree, &options)?;
            times[2].push(start.elapsed().as_secs_f64());
            fs::remove_dir_all(&tree)?;
        }
        Ok(times.map(|mut t| median(&mut t)))
    }
}

/// Gunzips and untars `blob` into `tree`, keeping modes (and owners if asked).
fn untar(blob: &Path, tree: &Path, owners: bool) -> io::Result<()> {
    let file = BufReader::with_capacity(256 << 10, File::open(blob)?);
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(owners);
    archive.set_overwrite(true);
    archive.unpack(tree)
}

/// One HTTP/1.0 GET over a new connection, its body copied to `out`; fails
/// unless the status is 200 and the body as long as announced.
fn http_get(host: &str, path: &str, accept: &str, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(host)?;
    stream.write_all(
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nAccept: {accept}\r\n\r\n").as_bytes(),
    )?;
    let mut reader = BufReader::with_capacity(256 << 10, stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    anyhow::ensure!(status.contains(" 200 "), "GET {path}: {}", status.trim());
    let mut length = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<u64>().ok();
            }
        }
    }
    let copied = io::copy(&mut reader, out)?;
    anyhow::ensure!(
        length.is_none_or(|l| l == copied),
        "GET {path}: {copied} bytes of {length:?}"
    );
    Ok(())
}

/// Flushes dirty pages, so no variant pays for the writeback of another.
fn sync() {
    // SAFETY: sync(2) takes nothing and cannot fail.
    unsafe { libc::sync() };
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints the table: one line per variant and phase, then the parts timed alone.
fn report(
    bench: &Bench,
    image: &BenchImage,
    runs: usize,
    series: &[Vec<Vec<f64>>],
    parts: &[f64; 3],
) {
    let stats: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|phases| phases.iter().map(|samples| median_min(samples)).collect())
        .collect();
    let (cold, base, hit_pull, hit_lookup) = (&stats[0], &stats[1], &stats[2], &stats[3]);
    let compressed: usize = image.layers.iter().map(Vec::len).sum();
    println!(
        "image pull + convert: {} gzip layers, {:.1} MiB compressed, {:.1} MiB in {} files; \
         median (min) of {runs} rounds after {WARMUP_ROUNDS} untimed, variants interleaved",
        image.layers.len(),
        compressed as f64 / MIB,
        image.content_bytes as f64 / MIB,
        image.files,
    );
    let ratio = |a: (f64, f64), b: (f64, f64), of: &str| format!("{:.2}x {of}", a.0 / b.0);
    let share = |a: (f64, f64)| format!("{:.3}% of cold", a.0 / cold[0].0 * 100.0);
    let base_convert = (base[2].0 + base[3].0, base[2].1 + base[3].1);
    let getters = format!("  HTTP/1.0 GETs, {} at once", bench.options.parallel);
    let rows = [
        (
            "arrakis pull + convert, cold",
            cold[0],
            ratio(cold[0], base[0], "baseline"),
        ),
        (
            "  pull + tag",
            cold[1],
            ratio(cold[1], base[1], "baseline GETs"),
        ),
        (
            "  prepare",
            cold[2],
            ratio(cold[2], base_convert, "baseline untar + mkfs"),
        ),
        ("baseline GET + untar + mkfs", base[0], String::new()),
        (getters.as_str(), base[1], String::new()),
        ("  gunzip + untar (flate2, tar)", base[2], String::new()),
        ("  mkfs.ext4 -d", base[3], String::new()),
        (
            "cache hit: pull + tag + prepare",
            hit_pull[0],
            share(hit_pull[0]),
        ),
        ("  pull + tag", hit_pull[1], String::new()),
        (
            "cache hit: open + lookup + prepare",
            hit_lookup[0],
            share(hit_lookup[0]),
        ),
    ];
    for (label, (median, min), note) in rows {
        let line = format!("  {label:<36} {:>10} ({})  {note}", time(median), time(min));
        println!("{}", line.trim_end());
    }
    let per_second = |secs: f64| format!("{:.0} MiB/s", compressed as f64 / MIB / secs);
    let unpack = format!("{:.2}x baseline gunzip + untar", parts[2] / base[2].0);
    println!("parts alone, median of {PART_RUNS}");
    for (label, secs, note) in [
        (
            "sha256 of the layers, in memory",
            parts[0],
            per_second(parts[0]),
        ),
        (
            "gunzip of the layers, in memory",
            parts[1],
            per_second(parts[1]),
        ),
        ("arrakis unpack_image into a tree", parts[2], unpack),
    ] {
        println!("  {label:<36} {:>10}  {note}", time(secs));
    }
    let (cold_disk, base_disk) = bench.disks.get();
    println!(
        "  disk images (apparent size): arrakis {:.1} MiB, baseline {:.1} MiB",
        cold_disk as f64 / MIB,
        base_disk as f64 / MIB
    );
}

/// Seconds, or milliseconds below one second.
fn time(secs: f64) -> String {
    if secs >= 1.0 {
        format!("{secs:.3} s")
    } else {
        format!("{:.2} ms", secs * 1000.0)
    }
}

fn median_min(samples: &[f64]) -> (f64, f64) {
    let mut sorted = samples.to_vec();
    let median = median(&mut sorted);
    (median, sorted[0])
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The benchmark image: gzip layers, an OCI config and manifest.
struct BenchImage {
    layers: Vec<Vec<u8>>,
    config: Vec<u8>,
    manifest: Vec<u8>,
    /// Regular files and bytes in them, over all layers.
    files: usize,
    content_bytes: u64,
}

impl BenchImage {
    fn build() -> BenchImage {
        let mut rng = Rng(0x5eed_a11a_c0ff_ee00);
        let tars = [random_layer(&mut rng), text_layer(&mut rng), small_layer()];
        let files = tars.iter().map(|t| t.files).sum();
        let content_bytes = tars.iter().map(|t| t.bytes).sum();
        let diff_ids: Vec<String> = tars
            .iter()
            .map(|t| Digest::of(&t.tar).to_string())
            .collect();
        // gzip at its default level, as docker does, one thread per layer.
        let layers: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let handles: Vec<_> = tars.iter().map(|t| scope.spawn(|| gzip(&t.tar))).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("gzip thread panicked"))
                .collect()
        });
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/hello"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .expect("serialize the config");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_TYPE_MANIFEST,
            "config": descriptor(MEDIA_TYPE_CONFIG, &config),
            "layers": layers.iter().map(|l| descriptor(LAYER_MEDIA_TYPE, l)).collect::<Vec<_>>(),
        }))
        .expect("serialize the manifest");
        BenchImage {
            layers,
            config,
            manifest,
            files,
            content_bytes,
        }
    }

    /// Pushes the blobs and the manifest under `reference`.
    async fn push(&self, reference: &str) -> anyhow::Result<()> {
        let reference: oci_client::Reference = reference.parse()?;
        let client = oci_client::Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            use_monolithic_push: true,
            ..ClientConfig::default()
        });
        for blob in self.layers.iter().chain([&self.config]) {
            client
                .push_blob(&reference, blob, &Digest::of(blob).to_string())
                .await?;
        }
        client
            .push_manifest_raw(
                &reference,
                self.manifest.clone(),
                MEDIA_TYPE_MANIFEST.parse()?,
            )
            .await?;
        Ok(())
    }
}

fn descriptor(media_type: &str, blob: &[u8]) -> serde_json::Value {
    json!({"mediaType": media_type, "digest": Digest::of(blob).to_string(), "size": blob.len()})
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// Incompressible files: what binaries and compressed assets look like to gzip.
fn random_layer(rng: &mut Rng) -> Layer {
    let mut tar = Tar::new();
    tar.dir("opt");
    tar.dir("opt/data");
    for i in 0..RANDOM_FILES {
        let content: Vec<u8> = (0..RANDOM_FILE_BYTES / 8)
            .flat_map(|_| rng.next().to_le_bytes())
            .collect();
        tar.file(&format!("opt/data/blob{i}.bin"), 0o644, &content);
    }
    tar.finish()
}

/// Many small text files: what documentation and scripts look like.
fn text_layer(rng: &mut Rng) -> Layer {
    let mut tar = Tar::new();
    tar.dir("usr");
    tar.dir("usr/share");
    tar.dir("usr/share/doc");
    for d in 0..TEXT_DIRS {
        let dir = format!("usr/share/doc/pkg{d}");
        tar.dir(&dir);
        for f in 0..TEXT_FILES_PER_DIR {
            let len = TEXT_FILE_BYTES / 2 + rng.below(TEXT_FILE_BYTES as u64) as usize;
            let mut text = String::with_capacity(len + 16);
            while text.len() < len {
                text.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
                text.push(if rng.below(12) == 0 { '\n' } else { ' ' });
            }
            tar.file(&format!("{dir}/file{f}.txt"), 0o644, text.as_bytes());
        }
    }
    tar.finish()
}

/// A few small files, one of them replacing a file of the layer below.
fn small_layer() -> Layer {
    let mut tar = Tar::new();
    tar.dir("bin");
    tar.file("bin/hello", 0o755, b"#!/bin/sh\necho hello\n");
    tar.dir("etc");
    tar.file("etc/hostname", 0o644, b"sandbox\n");
    tar.dir("usr");
    tar.dir("usr/share");
    tar.dir("usr/share/doc");
    tar.dir("usr/share/doc/pkg0");
    tar.file("usr/share/doc/pkg0/file0.txt", 0o644, b"replaced\n");
    tar.finish()
}

/// A layer's tar being built, with counts of its regular files.
struct Tar {
    builder: tar::Builder<Vec<u8>>,
    files: usize,
    bytes: u64,
}

/// A layer's finished tar and what is in it.
struct Layer {
    tar: Vec<u8>,
    files: usize,
    bytes: u64,
}

impl Tar {
    fn new() -> Tar {
        Tar {
            builder: tar::Builder::new(Vec::new()),
            files: 0,
            bytes: 0,
        }
    }

    fn dir(&mut self, path: &str) {
        self.append(path, tar::EntryType::Directory, 0o755, b"");
    }

    fn file(&mut self, path: &str, mode: u32, content: &[u8]) {
        self.append(path, tar::EntryType::Regular, mode, content);
        self.files += 1;
        self.bytes += content.len() as u64;
    }

    fn append(&mut self, path: &str, kind: tar::EntryType, mode: u32, content: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header.set_size(content.len() as u64);
        self.builder
            .append_data(&mut header, path, content)
            .expect("tar into memory");
    }

    fn finish(self) -> Layer {
        Layer {
            tar: self.builder.into_inner().expect("tar into memory"),
            files: self.files,
            bytes: self.bytes,
        }
    }
}

/// xorshift64*: a fixed, fast sequence (not for anything but test data).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}
