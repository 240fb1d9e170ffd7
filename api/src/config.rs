//! The server's configuration file (TOML): a `[server]` section for how the
//! API is exposed and a `[runtime]` section with the runtime's own keys
//! (see `arrakis_runtime::RuntimeConfig`). Keys are strict: an unknown key
//! is an error naming it.
//!
//! Precedence, lowest first: built-in defaults, `ARRAKIS_*` environment
//! variables, the file, command-line flags.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:7000"
//! token_file = "/etc/arrakis/token"   # or the ARRAKIS_API_TOKEN variable
//! allow_unauthenticated = false       # needed to bind off loopback without a token
//!
//! [runtime]
//! state_dir = "/var/lib/arrakis"
//! max_sandboxes = 20
//! default_memory_mb = 512
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use arrakis_runtime::RuntimeConfig;
use serde::Deserialize;

/// The default listen address, as the original server's port.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7000";

/// Shortest API token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// The `[server]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    pub listen: SocketAddr,
    /// A file whose first line is the API token.
    pub token_file: Option<PathBuf>,
    /// Serve a non-loopback address without a token.
    pub allow_unauthenticated: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: DEFAULT_LISTEN.parse().expect("a valid default address"),
            token_file: None,
            allow_unauthenticated: false,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLayout {
    #[serde(default)]
    server: ServerSection,
    /// Kept as a table and laid over the environment's runtime config.
    #[serde(default)]
    runtime: Option<toml::Table>,
}

/// Everything `arrakis serve` runs with, once flags are applied.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub server: ServerSection,
    pub runtime: RuntimeConfig,
}

impl ServerConfig {
    /// `base` (defaults and environment) with the file at `path`, if any,
    /// laid over it.
    pub fn load(path: Option<&Path>, base: RuntimeConfig) -> Result<ServerConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(ServerConfig {
                server: ServerSection::default(),
                runtime: base,
            });
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ServerConfig::parse(&text, base).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    fn parse(text: &str, base: RuntimeConfig) -> Result<ServerConfig, String> {
        let file: FileLayout = toml::from_str(text).map_err(|e| e.to_string())?;
        let runtime = match file.runtime {
            None => base,
            Some(overrides) => {
                let mut table = toml::Table::try_from(&base).map_err(|e| e.to_string())?;
                merge(&mut table, overrides);
                toml::Value::Table(table)
                    .try_into()
                    .map_err(|e: toml::de::Error| format!("[runtime]: {}", e.message()))?
            }
        };
        Ok(ServerConfig {
            server: file.server,
            runtime,
        })
    }
}

/// Lays `overrides` over `base`: tables merge key by key (so
/// `[runtime.network] egress = "deny"` keeps the other network settings),
/// anything else replaces.
fn merge(base: &mut toml::Table, overrides: toml::Table) {
    for (key, value) in overrides {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(over)) => merge(inner, over),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The API token from `token_file`, else the environment variable
/// `ARRAKIS_API_TOKEN`; checked for length, never logged.
pub fn read_token(
    token_file: Option<&Path>,
    env: Option<String>,
) -> Result<Option<String>, ConfigError> {
    let token = match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            Some(text.lines().next().unwrap_or("").trim().to_string())
        }
        None => env.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()),
    };
    if let Some(token) = &token {
        if token.len() < MIN_TOKEN_LEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::Invalid(format!(
                "the API token must be at least {MIN_TOKEN_LEN} printable ASCII characters without spaces \
                 (e.g. from `openssl rand -hex 32`)"
            )));
        }
    }
    Ok(token)
}

/// Refuses to expose the API off loopback without a token, unless allowed.
pub fn check_exposure(
    listen: SocketAddr,
    token: Option<&str>,
    allow_unauthenticated: bool,
) -> Result<(), ConfigError> {
    if listen.ip().is_loopback() || token.is_some() || allow_unauthenticated {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "refusing to serve {listen} without an API token: anyone who reaches it could run code in \
         sandboxes. Set a token (--token-file FILE or ARRAKIS_API_TOKEN), listen on loopback, or \
         pass --allow-unauthenticated"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RuntimeConfig {
        RuntimeConfig::with_home(Path::new("/home/x"))
    }

    #[test]
    fn the_file_lays_over_the_base() {
        let config = ServerConfig::parse(
            "[server]\nlisten = \"0.0.0.0:7100\"\nallow_unauthenticated = true\n\
             [runtime]\nstate_dir = \"/srv/state\"\ndefault_memory_mb = 512\n",
            base(),
        )
        .unwrap();
        assert_eq!(config.server.listen.port(), 7100);
        assert!(config.server.allow_unauthenticated);
        assert_eq!(config.runtime.state_dir, PathBuf::from("/srv/state"));
        assert_eq!(config.runtime.default_memory_mb, 512);
        assert_eq!(config.runtime.kernel, base().kernel);
        let mut user_mode = base();
        user_mode.network.mode = arrakis_runtime::network::NetModeConfig::User;
        let config = ServerConfig::parse(
            "[runtime.network]\negress = [\"10.0.0.0/8\"]\nforwards = []\n",
            user_mode.clone(),
        )
        .unwrap();
        assert_eq!(
            config.runtime.network.mode,
            arrakis_runtime::network::NetModeConfig::User,
            "a nested table merges into the base"
        );
        assert!(config.runtime.network.forwards.is_empty());
        assert_eq!(config.runtime.network.egress.to_string(), "[10.0.0.0/8]");
        let empty = ServerConfig::parse("", base()).unwrap();
        assert_eq!(empty.server, ServerSection::default());
        assert_eq!(empty.runtime, base());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        for (text, hint) in [
            ("[server]\nport = 1\n", "port"),
            ("[runtime]\nstate_dri = \"/x\"\n", "state_dri"),
            ("[runtime]\ndefault_vcpus = \"two\"\n", "[runtime]"),
            ("[nope]\n", "nope"),
            ("[server]\nlisten = \"localhost\"\n", "listen"),
        ] {
            let err = ServerConfig::parse(text, base()).unwrap_err();
            assert!(err.contains(hint), "{text}: {err}");
        }
    }

    #[test]
    fn tokens_and_exposure() {
        assert_eq!(read_token(None, None).unwrap(), None);
        assert_eq!(
            read_token(None, Some(" 0123456789abcdef \n".into())).unwrap(),
            Some("0123456789abcdef".into())
        );
        assert!(read_token(None, Some("short".into())).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "abcdefabcdefabcdefab\nignored\n").unwrap();
        assert_eq!(
            read_token(Some(&file), Some("0123456789abcdef".into())).unwrap(),
            Some("abcdefabcdefabcdefab".into())
        );
        let loopback: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        assert!(check_exposure(loopback, None, false).is_ok());
        assert!(check_exposure(public, Some("t"), false).is_ok());
        assert!(check_exposure(public, None, true).is_ok());
        let err = check_exposure(public, None, false).unwrap_err().to_string();
        assert!(err.contains("token"), "{err}");
    }
}
