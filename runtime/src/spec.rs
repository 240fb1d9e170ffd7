//! What a caller asks for when creating a sandbox, and its validation into
//! concrete resources. Pure: the only file system look-up (does the image
//! exist) is done by the caller with the path computed here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{RuntimeConfig, MIN_MEMORY_MB};

/// Longest sandbox name accepted.
pub const MAX_NAME_LEN: usize = 63;

/// A request to create a sandbox. Absent fields take the configured defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    pub name: String,
    #[serde(default)]
    pub vcpus: Option<u32>,
    #[serde(default)]
    pub memory_mb: Option<u32>,
    #[serde(default)]
    pub image: Option<String>,
}

impl SandboxSpec {
    pub fn named(name: &str) -> Self {
        SandboxSpec {
            name: name.to_string(),
            ..SandboxSpec::default()
        }
    }
}

/// A validated spec with every default filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedSpec {
    pub name: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub image: String,
    /// `<images_dir>/<image>/rootfs.ext4`, before symlinks are resolved.
    pub image_path: PathBuf,
}

/// A field that failed validation, with the accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct SpecError {
    pub field: &'static str,
    pub message: String,
}

pub fn resolve(spec: &SandboxSpec, config: &RuntimeConfig) -> Result<ResolvedSpec, SpecError> {
    validate_name(&spec.name).map_err(|message| SpecError {
        field: "name",
        message,
    })?;
    let vcpus = spec.vcpus.unwrap_or(config.default_vcpus);
    if !(1..=config.max_vcpus).contains(&vcpus) {
        return Err(SpecError {
            field: "vcpus",
            message: format!("{vcpus} is out of range: accepted 1..={}", config.max_vcpus),
        });
    }
    let memory_mb = spec.memory_mb.unwrap_or(config.default_memory_mb);
    if !(MIN_MEMORY_MB..=config.max_memory_mb).contains(&memory_mb) {
        return Err(SpecError {
            field: "memory_mb",
            message: format!(
                "{memory_mb} MiB is out of range: accepted {MIN_MEMORY_MB}..={} MiB",
                config.max_memory_mb
            ),
        });
    }
    let image = spec
        .image
        .clone()
        .unwrap_or_else(|| config.default_image.clone());
    validate_image_name(&image).map_err(|message| SpecError {
        field: "image",
        message,
    })?;
    let image_path = image_path(&config.images_dir, &image);
    Ok(ResolvedSpec {
        name: spec.name.clone(),
        vcpus,
        memory_mb,
        image,
        image_path,
    })
}

pub fn image_path(images_dir: &Path, image: &str) -> PathBuf {
    images_dir.join(image).join("rootfs.ext4")
}

/// 1 to 63 characters: an ASCII letter or digit, then letters, digits, `_`, `.`, `-`.
pub fn validate_name(name: &str) -> Result<(), String> {
    const FORM: &str =
        "1 to 63 characters: a letter or digit, then letters, digits, '_', '.' or '-'";
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(format!("the name is empty; accepted: {FORM}"));
    };
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the name is {} bytes long; accepted: {FORM}",
            name.len()
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "{name:?} must start with a letter or digit; accepted: {FORM}"
        ));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("{name:?} contains {bad:?}; accepted: {FORM}"));
    }
    Ok(())
}

/// The guest hostname for a sandbox name: letters, digits, `-` and `.`
/// (what the guest accepts); anything else becomes `-`, and a name that
/// leaves nothing usable becomes `sandbox`.
pub fn hostname_for(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    let trimmed = mapped.trim_start_matches(['-', '.']);
    if trimmed.is_empty() {
        "sandbox".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Image names follow the sandbox-name rules: they are one path component.
pub fn validate_image_name(image: &str) -> Result<(), String> {
    validate_name(image).map_err(|why| why.replace("the name", "the image name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RuntimeConfig {
        RuntimeConfig::with_home(Path::new("/h"))
    }

    #[test]
    fn names() {
        for good in ["a", "A1", "web-1", "x.y_z", "0", &"a".repeat(63)] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            ".a",
            "_a",
            "a b",
            "a/b",
            "ä",
            "a\0",
            "..",
            &"a".repeat(64),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(err.contains("accepted"), "{bad}: {err}");
        }
    }

    #[test]
    fn hostnames_keep_what_the_guest_accepts() {
        assert_eq!(hostname_for("web-1.prod"), "web-1.prod");
        assert_eq!(hostname_for("my_box"), "my-box");
        assert_eq!(hostname_for("Ünï cødé"), "n--c-d-");
        assert_eq!(hostname_for("___"), "sandbox");
        assert_eq!(hostname_for(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn defaults_fill_in() {
        let resolved = resolve(&SandboxSpec::named("box"), &config()).unwrap();
        assert_eq!(
            resolved,
            ResolvedSpec {
                name: "box".into(),
                vcpus: 1,
                memory_mb: 256,
                image: "default".into(),
                image_path: PathBuf::from("/h/images/default/rootfs.ext4"),
            }
        );
    }

    #[test]
    fn out_of_range_names_field_and_range() {
        let cases = [
            (
                SandboxSpec {
                    vcpus: Some(0),
                    ..SandboxSpec::named("a")
                },
                "vcpus",
                "1..=16",
            ),
            (
                SandboxSpec {
                    vcpus: Some(10_000),
                    ..SandboxSpec::named("a")
                },
                "vcpus",
                "1..=16",
            ),
            (
                SandboxSpec {
                    memory_mb: Some(1),
                    ..SandboxSpec::named("a")
                },
                "memory_mb",
                "64..=16384",
            ),
            (
                SandboxSpec {
                    memory_mb: Some(u32::MAX),
                    ..SandboxSpec::named("a")
                },
                "memory_mb",
                "64..=16384",
            ),
            (
                SandboxSpec {
                    image: Some("../x".into()),
                    ..SandboxSpec::named("a")
                },
                "image",
                "accepted",
            ),
            (SandboxSpec::named("no spaces"), "name", "accepted"),
        ];
        for (spec, field, hint) in cases {
            let err = resolve(&spec, &config()).unwrap_err();
            assert_eq!(err.field, field, "{spec:?}");
            assert!(err.message.contains(hint), "{err}");
        }
    }

    #[test]
    fn spec_parsing_is_strict() {
        let spec: SandboxSpec = serde_json::from_str(r#"{"name":"a","memory_mb":512}"#).unwrap();
        assert_eq!(spec.memory_mb, Some(512));
        assert!(serde_json::from_str::<SandboxSpec>(r#"{"name":"a","cpus":2}"#).is_err());
    }
}
