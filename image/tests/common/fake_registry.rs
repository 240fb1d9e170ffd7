//! A minimal registry for the faults a real one does not make on demand: it serves fixed
//! manifests and blobs over plain HTTP on 127.0.0.1, one request per connection, and can
//! ignore `Range` headers, fail, or break off the first download of chosen blobs. It can
//! also demand bearer tokens from its own token service, as Docker Hub does.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What goes wrong when a blob is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Always answer with the whole blob, whatever range was asked for.
    IgnoreRange,
    /// The first answer announces the whole blob but closes after this many bytes.
    CutFirstAfter(usize),
    /// The first answer is this HTTP status with no body.
    FailFirst(u16),
}

/// Docker's token flow: every `/v2/` request must carry `Authorization: Bearer <token>`;
/// without it the answer is `401` with a `WWW-Authenticate: Bearer realm=...` challenge
/// naming `/token` on the same server, which hands out the token for a pull of the
/// repository (as `{"token": ..., "access_token": ...}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenAuth {
    /// The token `/token` grants and `/v2/` requests must carry.
    pub token: String,
    /// The user name and password `/token` wants as HTTP Basic credentials; with `None`
    /// it grants the token to anyone.
    pub basic: Option<(String, String)>,
}

/// The `service` the challenge names and `/token` expects.
pub const SERVICE: &str = "fake";

/// One request the registry received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request target, with its query if any.
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Content {
    repository: String,
    /// By tag or digest: media type and bytes.
    manifests: HashMap<String, (String, Vec<u8>)>,
    /// By digest.
    blobs: HashMap<String, Vec<u8>>,
    faults: HashMap<String, Fault>,
    auth: Option<TokenAuth>,
    /// Where the challenge sends clients for a token.
    realm: String,
}

/// A running fake registry; stopped on drop.
pub struct FakeRegistry {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeRegistry {
    /// Serves `repository` with `manifests` (reference, media type, bytes), `blobs` (by
    /// their sha256) and `faults` (by blob digest).
    pub fn start(
        repository: &str,
        manifests: Vec<(String, String, Vec<u8>)>,
        blobs: Vec<Vec<u8>>,
        faults: Vec<(String, Fault)>,
    ) -> FakeRegistry {
        FakeRegistry::start_with_auth(repository, manifests, blobs, faults, None)
    }

    /// Like [`FakeRegistry::start`], behind the token flow `auth` describes, if any.
    pub fn start_with_auth(
        repository: &str,
        manifests: Vec<(String, String, Vec<u8>)>,
        blobs: Vec<Vec<u8>>,
        faults: Vec<(String, Fault)>,
        auth: Option<TokenAuth>,
    ) -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let content = Content {
            repository: repository.to_owned(),
            manifests: manifests
                .into_iter()
                .map(|(reference, media_type, bytes)| (reference, (media_type, bytes)))
                .collect(),
            blobs: blobs.into_iter().map(|b| (sha256(&b), b)).collect(),
            faults: faults.into_iter().collect(),
            auth,
            realm: format!("http://127.0.0.1:{port}/token"),
        };
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (requests, stop) = (requests.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut faulted = HashSet::new();
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let _ = serve(stream, &content, &requests, &mut faulted);
                    }
                }
            })
        };
        FakeRegistry {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// The requests received since the last call (or the start), forgetting them.
    pub fn take_requests(&self) -> Vec<Request> {
        std::mem::take(&mut *self.requests.lock().unwrap())
    }
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn sha256(data: &[u8]) -> String {
    arrakis_image::oci::Digest::of(data).to_string()
}

fn serve(
    stream: TcpStream,
    content: &Content,
    requests: &Mutex<Vec<Request>>,
    faulted: &mut HashSet<String>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_owned());
            } else if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_owned());
            }
        }
    }
    requests.lock().unwrap().push(Request {
        path: path.clone(),
        range: range.clone(),
        authorization: authorization.clone(),
    });
    let mut stream = stream;
    let prefix = format!("/v2/{}/", content.repository);
    if let Some(auth) = &content.auth {
        let (route, query) = path.split_once('?').unwrap_or((&path, ""));
        if route == "/token" {
            return grant_token(&mut stream, content, auth, query, authorization.as_deref());
        }
        if authorization.as_deref() != Some(format!("Bearer {}", auth.token).as_str()) {
            return challenge(&mut stream, content, path.starts_with(&prefix));
        }
    }
    if path == "/v2/" {
        return respond(&mut stream, "200 OK", &[], b"{}");
    }
    let Some(rest) = path.strip_prefix(&prefix) else {
        return not_found(&mut stream);
    };
    if let Some(reference) = rest.strip_prefix("manifests/") {
        let Some((media_type, bytes)) = content.manifests.get(reference) else {
            return not_found(&mut stream);
        };
        let headers = [
            ("Content-Type", media_type.clone()),
            ("Docker-Content-Digest", sha256(bytes)),
        ];
        return respond(&mut stream, "200 OK", &headers, bytes);
    }
    let Some(digest) = rest.strip_prefix("blobs/") else {
        return not_found(&mut stream);
    };
    let Some(blob) = content.blobs.get(digest) else {
        return not_found(&mut stream);
    };
    let fault = content.faults.get(digest).copied();
    let first = faulted.insert(digest.to_owned());
    let digest_header = ("Docker-Content-Digest", digest.to_owned());
    match fault {
        Some(Fault::FailFirst(status)) if first => {
            respond(&mut stream, &format!("{status} Injected"), &[], b"")
        }
        Some(Fault::CutFirstAfter(cut)) if first => {
            let headers = [digest_header, ("Content-Length", blob.len().to_string())];
            write_head(&mut stream, "200 OK", &headers)?;
            stream.write_all(&blob[..cut.min(blob.len())])?;
            stream.flush()
        }
        _ => {
            let start = range
                .as_deref()
                .filter(|_| fault != Some(Fault::IgnoreRange))
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok())
                .filter(|start| *start < blob.len());
            match start {
                Some(start) => {
                    let headers = [
                        digest_header,
                        (
                            "Content-Range",
                            format!("bytes {start}-{}/{}", blob.len() - 1, blob.len()),
                        ),
                    ];
                    respond(&mut stream, "206 Partial Content", &headers, &blob[start..])
                }
                None => respond(&mut stream, "200 OK", &[digest_header], blob),
            }
        }
    }
}

/// Answers `/token?scope=...&service=...`: the token for a pull of the repository, if the
/// query asks for that and the request carries the credentials `auth` wants.
fn grant_token(
    stream: &mut TcpStream,
    content: &Content,
    auth: &TokenAuth,
    query: &str,
    authorization: Option<&str>,
) -> std::io::Result<()> {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| percent_decode(value))
    };
    let scope = format!("repository:{}:pull", content.repository);
    if param("scope") != Some(scope) || param("service").as_deref() != Some(SERVICE) {
        let body = br#"{"details":"unknown scope or service"}"#;
        return respond(stream, "403 Forbidden", &[], body);
    }
    if let Some((username, password)) = &auth.basic {
        let expected = format!("Basic {}", base64_encode(&format!("{username}:{password}")));
        if authorization != Some(expected.as_str()) {
            let body = br#"{"details":"incorrect username or password"}"#;
            return respond(stream, "401 Unauthorized", &[], body);
        }
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "token": auth.token,
        "access_token": auth.token,
        "expires_in": 300,
    }))
    .unwrap();
    let headers = [("Content-Type", "application/json".to_owned())];
    respond(stream, "200 OK", &headers, &body)
}

/// A `401` pointing at the token service; for a repository's paths the challenge also names
/// the scope to ask for, as Docker's registry does.
fn challenge(
    stream: &mut TcpStream,
    content: &Content,
    in_repository: bool,
) -> std::io::Result<()> {
    let mut value = format!(r#"Bearer realm="{}",service="{SERVICE}""#, content.realm);
    if in_repository {
        value.push_str(&format!(
            r#",scope="repository:{}:pull""#,
            content.repository
        ));
    }
    let body = br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
    let headers = [("WWW-Authenticate", value)];
    respond(stream, "401 Unauthorized", &headers, body)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (b'+', _) => {
                decoded.push(b' ');
                i += 1;
            }
            (byte, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Standard base64 with padding, as HTTP Basic credentials are sent.
pub fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn not_found(stream: &mut TcpStream) -> std::io::Result<()> {
    let body = br#"{"errors":[{"code":"NOT_FOUND","message":"not here"}]}"#;
    respond(stream, "404 Not Found", &[], body)
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut all = headers.to_vec();
    all.push(("Content-Length", body.len().to_string()));
    write_head(stream, status, &all)?;
    stream.write_all(body)?;
    stream.flush()
}

fn write_head(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())
}
