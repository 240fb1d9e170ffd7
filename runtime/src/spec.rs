//! What a caller asks for when creating a sandbox, and its validation into
//! concrete resources. Pure: the only file system look-up (does the image
//! exist) is done by the caller with the path computed here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{RuntimeConfig, MIN_MEMORY_MB};
use crate::network::{DefaultForward, EgressPolicy, ForwardRequest};

/// Longest sandbox name accepted.
pub const MAX_NAME_LEN: usize = 63;

/// Most environment variables a sandbox may carry.
pub const MAX_ENV_ENTRIES: usize = 256;

/// Longest snapshot id accepted, in characters.
pub const MAX_SNAPSHOT_ID_LEN: usize = 128;

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
    /// Environment of every command run in the sandbox (front ends merge it
    /// into each exec; the runtime stores it and carries it into snapshots
    /// and restores). Validated by [`validate_env`].
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Boot even if a golden snapshot could warm-start it.
    #[serde(default)]
    pub cold_boot: bool,
    /// Where the sandbox may connect to; `None`: the configured default.
    #[serde(default)]
    pub egress: Option<EgressPolicy>,
    /// Forwards on top of the configured default ones.
    #[serde(default)]
    pub forwards: Vec<ForwardRequest>,
    /// Attach the NIC to this network namespace (netns mode, see
    /// [`crate::network::netns`]) instead of arrakis's own network; then
    /// `egress` and `forwards` must be unset. Never read from a request
    /// body: only programs linking the runtime (the containerd shim) set it.
    #[serde(skip)]
    pub netns: Option<std::path::PathBuf>,
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
    /// `<images_dir>/<image>/rootfs.ext4`, before symlinks are resolved. When no such file
    /// exists the image is looked up in the image store instead.
    pub image_path: PathBuf,
    pub env: BTreeMap<String, String>,
    pub egress: EgressPolicy,
    /// The configured default forwards, then the requested ones.
    pub forwards: Vec<ForwardRequest>,
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
    if let Err(message) = validate_image_name(&image) {
        // Not a local image name: it must be a reference to an image in the store.
        if let Err(err) = arrakis_image::store::ImageRef::parse(&image) {
            return Err(SpecError {
                field: "image",
                message: format!("{message}; nor is it an image reference: {err}"),
            });
        }
    }
    let image_path = image_path(&config.images_dir, &image);
    validate_env(&spec.env).map_err(|message| SpecError {
        field: "env",
        message,
    })?;
    let egress = spec
        .egress
        .clone()
        .unwrap_or_else(|| config.network.egress.clone());
    egress.validate().map_err(|message| SpecError {
        field: "egress",
        message,
    })?;
    let mut forwards: Vec<ForwardRequest> = config
        .network
        .forwards
        .iter()
        .flat_map(DefaultForward::expand)
        .map(|(guest_port, description)| ForwardRequest {
            host_port: None,
            guest_port,
            description,
        })
        .collect();
    forwards.extend(spec.forwards.iter().cloned());
    ForwardRequest::validate_all(&mut forwards).map_err(|message| SpecError {
        field: "portForwards",
        message,
    })?;
    Ok(ResolvedSpec {
        egress,
        forwards,
        name: spec.name.clone(),
        vcpus,
        memory_mb,
        image,
        image_path,
        env: spec.env.clone(),
    })
}

/// At most [`MAX_ENV_ENTRIES`] variables; names non-empty without `=` or
/// NUL, values without NUL (what `execve` can carry).
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV_ENTRIES {
        return Err(format!(
            "{} variables; accepted: at most {MAX_ENV_ENTRIES}",
            env.len()
        ));
    }
    for (key, value) in env {
        if key.is_empty() {
            return Err("a variable name is empty".to_string());
        }
        if key.contains(['=', '\0']) {
            return Err(format!(
                "the variable name {key:?} contains '=' or NUL; accepted: no '=' and no NUL"
            ));
        }
        if value.contains('\0') {
            return Err(format!("the value of {key:?} contains NUL"));
        }
    }
    Ok(())
}

/// 1 to 128 characters (not bytes) of free text: no control characters,
/// no `/`, and not only whitespace, like sandbox names (front ends build
/// ids such as `snapshot-my box-20261124-101500`). An id is never a path
/// component: snapshot directories are named by an internal id.
pub fn validate_snapshot_id(id: &str) -> Result<(), String> {
    validate_label("snapshot id", id, MAX_SNAPSHOT_ID_LEN)
}

pub fn image_path(images_dir: &Path, image: &str) -> PathBuf {
    images_dir.join(image).join("rootfs.ext4")
}

/// 1 to 63 characters (not bytes) of free text: no control characters, no
/// `/`, and not only whitespace. A name is never a path component or a
/// kernel argument: the sandbox directory is named by id, and the guest
/// hostname is derived by [`hostname_for`].
pub fn validate_name(name: &str) -> Result<(), String> {
    validate_label("name", name, MAX_NAME_LEN)
}

/// Free text naming something (a sandbox, a snapshot): 1 to `max`
/// characters, no control characters, not only whitespace, and none of
/// `/ ? # %`, which would end or garble it in a URL path (clients such as
/// py-arrakis do not escape them).
fn validate_label(what: &str, value: &str, max: usize) -> Result<(), String> {
    let form = format!(
        "1 to {max} characters, no control characters, none of / ? # %, not only whitespace"
    );
    let len = value.chars().count();
    if len == 0 {
        return Err(format!("the {what} is empty; accepted: {form}"));
    }
    if len > max {
        return Err(format!(
            "the {what} is {len} characters long; accepted: {form}"
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| c.is_control() || matches!(c, '/' | '?' | '#' | '%'))
    {
        return Err(format!("{value:?} contains {bad:?}; accepted: {form}"));
    }
    if value.chars().all(char::is_whitespace) {
        return Err(format!("the {what} is only whitespace; accepted: {form}"));
    }
    Ok(())
}

/// The guest hostname for a sandbox name: lowercase ASCII letters, digits,
/// `-` and `.` (a valid hostname, and safe on the kernel command line);
/// anything else becomes `-`, and a name that leaves nothing usable becomes
/// `sandbox`.
pub fn hostname_for(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    let trimmed = mapped.trim_matches(['-', '.']);
    if trimmed.is_empty() {
        "sandbox".to_string()
    } else {
        trimmed.to_string()
    }
}

/// 1 to 63 characters: an ASCII letter or digit, then letters, digits, `_`,
/// `.`, `-`. Image names are one path component, so they stay strict.
pub fn validate_image_name(image: &str) -> Result<(), String> {
    const FORM: &str =
        "1 to 63 characters: a letter or digit, then letters, digits, '_', '.' or '-'";
    let mut chars = image.chars();
    let Some(first) = chars.next() else {
        return Err(format!("the image name is empty; accepted: {FORM}"));
    };
    if image.len() > MAX_NAME_LEN {
        return Err(format!(
            "the image name is {} bytes long; accepted: {FORM}",
            image.len()
        ));
    }
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "{image:?} must start with a letter or digit; accepted: {FORM}"
        ));
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("{image:?} contains {bad:?}; accepted: {FORM}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RuntimeConfig {
        RuntimeConfig::with_home(Path::new("/h"))
    }

    #[test]
    fn names() {
        for good in [
            "a",
            "A1",
            "web-1",
            "x.y_z",
            "0",
            "-a",
            "my sb",
            "Ünï cødé",
            "名前",
            " padded ",
            &"a".repeat(63),
            &"é".repeat(63),
        ] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            " ",
            "\u{3000}\t",
            "a/b",
            "q?x#y",
            "50%",
            "..//",
            "a\0",
            "a\nb",
            "a\u{7f}",
            &"a".repeat(64),
            &"é".repeat(64),
        ] {
            let err = validate_name(bad).unwrap_err();
            assert!(err.contains("accepted"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn image_names_stay_one_path_component() {
        for good in ["default", "x.y_z", "a-1"] {
            assert_eq!(validate_image_name(good), Ok(()), "{good}");
        }
        for bad in ["", "..", "-a", "a b", "a/b", "ä", &"a".repeat(64)] {
            let err = validate_image_name(bad).unwrap_err();
            assert!(
                err.contains("the image name") || err.contains("accepted"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn hostnames_never_carry_kernel_arguments() {
        for name in [
            "a init=/bin/sh",
            "x\" quiet",
            "a=b c=d",
            "tab\there",
            " arrakis.hostname=evil",
        ] {
            let host = hostname_for(name);
            assert!(
                !host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')),
                "{name:?} -> {host:?}"
            );
        }
        assert_eq!(hostname_for("a init=/bin/sh"), "a-init--bin-sh");
    }

    #[test]
    fn hostnames_keep_what_the_guest_accepts() {
        assert_eq!(hostname_for("web-1.prod"), "web-1.prod");
        assert_eq!(hostname_for("my_box"), "my-box");
        assert_eq!(hostname_for("Ünï cødé"), "n--c-d");
        assert_eq!(hostname_for("My Box"), "my-box");
        assert_eq!(hostname_for("___"), "sandbox");
        assert_eq!(hostname_for(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn defaults_fill_in() {
        let resolved = resolve(&SandboxSpec::named("box"), &config()).unwrap();
        // The configured forwards: 5901 (gui) and 5736-5740 (code).
        assert_eq!(resolved.forwards.len(), 6);
        assert_eq!(resolved.forwards[0].guest_port, 5901);
        assert_eq!(resolved.forwards[0].description, "gui");
        assert_eq!(
            resolved,
            ResolvedSpec {
                egress: EgressPolicy::AllowAll,
                forwards: resolved.forwards.clone(),
                name: "box".into(),
                vcpus: 1,
                memory_mb: 256,
                image: "default".into(),
                image_path: PathBuf::from("/h/images/default/rootfs.ext4"),
                env: BTreeMap::new(),
            }
        );
    }

    #[test]
    fn forwards_are_checked_and_follow_the_defaults() {
        let mut spec = SandboxSpec::named("box");
        spec.forwards = vec![ForwardRequest {
            host_port: Some(0),
            guest_port: 8080,
            description: "web".into(),
        }];
        let resolved = resolve(&spec, &config()).unwrap();
        let last = resolved.forwards.last().unwrap();
        assert_eq!((last.host_port, last.guest_port), (None, 8080));
        spec.forwards[0].guest_port = 0;
        let err = resolve(&spec, &config()).unwrap_err();
        assert_eq!(err.field, "portForwards");
        assert!(err.message.contains("guestPort"), "{err}");
        spec.forwards = vec![
            ForwardRequest {
                host_port: Some(9000),
                guest_port: 1,
                description: String::new(),
            };
            2
        ];
        let err = resolve(&spec, &config()).unwrap_err();
        assert!(err.message.contains("9000"), "{err}");
    }

    #[test]
    fn env_is_checked() {
        let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        for good in [
            env(&[]),
            env(&[("PATH", "/bin"), ("EMPTY", ""), ("ünï", "cødé = ok")]),
        ] {
            assert_eq!(validate_env(&good), Ok(()), "{good:?}");
        }
        for (bad, hint) in [
            (env(&[("", "x")]), "empty"),
            (env(&[("A=B", "x")]), "'='"),
            (env(&[("A\0", "x")]), "NUL"),
            (env(&[("A", "x\0y")]), "NUL"),
        ] {
            let err = validate_env(&bad).unwrap_err();
            assert!(err.contains(hint), "{bad:?}: {err}");
        }
        let many: BTreeMap<String, String> = (0..=MAX_ENV_ENTRIES)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        assert!(validate_env(&many).unwrap_err().contains("at most 256"));
        let spec = SandboxSpec {
            env: env(&[("A=B", "x")]),
            ..SandboxSpec::named("a")
        };
        assert_eq!(resolve(&spec, &config()).unwrap_err().field, "env");
        let parsed: SandboxSpec = serde_json::from_str(r#"{"name":"a","env":{"K":"v"}}"#).unwrap();
        assert_eq!(parsed.env, env(&[("K", "v")]));
    }

    #[test]
    fn snapshot_ids() {
        for good in [
            "s",
            "snap-1",
            "snapshot-my box-20261124-101500",
            "名前.v2",
            " spaced ",
            &"é".repeat(128),
        ] {
            assert_eq!(validate_snapshot_id(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "  ",
            "a/b",
            "..",
            "/",
            "a\nb",
            "tab\t",
            "nul\0",
            &"x".repeat(129),
        ] {
            // ".." is fine as text: an id never names a path.
            if bad == ".." {
                assert_eq!(validate_snapshot_id(bad), Ok(()));
                continue;
            }
            let err = validate_snapshot_id(bad).unwrap_err();
            assert!(err.contains("accepted"), "{bad:?}: {err}");
        }
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
            (SandboxSpec::named("no/slash"), "name", "accepted"),
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
