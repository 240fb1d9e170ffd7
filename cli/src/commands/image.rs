//! image: the store of OCI images sandboxes boot from (pull, import, build, export, ls, rm, gc).

use anyhow::{bail, Context};
use std::collections::BTreeMap;

use arrakis_runtime::{BuildProgress, BuildRequest, ImportedImage, Manager};
use serde::Serialize;

use crate::backend::Backend;
use crate::cli::{BuildArgs, ImageVerb};
use crate::output::{self, Table};

mod progress;

pub async fn run(backend: &Backend, verb: ImageVerb, json: bool) -> anyhow::Result<u8> {
    let Backend::Local(manager) = backend else {
        bail!(
            "`arrakis image` manages this machine's image store and has no API yet: run it \
             without --server on the server's machine (same ARRAKIS_HOME)"
        );
    };
    match verb {
        ImageVerb::Pull(args) => {
            let image = progress::pull(manager, args).await?;
            imported(&[image], json)?;
        }
        ImageVerb::Import { path, tag, rootfs } => {
            let manager = manager.clone();
            let images = tokio::task::spawn_blocking(move || {
                manager.import_image(&path, tag.as_deref(), rootfs)
            })
            .await
            .context("the import task failed")??;
            imported(&images, json)?;
        }
        ImageVerb::Build(args) => {
            let image = build(manager, args).await?;
            imported(&[image], json)?;
        }
        ImageVerb::Export { image, path } => {
            let (manager, dest) = (manager.clone(), path.clone());
            let exported = tokio::task::spawn_blocking(move || manager.export_image(&image, &dest))
                .await
                .context("the export task failed")??;
            let skipped = exported.flattened.map_or(0, |f| f.sockets_skipped);
            if skipped > 0 {
                eprintln!("warning: {skipped} unix sockets left out (a tar cannot hold them)");
            }
            let (reference, digest) = (exported.reference.familiar(), &exported.manifest.digest);
            if json {
                output::json(&serde_json::json!({
                    "reference": reference,
                    "digest": digest.to_string(),
                    "path": path,
                }))?;
            } else {
                output::print(&format!(
                    "exported {reference} ({}) to {}\n",
                    short_id(digest.hex()),
                    path.display()
                ))?;
            }
        }
        ImageVerb::Ls => list(manager, json)?,
        ImageVerb::Rm { images, force } => {
            for wanted in images {
                let removed = manager.remove_image(&wanted, force).await?;
                if !json {
                    output::print(&format!("removed {}\n", removed.familiar()))?;
                }
            }
        }
        ImageVerb::Gc { build_cache } => {
            let report = manager.gc_images(build_cache).await?;
            let summary = GcSummary {
                images_removed: report.rootfs_removed.len(),
                build_steps_removed: report.build_steps_removed,
                blobs_removed: report.blobs_removed,
                bytes_freed: report.bytes_freed,
            };
            if json {
                output::json(&summary)?;
            } else {
                output::print(&format!(
                    "removed {} images, {} blobs and {} cached build steps, freed {}\n",
                    summary.images_removed,
                    summary.blobs_removed,
                    summary.build_steps_removed,
                    human_bytes(summary.bytes_freed)
                ))?;
            }
        }
    }
    Ok(0)
}

async fn build(manager: &Manager, args: BuildArgs) -> anyhow::Result<ImportedImage> {
    let file = args
        .file
        .clone()
        .unwrap_or_else(|| args.context.join("Dockerfile"));
    let dockerfile = std::fs::read_to_string(&file)
        .with_context(|| format!("reading the Dockerfile {}", file.display()))?;
    let mut build_args = BTreeMap::new();
    for pair in &args.build_args {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("--build-arg {pair:?}: expected KEY=VALUE"))?;
        build_args.insert(key.to_owned(), value.to_owned());
    }
    let request = BuildRequest {
        dockerfile,
        context: args.context,
        tag: args.tag,
        build_args,
        no_cache: args.no_cache,
    };
    Ok(manager.build_image(request, &StepPrinter).await?)
}

/// Steps and RUN output on stderr, so stdout carries only the result.
struct StepPrinter;

impl BuildProgress for StepPrinter {
    fn step(&self, number: usize, total: usize, text: &str, cached: bool) {
        let note = if cached { " (cached)" } else { "" };
        eprintln!("STEP {number}/{total}: {text}{note}");
    }

    fn output(&self, data: &[u8]) {
        use std::io::Write;
        let _ = std::io::stderr().write_all(data);
    }

    fn warning(&self, message: &str) {
        eprintln!("warning: {message}");
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GcSummary {
    images_removed: usize,
    build_steps_removed: usize,
    blobs_removed: usize,
    bytes_freed: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ImageRow {
    reference: String,
    id: String,
    digest: String,
    disk_bytes: Option<u64>,
}

fn imported(images: &[ImportedImage], json: bool) -> anyhow::Result<()> {
    if json {
        let rows: Vec<ImageRow> = images
            .iter()
            .flat_map(|image| {
                image.references.iter().map(|r| ImageRow {
                    reference: r.familiar().to_owned(),
                    id: short_id(image.digest.hex()),
                    digest: image.digest.to_string(),
                    disk_bytes: None,
                })
            })
            .collect();
        return output::json(&rows);
    }
    for image in images {
        for reference in &image.references {
            output::print(&format!(
                "{} ({})\n",
                reference.familiar(),
                short_id(image.digest.hex())
            ))?;
        }
    }
    Ok(())
}

fn list(manager: &Manager, json: bool) -> anyhow::Result<()> {
    let images = manager.list_images()?;
    let rows: Vec<ImageRow> = images
        .iter()
        .map(|image| ImageRow {
            reference: image.reference.familiar().to_owned(),
            id: short_id(image.digest.hex()),
            digest: image.digest.to_string(),
            disk_bytes: image.disk_bytes,
        })
        .collect();
    if json {
        return output::json(&rows);
    }
    let mut table = Table::new(&["REFERENCE", "ID", ">DISK"]);
    for row in rows {
        let disk = row.disk_bytes.map_or("-".to_owned(), human_bytes);
        table.row(vec![row.reference, row.id, disk]);
    }
    output::print(&table.render())
}

/// The first 12 hex digits of a digest, as Docker shows image ids.
fn short_id(hex: &str) -> String {
    hex[..12.min(hex.len())].to_owned()
}

/// `1.5 GiB`, `320 MiB`, `12 KiB`, `100 B`.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(100), "100 B");
        assert_eq!(human_bytes(12 * 1024), "12 KiB");
        assert_eq!(human_bytes(1536 * 1024 * 1024), "1.5 GiB");
        assert_eq!(human_bytes(320 << 20), "320 MiB");
    }
}
