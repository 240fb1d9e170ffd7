//! `image pull`: credentials, and the download drawn as one bar per layer on a terminal
//! (a line per finished layer otherwise).

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::sync::Mutex;

use anyhow::Context;
use arrakis_image::oci::{Descriptor, Digest};
use arrakis_image::registry::{self, Credentials, PullOptions, PullProgress};
use arrakis_runtime::{ImportedImage, Manager};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::PullArgs;

/// Environment variable read for the password when stdin is a terminal.
const PASSWORD_ENV: &str = "ARRAKIS_REGISTRY_PASSWORD";

pub async fn pull(manager: &Manager, args: PullArgs) -> anyhow::Result<ImportedImage> {
    let credentials = credentials(&args)?;
    let options = PullOptions {
        insecure: args.insecure,
        credentials,
        parallel: usize::from(args.parallel),
    };
    let progress = Bars::new(std::io::stderr().is_terminal());
    let image = manager
        .pull_image(&args.reference, &options, &progress)
        .await?;
    progress.finish();
    Ok(image)
}

fn credentials(args: &PullArgs) -> anyhow::Result<Credentials> {
    let Some(username) = args.user.clone() else {
        let registry = registry_of(&args.reference);
        return Ok(registry::docker_config_credentials(&registry).unwrap_or_default());
    };
    let password = match std::env::var(PASSWORD_ENV) {
        Ok(password) if !password.is_empty() => password,
        _ if std::io::stdin().is_terminal() => {
            anyhow::bail!("--user needs a password: pipe it to stdin or set {PASSWORD_ENV}")
        }
        _ => {
            let mut password = String::new();
            std::io::stdin()
                .read_to_string(&mut password)
                .context("reading the password from stdin")?;
            password.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    Ok(Credentials::Basic { username, password })
}

/// The registry part of a reference, as `docker login` keys it (Docker Hub's is
/// `https://index.docker.io/v1/`, which the config reader also accepts for docker.io).
fn registry_of(reference: &str) -> String {
    match arrakis_image::store::ImageRef::parse(reference) {
        Ok(parsed) => parsed
            .as_str()
            .split_once('/')
            .map_or("docker.io", |(registry, _)| registry)
            .to_owned(),
        Err(_) => "docker.io".to_owned(),
    }
}

struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
    terminal: bool,
}

impl Bars {
    fn new(terminal: bool) -> Bars {
        let target = if terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
            bars: Mutex::new(HashMap::new()),
            terminal,
        }
    }

    fn finish(&self) {
        let _ = self.multi.clear();
    }
}

fn short(digest: &Digest) -> &str {
    &digest.hex()[..12]
}

impl PullProgress for Bars {
    fn resolved(&self, reference: &str, manifest: &Digest, layers: &[Descriptor]) {
        let total: u64 = layers.iter().map(|l| l.size).sum();
        eprintln!(
            "pulling {reference} ({}): {} layers, {}",
            short(manifest),
            layers.len(),
            super::human_bytes(total)
        );
        if !self.terminal {
            return;
        }
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
        )
        .expect("a valid template")
        .progress_chars("=> ");
        let mut bars = self.bars.lock().expect("progress lock");
        for layer in layers {
            let bar = self.multi.add(ProgressBar::new(layer.size));
            bar.set_style(style.clone());
            bar.set_prefix(short(&layer.digest).to_owned());
            bars.insert(layer.digest.clone(), bar);
        }
    }

    fn layer_progress(&self, digest: &Digest, done: u64, _total: u64) {
        if let Some(bar) = self.bars.lock().expect("progress lock").get(digest) {
            bar.set_position(done);
        }
    }

    fn layer_done(&self, digest: &Digest, cached: bool) {
        let how = if cached { "already present" } else { "done" };
        match self.bars.lock().expect("progress lock").get(digest) {
            Some(bar) => bar.finish_with_message(how),
            None => eprintln!("layer {}: {how}", short(digest)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_are_read_off_references() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("localhost:5000/app:1"), "localhost:5000");
        assert_eq!(registry_of("ghcr.io/o/r"), "ghcr.io");
    }
}
