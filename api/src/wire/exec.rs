//! `POST /v1/vms/{name}/exec` and its WebSocket twin: a command with an exit
//! code, separate stdout and stderr, and optional streaming.

use std::collections::BTreeMap;

use arrakis_protocol::{Command, ExecRequest, ExitStatus};
use arrakis_runtime::ExecDefaults;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;

/// Longest timeout accepted, in seconds (one week).
pub const MAX_TIMEOUT_SECS: f64 = 7.0 * 24.0 * 3600.0;

/// A command to run. Exactly one of `argv` and `shell` is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments, run directly (looked up in `PATH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// A command line for `bash -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// Added to (and overriding) the sandbox's environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory: absolute, or relative to `/tmp/server_files`
    /// (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// User name or numeric uid (default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Kill the command's whole process tree after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<f64>,
    /// Text written to the command's stdin, which is then closed. Without
    /// it stdin is empty (over WebSocket, stdin comes as messages instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

impl ExecBody {
    /// The agent request, with `cwd` resolved and the sandbox's defaults
    /// (its image's ENV, WORKDIR and USER, its own environment) under this
    /// request's own settings. `interactive` keeps stdin open for the caller.
    pub fn to_request(
        &self,
        defaults: &ExecDefaults,
        interactive: bool,
    ) -> Result<ExecRequest, ApiError> {
        let command = match (&self.argv, &self.shell) {
            (Some(argv), None) => {
                if argv.first().is_none_or(String::is_empty) {
                    return Err(ApiError::bad_request(
                        "argv is empty: give the program and its arguments",
                    ));
                }
                Command::Argv(argv.clone())
            }
            (None, Some(shell)) => {
                if shell.trim().is_empty() {
                    return Err(ApiError::bad_request(
                        "shell is empty: give a command line for bash -c",
                    ));
                }
                Command::Shell(shell.clone())
            }
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give either argv or shell, not both",
                ))
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "argv or shell is required: argv is [program, args...], shell is a bash command line",
                ))
            }
        };
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(ApiError::bad_request(format!(
                    "env key {key:?} is invalid: non-empty, without '=' or NUL"
                )));
            }
        }
        if let Some((key, _)) = self.env.iter().find(|(_, v)| v.contains('\0')) {
            return Err(ApiError::bad_request(format!(
                "env value of {key:?} contains NUL"
            )));
        }
        let timeout_ms = timeout_ms(self.timeout_secs)?;
        let cwd = match self.cwd.as_deref() {
            None => defaults
                .cwd
                .clone()
                .unwrap_or_else(|| super::WORK_DIR.to_string()),
            Some("") => return Err(ApiError::bad_request("cwd is empty")),
            Some(cwd) => super::guest_path(cwd),
        };
        if self.user.as_deref() == Some("") {
            return Err(ApiError::bad_request("user is empty: give a name or a uid"));
        }
        let mut env = defaults.env.clone();
        env.extend(self.env.clone());
        Ok(ExecRequest {
            command,
            env,
            cwd: Some(cwd),
            user: self.user.clone().or_else(|| defaults.user.clone()),
            timeout_ms,
            stdin: interactive || self.stdin.is_some(),
            ..ExecRequest::default()
        })
    }
}

/// `timeoutSecs` in milliseconds, checked.
pub fn timeout_ms(timeout_secs: Option<f64>) -> Result<Option<u64>, ApiError> {
    match timeout_secs {
        None => Ok(None),
        Some(secs) if secs.is_finite() && secs > 0.0 && secs <= MAX_TIMEOUT_SECS => {
            Ok(Some((secs * 1000.0).ceil() as u64))
        }
        Some(secs) => Err(ApiError::bad_request(format!(
            "timeoutSecs {secs} is out of range: accepted more than 0 and at most {MAX_TIMEOUT_SECS}"
        ))),
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecExit {
    /// The exit status, or null when a signal ended the command.
    pub exit_code: Option<i32>,
    /// The signal number that ended the command, if one did.
    pub signal: Option<i32>,
    /// Whether `timeoutSecs` ran out (the command was then killed).
    pub timed_out: bool,
    pub duration_ms: u64,
}

impl ExecExit {
    pub fn new(status: ExitStatus, duration: std::time::Duration) -> ExecExit {
        ExecExit {
            exit_code: status.code,
            signal: status.signal,
            timed_out: status.timed_out,
            duration_ms: duration.as_millis() as u64,
        }
    }
}

/// The reply of a non-streaming exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExecResult {
    #[serde(flatten)]
    pub exit: ExecExit,
    /// Standard output as text (invalid UTF-8 becomes U+FFFD).
    pub stdout: String,
    pub stderr: String,
    /// Whether output beyond the kept limit was dropped.
    pub truncated: bool,
}

/// The `data` of a `stdout` or `stderr` server-sent event, and of the
/// WebSocket `stdin`, `stdout` and `stderr` messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OutputChunk {
    /// Text; a multi-byte character is never split between chunks.
    pub data: String,
}

/// One message of the WebSocket exec protocol (JSON text frames). The
/// client's first message is an [`ExecBody`]; after that the client sends
/// `stdin`, `eof`, `signal` and `resize`-free messages, the server sends
/// `started`, `stdout`, `stderr`, then `exit` or `error`, and closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum WsMessage {
    Started { pid: u32 },
    Stdin { data: String },
    Eof,
    Signal { signal: i32 },
    Stdout { data: String },
    Stderr { data: String },
    Exit(ExecExit),
    Error { message: String },
}

/// Splits a byte stream into text chunks on character boundaries: bytes of
/// a character cut by a chunk boundary wait for the next chunk; invalid
/// bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    /// The text of `bytes` plus what was pending, up to the last complete
    /// character.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let keep = incomplete_tail(&self.pending);
        let cut = self.pending.len() - keep;
        let text = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
        self.pending.drain(..cut);
        text
    }

    /// Whatever is left, at the end of the stream.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// How many bytes at the end of `bytes` start a UTF-8 character that is
/// not complete yet (0 to 3).
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back
        }
        let width = match byte {
            b if b & 0xE0 == 0xC0 => 2,
            b if b & 0xF0 == 0xE0 => 3,
            b if b & 0xF8 == 0xF0 => 4,
            _ => 1,
        };
        return if width > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(env: BTreeMap<String, String>) -> ExecDefaults {
        ExecDefaults {
            env,
            ..ExecDefaults::default()
        }
    }

    fn body(json: &str) -> ExecBody {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn requests_resolve_against_the_sandbox() {
        let base = BTreeMap::from([("A".to_string(), "1".to_string()), ("B".into(), "2".into())]);
        let request = body(
            r#"{"argv":["ls","-l"],"env":{"B":"3"},"cwd":"sub","user":"arrakis","timeoutSecs":1.5}"#,
        )
        .to_request(&defaults(base), false)
        .unwrap();
        assert_eq!(
            request.command,
            Command::Argv(vec!["ls".into(), "-l".into()])
        );
        assert_eq!(request.env["A"], "1");
        assert_eq!(request.env["B"], "3");
        assert_eq!(request.cwd.as_deref(), Some("/tmp/server_files/sub"));
        assert_eq!(request.timeout_ms, Some(1500));
        assert!(!request.stdin);
        let request = body(r#"{"shell":"echo hi","stdin":"x"}"#)
            .to_request(&ExecDefaults::default(), false)
            .unwrap();
        assert_eq!(request.command, Command::Shell("echo hi".into()));
        assert_eq!(request.cwd.as_deref(), Some("/tmp/server_files"));
        assert!(request.stdin);
    }

    #[test]
    fn bad_requests_name_the_field() {
        for (json, hint) in [
            ("{}", "argv or shell"),
            (r#"{"argv":[]}"#, "argv is empty"),
            (r#"{"argv":[""]}"#, "argv is empty"),
            (r#"{"shell":"  "}"#, "shell is empty"),
            (r#"{"shell":"a","argv":["b"]}"#, "not both"),
            (r#"{"shell":"a","env":{"A=B":"x"}}"#, "env key"),
            (r#"{"shell":"a","timeoutSecs":0}"#, "timeoutSecs"),
            (r#"{"shell":"a","timeoutSecs":-1}"#, "timeoutSecs"),
            (r#"{"shell":"a","timeoutSecs":1e12}"#, "timeoutSecs"),
            (r#"{"shell":"a","cwd":""}"#, "cwd"),
            (r#"{"shell":"a","user":""}"#, "user"),
        ] {
            let err = body(json)
                .to_request(&ExecDefaults::default(), false)
                .unwrap_err();
            assert_eq!(err.status.as_u16(), 400, "{json}");
            assert!(err.message.contains(hint), "{json}: {}", err.message);
        }
        assert!(serde_json::from_str::<ExecBody>(r#"{"shell":"a","bogus":1}"#).is_err());
    }

    #[test]
    fn exit_and_ws_shapes() {
        let exit = ExecExit::new(
            ExitStatus {
                code: Some(3),
                signal: None,
                timed_out: false,
            },
            std::time::Duration::from_millis(12),
        );
        assert_eq!(
            serde_json::to_value(&exit).unwrap(),
            serde_json::json!({"exitCode": 3, "signal": null, "timedOut": false, "durationMs": 12})
        );
        assert_eq!(
            serde_json::to_value(WsMessage::Exit(exit)).unwrap()["type"],
            "exit"
        );
        let msg: WsMessage = serde_json::from_str(r#"{"type":"stdin","data":"x"}"#).unwrap();
        assert_eq!(msg, WsMessage::Stdin { data: "x".into() });
        let msg: WsMessage = serde_json::from_str(r#"{"type":"eof"}"#).unwrap();
        assert_eq!(msg, WsMessage::Eof);
    }

    #[test]
    fn chunks_never_split_a_character() {
        let text = "aé€😀z";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut chunker = Utf8Chunker::default();
            let mut out = chunker.push(&bytes[..cut]);
            out += &chunker.push(&bytes[cut..]);
            out += &chunker.finish();
            assert_eq!(out, text, "cut at {cut}");
        }
        let mut chunker = Utf8Chunker::default();
        assert_eq!(chunker.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(chunker.push(b"\xe2\x82"), "");
        assert_eq!(chunker.finish(), "\u{fffd}");
    }
}
