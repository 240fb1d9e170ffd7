//! Remote mode: the verbs as calls to an arrakis server's HTTP API, with
//! the API's own wire types. Names, ids and paths are percent-encoded;
//! commands stream as server-sent events, or over a WebSocket when stdin
//! is passed through.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use arrakis_api::wire::exec::{ExecBody, ExecExit, ExecResult, OutputChunk, WsMessage};
use arrakis_api::wire::fs::{ChmodBody, Entry, Extracted, Listing, MkdirBody, Written};
use arrakis_api::wire::snapshots::{
    ForkRequest, RollbackRequest, Snapshot, SnapshotList, SnapshotRequest,
};
use arrakis_api::wire::{
    AddForwardsRequest, EgressRequest, ErrorBody, PortForward, PortForwardRequest, StartVmRequest,
    Success, UpdateStateRequest, Vm, VmList,
};
use arrakis_runtime::network::{EgressPolicy, ForwardRequest};
use arrakis_runtime::ForkSource;
use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite;

use super::{Change, NewVm, Output};

/// Bytes of a path segment that stay as they are (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A reply with a non-2xx status: its status and the server's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.message)
    }
}

impl std::error::Error for HttpError {}

impl HttpError {
    /// From a reply's status and body: the `{"error":{"message"}}` text,
    /// else the body itself, else the status's reason.
    pub fn new(status: u16, body: &[u8]) -> HttpError {
        let message = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(error) => error.error.message,
            Err(_) => {
                let text = String::from_utf8_lossy(body).trim().to_string();
                if text.is_empty() {
                    reqwest::StatusCode::from_u16(status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("no message")
                        .to_string()
                } else {
                    text
                }
            }
        };
        HttpError { status, message }
    }
}

/// The server's base URL (`http://host:port`, no trailing `/` or `/v1`)
/// from what the user typed (`host:port` means plain HTTP).
pub fn base_url(text: &str) -> anyhow::Result<String> {
    let text = text.trim();
    let url = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    if url.starts_with("https://") {
        bail!("--server {text}: https is not supported by this build of arrakis; use http:// (the server speaks plain HTTP, on loopback or behind a TLS proxy)");
    }
    if !url.starts_with("http://") {
        bail!("--server {text}: expected an http:// URL such as http://127.0.0.1:7000");
    }
    let parsed = reqwest::Url::parse(&url).map_err(|e| anyhow!("--server {text}: {e}"))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        bail!("--server {text}: the URL has no host");
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        bail!("--server {text}: the URL must not have a query or fragment");
    }
    let mut base = url.trim_end_matches('/').to_string();
    if let Some(stripped) = base.strip_suffix("/v1") {
        base = stripped.to_string();
    }
    Ok(base)
}

/// `/v1/a/b/c` with every segment percent-encoded.
pub fn api_path(segments: &[&str]) -> String {
    let mut path = String::from("/v1");
    for segment in segments {
        path.push('/');
        path.extend(utf8_percent_encode(segment, SEGMENT));
    }
    path
}

/// The innermost cause of an error, which names what really happened
/// (`Connection refused (os error 111)`).
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(url: &str, token: Option<&str>) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("arrakis-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("setting up the HTTP client")?;
        Ok(Client {
            http,
            base: base_url(url)?,
            token: token.filter(|t| !t.is_empty()).map(str::to_string),
        })
    }

    fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        let url = format!("{}{}", self.base, api_path(segments));
        let request = self.http.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn unreachable(&self, reason: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "cannot reach the arrakis server at {}: {reason} (is 'arrakis serve' running?)",
            self.base
        )
    }

    fn transport(&self, error: reqwest::Error) -> anyhow::Error {
        if error.is_connect() {
            self.unreachable(root_cause(&error))
        } else if error.is_timeout() {
            self.unreachable("timed out")
        } else {
            anyhow!(
                "the connection to the arrakis server at {} failed: {}",
                self.base,
                root_cause(&error)
            )
        }
    }

    fn status_error(&self, status: u16, body: &[u8]) -> anyhow::Error {
        let mut error = HttpError::new(status, body);
        if status == 401 && self.token.is_none() {
            error
                .message
                .push_str(" (give the API token with --token or ARRAKIS_TOKEN)");
        }
        error.into()
    }

    /// Sends; a non-2xx reply becomes an [`HttpError`].
    async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response = request.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(self.status_error(status.as_u16(), &body))
    }

    async fn json<T: DeserializeOwned>(&self, request: RequestBuilder) -> anyhow::Result<T> {
        let response = self.send(request).await?;
        let url = response.url().path().to_string();
        let body = response.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&body).with_context(|| {
            format!(
                "the server's reply to {url} is not what this client expects: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            )
        })
    }

    pub async fn start(&self, new: NewVm) -> anyhow::Result<Vm> {
        let body = StartVmRequest {
            vm_name: Some(new.name),
            vcpus: new.vcpus,
            memory_mb: new.memory_mb,
            image: new.image,
            env: (!new.env.is_empty()).then_some(new.env),
            cold_boot: new.cold_boot.then_some(true),
            port_forwards: (!new.forwards.is_empty())
                .then(|| new.forwards.into_iter().map(forward_request).collect()),
            egress: new.egress,
            ..StartVmRequest::default()
        };
        self.json(self.request(Method::POST, &["vms"]).json(&body))
            .await
    }

    pub async fn restore(&self, name: &str, snapshot_id: &str) -> anyhow::Result<Vm> {
        let body = StartVmRequest {
            vm_name: Some(name.to_string()),
            snapshot_id: Some(snapshot_id.to_string()),
            ..StartVmRequest::default()
        };
        self.json(self.request(Method::POST, &["vms"]).json(&body))
            .await
    }

    /// `POST /v1/snapshots/{id}/fork` or `POST /v1/vms/{name}/fork`.
    pub async fn fork(
        &self,
        source: &ForkSource,
        count: u32,
        prefix: &str,
    ) -> anyhow::Result<Vec<Vm>> {
        let segments = match source {
            ForkSource::Snapshot(id) => ["snapshots", id.as_str(), "fork"],
            ForkSource::Sandbox(name) => ["vms", name.as_str(), "fork"],
        };
        let body = ForkRequest {
            count,
            name_prefix: Some(prefix.to_string()),
        };
        let list: VmList = self
            .json(self.request(Method::POST, &segments).json(&body))
            .await?;
        Ok(list.vms)
    }

    /// `POST /v1/vms/{name}/rollback`.
    pub async fn rollback(&self, name: &str, snapshot_id: &str) -> anyhow::Result<Vm> {
        let body = RollbackRequest {
            snapshot_id: snapshot_id.to_string(),
        };
        self.json(
            self.request(Method::POST, &["vms", name, "rollback"])
                .json(&body),
        )
        .await
    }

    pub async fn get_vm(&self, name: &str) -> anyhow::Result<Vm> {
        self.json(self.request(Method::GET, &["vms", name])).await
    }

    pub async fn list_vms(&self) -> anyhow::Result<Vec<Vm>> {
        let list: VmList = self.json(self.request(Method::GET, &["vms"])).await?;
        Ok(list.vms)
    }

    pub async fn change(&self, name: &str, change: Change) -> anyhow::Result<()> {
        let body = UpdateStateRequest {
            status: Some(change.wire().to_string()),
        };
        let _: Success = self
            .json(self.request(Method::PATCH, &["vms", name]).json(&body))
            .await?;
        Ok(())
    }

    pub async fn destroy(&self, name: &str) -> anyhow::Result<()> {
        let _: Success = self
            .json(self.request(Method::DELETE, &["vms", name]))
            .await?;
        Ok(())
    }

    pub async fn destroy_all(&self) -> anyhow::Result<()> {
        let _: Success = self.json(self.request(Method::DELETE, &["vms"])).await?;
        Ok(())
    }

    /// `POST /v1/vms/{name}/portForwards`; the forwards added are those
    /// on host ports the VM did not have before.
    pub async fn add_forwards(
        &self,
        name: &str,
        requests: Vec<ForwardRequest>,
    ) -> anyhow::Result<Vec<PortForward>> {
        let before = self.get_vm(name).await?.port_forwards;
        let body = AddForwardsRequest {
            port_forwards: requests.into_iter().map(forward_request).collect(),
        };
        let after: Vm = self
            .json(
                self.request(Method::POST, &["vms", name, "portForwards"])
                    .json(&body),
            )
            .await?;
        Ok(new_forwards(&before, after.port_forwards))
    }

    /// `DELETE /v1/vms/{name}/portForwards?hostPort=N`.
    pub async fn remove_forward(&self, name: &str, host_port: u16) -> anyhow::Result<()> {
        let port = host_port.to_string();
        let request = self.path_query(
            Method::DELETE,
            name,
            &["portForwards"],
            &[("hostPort", &port)],
        );
        let _: Vm = self.json(request).await?;
        Ok(())
    }

    /// `PUT /v1/vms/{name}/egress`; returns the policy the VM reports.
    pub async fn set_egress(
        &self,
        name: &str,
        egress: EgressPolicy,
    ) -> anyhow::Result<EgressPolicy> {
        let body = EgressRequest { egress };
        let vm: Vm = self
            .json(
                self.request(Method::PUT, &["vms", name, "egress"])
                    .json(&body),
            )
            .await?;
        vm.egress
            .with_context(|| format!("the server reports no egress policy for VM {name:?}"))
    }

    /// `POST /v1/vms/{name}/exec` as server-sent events.
    pub async fn exec_sse(&self, name: &str, body: &ExecBody) -> anyhow::Result<SseExec> {
        let request = self
            .request(Method::POST, &["vms", name, "exec"])
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(body);
        let response = self.send(request).await?;
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if is_json {
            // A server that answers with the whole result at once.
            let body = response.bytes().await.map_err(|e| self.transport(e))?;
            let result: ExecResult = serde_json::from_slice(&body)
                .context("the server's exec reply is not an ExecResult")?;
            return Ok(SseExec::finished(result));
        }
        Ok(SseExec {
            body: Box::pin(response.bytes_stream()),
            parser: SseParser::default(),
            queued: VecDeque::new(),
        })
    }

    /// `GET /v1/vms/{name}/exec/ws`: the command with stdin.
    pub async fn exec_ws(&self, name: &str, body: &ExecBody) -> anyhow::Result<WsExec> {
        use tungstenite::client::IntoClientRequest;
        let url = format!(
            "ws{}{}",
            self.base.trim_start_matches("http"),
            api_path(&["vms", name, "exec", "ws"])
        );
        let mut request = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("building the WebSocket request for {url}"))?;
        if let Some(token) = &self.token {
            let value = tungstenite::http::HeaderValue::from_str(&format!("Bearer {token}"))
                .context("the token is not a valid header value")?;
            request
                .headers_mut()
                .insert(tungstenite::http::header::AUTHORIZATION, value);
        }
        let (socket, _) = match tokio_tungstenite::connect_async(request).await {
            Ok(connected) => connected,
            Err(tungstenite::Error::Io(e)) => return Err(self.unreachable(e)),
            Err(tungstenite::Error::Http(response)) => {
                let body = response.body().clone().unwrap_or_default();
                return Err(self.status_error(response.status().as_u16(), &body));
            }
            Err(e) => bail!("the WebSocket handshake with {} failed: {e}", self.base),
        };
        let (mut sink, read) = socket.split();
        let first = serde_json::to_string(body)?;
        sink.send(tungstenite::Message::Text(first.into()))
            .await
            .context("sending the command over the WebSocket")?;
        let (sender, mut outbox) = tokio::sync::mpsc::channel::<tungstenite::Message>(16);
        tokio::spawn(async move {
            // Ends when every sender is gone; the socket is not closed
            // here, since closing it ends the command.
            while let Some(message) = outbox.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
        });
        Ok(WsExec {
            read: Box::pin(read),
            sender: WsSender(sender),
        })
    }

    fn path_query(
        &self,
        method: Method,
        name: &str,
        route: &[&str],
        query: &[(&str, &str)],
    ) -> RequestBuilder {
        let mut segments = vec!["vms", name];
        segments.extend_from_slice(route);
        self.request(method, &segments).query(query)
    }

    pub async fn stat(&self, name: &str, path: &str) -> anyhow::Result<Entry> {
        self.json(self.path_query(Method::GET, name, &["fs", "stat"], &[("path", path)]))
            .await
    }

    pub async fn list_dir(&self, name: &str, path: &str) -> anyhow::Result<Listing> {
        self.json(self.path_query(Method::GET, name, &["fs", "list"], &[("path", path)]))
            .await
    }

    pub async fn mkdir(&self, name: &str, path: &str, parents: bool) -> anyhow::Result<()> {
        let body = MkdirBody {
            path: path.to_string(),
            parents,
            mode: None,
        };
        let _: Success = self
            .json(
                self.request(Method::POST, &["vms", name, "fs", "mkdir"])
                    .json(&body),
            )
            .await?;
        Ok(())
    }

    pub async fn chmod(&self, name: &str, path: &str, mode: u32) -> anyhow::Result<()> {
        let body = ChmodBody {
            path: path.to_string(),
            mode: format!("{mode:o}"),
        };
        let _: Success = self
            .json(
                self.request(Method::POST, &["vms", name, "fs", "chmod"])
                    .json(&body),
            )
            .await?;
        Ok(())
    }

    pub async fn remove(&self, name: &str, path: &str, recursive: bool) -> anyhow::Result<()> {
        let recursive = if recursive { "true" } else { "false" };
        let request = self.path_query(
            Method::DELETE,
            name,
            &["fs", "file"],
            &[("path", path), ("recursive", recursive)],
        );
        let _: Success = self.json(request).await?;
        Ok(())
    }

    pub async fn write_file(
        &self,
        name: &str,
        path: &str,
        file: tokio::fs::File,
        mode: u32,
    ) -> anyhow::Result<u64> {
        let mode = format!("{mode:o}");
        let request = self
            .path_query(
                Method::PUT,
                name,
                &["fs", "file"],
                &[("path", path), ("mode", &mode)],
            )
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::from(file));
        let written: Written = self.json(request).await?;
        Ok(written.bytes)
    }

    /// Streams a reply body into `out`; returns the byte count.
    async fn download(
        &self,
        request: RequestBuilder,
        out: &mut tokio::fs::File,
    ) -> anyhow::Result<u64> {
        let response = self.send(request).await?;
        let mut body = response.bytes_stream();
        let mut copied = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| self.transport(e))?;
            out.write_all(&chunk)
                .await
                .context("writing the download")?;
            copied += chunk.len() as u64;
        }
        out.flush().await?;
        Ok(copied)
    }

    pub async fn read_file(
        &self,
        name: &str,
        path: &str,
        out: &mut tokio::fs::File,
    ) -> anyhow::Result<u64> {
        let request = self.path_query(Method::GET, name, &["fs", "file"], &[("path", path)]);
        self.download(request, out).await
    }

    pub async fn put_archive(
        &self,
        name: &str,
        dir: &str,
        archive: tokio::fs::File,
    ) -> anyhow::Result<()> {
        let request = self
            .path_query(Method::PUT, name, &["fs", "archive"], &[("path", dir)])
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(reqwest::Body::from(archive));
        let _: Extracted = self.json(request).await?;
        Ok(())
    }

    pub async fn get_archive(
        &self,
        name: &str,
        dir: &str,
        out: &mut tokio::fs::File,
    ) -> anyhow::Result<()> {
        let request = self.path_query(Method::GET, name, &["fs", "archive"], &[("path", dir)]);
        self.download(request, out).await?;
        Ok(())
    }

    pub async fn snapshot(&self, name: &str, id: Option<String>) -> anyhow::Result<Snapshot> {
        let body = SnapshotRequest { snapshot_id: id };
        self.json(
            self.request(Method::POST, &["vms", name, "snapshots"])
                .json(&body),
        )
        .await
    }

    pub async fn snapshots(&self, vm: Option<&str>) -> anyhow::Result<Vec<Snapshot>> {
        let request = match vm {
            Some(vm) => self.request(Method::GET, &["vms", vm, "snapshots"]),
            None => self.request(Method::GET, &["snapshots"]),
        };
        let list: SnapshotList = self.json(request).await?;
        Ok(list.snapshots)
    }

    pub async fn get_snapshot(&self, id: &str) -> anyhow::Result<Snapshot> {
        self.json(self.request(Method::GET, &["snapshots", id]))
            .await
    }

    pub async fn delete_snapshot(&self, id: &str) -> anyhow::Result<()> {
        let _: Success = self
            .json(self.request(Method::DELETE, &["snapshots", id]))
            .await?;
        Ok(())
    }
}

fn forward_request(request: ForwardRequest) -> PortForwardRequest {
    PortForwardRequest {
        guest_port: request.guest_port,
        host_port: request.host_port,
        description: (!request.description.is_empty()).then_some(request.description),
    }
}

/// The forwards of `after` on host ports that no forward of `before` had.
fn new_forwards(before: &[PortForward], after: Vec<PortForward>) -> Vec<PortForward> {
    after
        .into_iter()
        .filter(|forward| !before.iter().any(|old| old.host_port == forward.host_port))
        .collect()
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A command whose output arrives as server-sent events.
pub struct SseExec {
    body: ByteStream,
    parser: SseParser,
    /// Outputs ready to hand out (from a JSON reply).
    queued: VecDeque<Output>,
}

impl SseExec {
    fn finished(result: ExecResult) -> SseExec {
        let mut queued = VecDeque::new();
        if !result.stdout.is_empty() {
            queued.push_back(Output::Stdout(Bytes::from(result.stdout)));
        }
        if !result.stderr.is_empty() {
            queued.push_back(Output::Stderr(Bytes::from(result.stderr)));
        }
        queued.push_back(Output::Exit(result.exit));
        SseExec {
            body: Box::pin(futures_util::stream::empty()),
            parser: SseParser::default(),
            queued,
        }
    }

    /// Cancel-safe: the only await is the body stream's `next`.
    pub async fn next(&mut self) -> anyhow::Result<Output> {
        loop {
            if let Some(output) = self.queued.pop_front() {
                return Ok(output);
            }
            if let Some((event, data)) = self.parser.pop() {
                if let Some(output) = sse_output(&event, &data)? {
                    return Ok(output);
                }
                continue;
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.parser.push(&chunk),
                Some(Err(e)) => bail!(
                    "the connection to the server broke while the command ran: {}",
                    root_cause(&e)
                ),
                None => bail!("the server ended the event stream before the command's exit"),
            }
        }
    }
}

/// What one event of the exec stream means (`None`: nothing to show).
fn sse_output(event: &str, data: &str) -> anyhow::Result<Option<Output>> {
    let chunk = |data: &str| -> anyhow::Result<Bytes> {
        let chunk: OutputChunk =
            serde_json::from_str(data).with_context(|| format!("a malformed event: {data}"))?;
        Ok(Bytes::from(chunk.data))
    };
    Ok(Some(match event {
        "stdout" => Output::Stdout(chunk(data)?),
        "stderr" => Output::Stderr(chunk(data)?),
        "exit" => Output::Exit(
            serde_json::from_str::<ExecExit>(data)
                .with_context(|| format!("a malformed exit event: {data}"))?,
        ),
        "error" => {
            let message = serde_json::from_str::<serde_json::Value>(data)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| data.to_string());
            bail!("the command failed on the server: {message}");
        }
        _ => return Ok(None),
    }))
}

/// Incremental `text/event-stream` parsing: events as (name, data).
#[derive(Debug, Default)]
pub struct SseParser {
    pending: Vec<u8>,
    event: String,
    data: Vec<String>,
    ready: VecDeque<(String, String)>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(end) = self.pending[start..].iter().position(|b| *b == b'\n') {
            let mut line = &self.pending[start..start + end];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            let line = String::from_utf8_lossy(line).into_owned();
            self.line(&line);
            start += end + 1;
        }
        self.pending.drain(..start);
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            if !self.data.is_empty() || !self.event.is_empty() {
                let event = std::mem::take(&mut self.event);
                let event = if event.is_empty() {
                    "message".to_string()
                } else {
                    event
                };
                let data = std::mem::take(&mut self.data).join("\n");
                self.ready.push_back((event, data));
            }
            return;
        }
        if line.starts_with(':') {
            return; // a comment (keep-alive)
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => self.event = value.to_string(),
            "data" => self.data.push(value.to_string()),
            _ => {}
        }
    }

    pub fn pop(&mut self) -> Option<(String, String)> {
        self.ready.pop_front()
    }
}

type WsRead = Pin<Box<dyn Stream<Item = Result<tungstenite::Message, tungstenite::Error>> + Send>>;

/// A command over a WebSocket.
pub struct WsExec {
    read: WsRead,
    sender: WsSender,
}

/// Sends client messages of a WebSocket exec; usable from other tasks.
#[derive(Clone)]
pub struct WsSender(tokio::sync::mpsc::Sender<tungstenite::Message>);

impl WsSender {
    async fn send(&self, message: tungstenite::Message) -> anyhow::Result<()> {
        self.0
            .send(message)
            .await
            .map_err(|_| anyhow!("the WebSocket to the server is closed"))
    }

    fn text(message: &WsMessage) -> anyhow::Result<tungstenite::Message> {
        Ok(tungstenite::Message::Text(
            serde_json::to_string(message)?.into(),
        ))
    }

    /// Stdin bytes, as a binary frame (exact, whatever the encoding).
    pub async fn stdin(&self, data: Bytes) -> anyhow::Result<()> {
        self.send(tungstenite::Message::Binary(data)).await
    }

    pub async fn eof(&self) -> anyhow::Result<()> {
        self.send(Self::text(&WsMessage::Eof)?).await
    }

    pub async fn signal(&self, signal: i32) -> anyhow::Result<()> {
        self.send(Self::text(&WsMessage::Signal { signal })?).await
    }
}

impl WsExec {
    pub fn sender(&self) -> WsSender {
        self.sender.clone()
    }

    pub async fn signal(&self, signal: i32) -> anyhow::Result<()> {
        self.sender.signal(signal).await
    }

    /// Cancel-safe: the only await is the socket's `next`.
    pub async fn next(&mut self) -> anyhow::Result<Output> {
        loop {
            let message = match self.read.next().await {
                Some(Ok(message)) => message,
                Some(Err(e)) => bail!("the WebSocket to the server broke: {e}"),
                None => bail!("the server closed the WebSocket before the command's exit"),
            };
            let text = match message {
                tungstenite::Message::Text(text) => text,
                tungstenite::Message::Close(_) => {
                    bail!("the server closed the WebSocket before the command's exit")
                }
                _ => continue,
            };
            let message: WsMessage = serde_json::from_str(text.as_str())
                .with_context(|| format!("a malformed message from the server: {text}"))?;
            match message {
                WsMessage::Stdout { data } => return Ok(Output::Stdout(Bytes::from(data))),
                WsMessage::Stderr { data } => return Ok(Output::Stderr(Bytes::from(data))),
                WsMessage::Exit(exit) => return Ok(Output::Exit(exit)),
                WsMessage::Error { message } => {
                    bail!("the command failed on the server: {message}")
                }
                _ => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(base_url("127.0.0.1:7000").unwrap(), "http://127.0.0.1:7000");
        assert_eq!(
            base_url("http://localhost:7000/").unwrap(),
            "http://localhost:7000"
        );
        assert_eq!(base_url(" http://h:1/v1/ ").unwrap(), "http://h:1");
        assert_eq!(base_url("http://h/prefix").unwrap(), "http://h/prefix");
        assert!(base_url("https://h:1")
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(base_url("ftp://h").is_err());
        assert!(base_url("http://").is_err());
        assert!(base_url("http://h:1/?x=1").is_err());
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(api_path(&["vms"]), "/v1/vms");
        assert_eq!(api_path(&["vms", "my sb", "exec"]), "/v1/vms/my%20sb/exec");
        assert_eq!(api_path(&["vms", "é/x?#%"]), "/v1/vms/%C3%A9%2Fx%3F%23%25");
        assert_eq!(
            api_path(&["snapshots", "a-b_c.d~e"]),
            "/v1/snapshots/a-b_c.d~e"
        );
    }

    #[test]
    fn error_bodies() {
        let error = HttpError::new(404, br#"{"error":{"message":"no sandbox named \"x\""}}"#);
        assert_eq!(error.to_string(), r#"HTTP 404: no sandbox named "x""#);
        assert_eq!(HttpError::new(502, b"bad gateway\n").message, "bad gateway");
        assert_eq!(HttpError::new(503, b"").message, "Service Unavailable");
    }

    #[test]
    fn event_streams_parse_across_chunk_boundaries() {
        let text = "event: stdout\ndata: {\"data\":\"h\u{e9}\"}\n\n: keep-alive\n\nevent: stderr\r\ndata: {\"data\":\"x\"}\r\n\r\nevent: exit\ndata: {\"exitCode\":3,\"signal\":null,\"timedOut\":false,\"durationMs\":5}\n\ndata: a\ndata: b\n\n";
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            let mut parser = SseParser::default();
            parser.push(&bytes[..cut]);
            parser.push(&bytes[cut..]);
            let mut events = Vec::new();
            while let Some(event) = parser.pop() {
                events.push(event);
            }
            assert_eq!(
                events,
                vec![
                    ("stdout".to_string(), "{\"data\":\"h\u{e9}\"}".to_string()),
                    ("stderr".to_string(), "{\"data\":\"x\"}".to_string()),
                    (
                        "exit".to_string(),
                        "{\"exitCode\":3,\"signal\":null,\"timedOut\":false,\"durationMs\":5}"
                            .to_string()
                    ),
                    ("message".to_string(), "a\nb".to_string()),
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn added_forwards_are_those_on_new_host_ports() {
        let forward = |host: &str, guest: &str| PortForward {
            host_port: host.into(),
            guest_port: guest.into(),
            description: String::new(),
        };
        let before = [forward("8080", "80")];
        let after = vec![
            forward("8080", "80"),
            forward("40001", "22"),
            forward("8081", "80"),
        ];
        assert_eq!(
            new_forwards(&before, after),
            [forward("40001", "22"), forward("8081", "80")]
        );
    }

    /// What the server reads from a request is what was asked.
    #[test]
    fn forward_requests_reach_the_server_unchanged() {
        for asked in [
            ForwardRequest {
                host_port: None,
                guest_port: 22,
                description: String::new(),
            },
            ForwardRequest {
                host_port: Some(8080),
                guest_port: 80,
                description: "web = é".into(),
            },
        ] {
            let sent = serde_json::to_string(&forward_request(asked.clone())).unwrap();
            let read: PortForwardRequest = serde_json::from_str(&sent).unwrap();
            assert_eq!(read.into_runtime(), asked, "{sent}");
        }
    }

    #[test]
    fn exec_events_become_outputs() {
        assert_eq!(
            sse_output("stdout", r#"{"data":"hi\n"}"#).unwrap(),
            Some(Output::Stdout(Bytes::from("hi\n")))
        );
        let Some(Output::Exit(exit)) = sse_output(
            "exit",
            r#"{"exitCode":null,"signal":9,"timedOut":true,"durationMs":1000}"#,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!((exit.signal, exit.timed_out), (Some(9), true));
        let error = sse_output("error", r#"{"message":"agent gone"}"#).unwrap_err();
        assert!(error.to_string().contains("agent gone"), "{error}");
        assert_eq!(sse_output("ping", "{}").unwrap(), None);
        assert!(sse_output("stdout", "not json").is_err());
    }
}
