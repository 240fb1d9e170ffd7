//! Real-VM tests of the REST API: the server runs on 127.0.0.1:0 over a
//! manager on a temporary state directory, and is driven over HTTP the way
//! py-arrakis drives it. They need the artifacts from `scripts/setup`
//! (under `$ARRAKIS_HOME`, default `~/.cache/arrakis`) and FAIL, naming what
//! is missing, when those are absent.
//!
//! A guard kills every QEMU started under the state directory, even when
//! the test fails; the test is bounded in time and runs at most two VMs.

use std::future::Future;
use std::time::Duration;

use arrakis_runtime::Manager;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

/// Upper bound of the test.
const TEST_TIMEOUT: Duration = Duration::from_secs(500);

use arrakis_runtime::testing::{pids_under, run_bounded, VmTestEnv as TestEnv};

fn run<F: Future<Output = ()>>(body: F) {
    run_bounded(TEST_TIMEOUT, "arrakis_runtime=info,arrakis_api=info", body);
}

/// An HTTP client of the server under test.
struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn start(manager: Manager) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let options = arrakis_api::ServeOptions::default();
        tokio::spawn(arrakis_api::serve(
            listener,
            manager,
            options,
            std::future::pending(),
        ));
        Api {
            base,
            http: reqwest::Client::new(),
        }
    }

    /// Sends a request (JSON body if given); returns the status and the
    /// JSON reply, which every reply must have.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path} -> {status}: not JSON ({e}): {text:?}"));
        (status, json)
    }

    /// A call that must succeed with 200.
    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, json) = self.call(method.clone(), path, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {json}");
        json
    }

    /// A call that must fail with `code` and the error body.
    async fn fails(&self, method: Method, path: &str, body: Option<Value>, code: u16) -> String {
        let (status, json) = self.call(method.clone(), path, body).await;
        assert_eq!(status.as_u16(), code, "{method} {path}: {json}");
        json["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{method} {path}: no error message in {json}"))
            .to_string()
    }

    async fn cmd(&self, vm: &str, cmd: &str) -> (String, String) {
        let reply = self
            .ok(
                Method::POST,
                &format!("/v1/vms/{vm}/cmd"),
                Some(json!({"cmd": cmd, "blocking": true})),
            )
            .await;
        let keys: Vec<&String> = reply.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["error", "output"], "{reply}");
        (
            reply["output"].as_str().unwrap().to_string(),
            reply["error"].as_str().unwrap().to_string(),
        )
    }
}

fn vm_status(vm: &Value) -> &str {
    vm["status"].as_str().unwrap_or("")
}

/// The name with a space and unicode, and how py-arrakis puts it in a path.
const NAME: &str = "my sb ü";
const PATH_NAME: &str = "my%20sb%20%C3%BC";

#[test]
fn py_arrakis_flow_over_http() {
    let env = TestEnv::new();
    run(async {
        let manager = Manager::open(env.config.clone()).await.expect("manager");
        let api = Api::start(manager).await;

        for path in ["/v1/health", "/health"] {
            assert_eq!(api.ok(Method::GET, path, None).await["status"], "healthy");
        }
        assert_eq!(
            api.ok(Method::GET, "/v1/vms", None).await,
            json!({"vms": []})
        );

        // Start: the reply is the VM object, and commands run right away.
        let vm = api
            .ok(
                Method::POST,
                "/v1/vms",
                Some(json!({"vmName": NAME, "env": {"GREETING": "hi there"}, "memoryMb": 384})),
            )
            .await;
        for (key, value) in [
            ("vmName", json!(NAME)),
            ("status", json!("RUNNING")),
            ("tapDeviceName", json!("")),
            ("networkMode", json!("user")),
            ("memoryMb", json!(384)),
            ("image", json!("default")),
        ] {
            assert_eq!(vm[key], value, "{key} in {vm}");
        }
        let ip = vm["ip"].as_str().unwrap();
        assert!(ip.starts_with("10.20.") && ip.ends_with("/16"), "{vm}");
        // The configured default forwards, in the original's shape.
        let defaults = vm["portForwards"].as_array().unwrap();
        assert_eq!(defaults.len(), 6, "{vm}");
        assert_eq!(defaults[0]["guestPort"], "5901");
        assert_eq!(defaults[0]["description"], "gui");
        assert_eq!(defaults[1]["description"], "code (range 5736-5740)");
        let vm_path = format!("/v1/vms/{PATH_NAME}");
        assert_eq!(api.ok(Method::GET, &vm_path, None).await, vm);
        assert_eq!(
            api.ok(Method::GET, &format!("/vms/{PATH_NAME}"), None)
                .await,
            vm
        );

        commands(&api).await;
        files(&api).await;
        beyond_the_original(&api, &format!("/v1/vms/{PATH_NAME}")).await;

        // Pause and resume.
        let paused = json!({"status": "paused"});
        assert_eq!(
            api.ok(Method::PATCH, &vm_path, Some(paused.clone())).await,
            json!({"success": true})
        );
        assert_eq!(
            vm_status(&api.ok(Method::GET, &vm_path, None).await),
            "PAUSED"
        );
        let busy = api
            .fails(
                Method::POST,
                &format!("{vm_path}/cmd"),
                Some(json!({"cmd": "true"})),
                409,
            )
            .await;
        assert!(busy.contains("paused"), "{busy}");
        api.fails(Method::PATCH, &vm_path, Some(paused), 409).await;
        api.ok(Method::PATCH, &vm_path, Some(json!({"status": "resume"})))
            .await;
        assert_eq!(
            vm_status(&api.ok(Method::GET, &vm_path, None).await),
            "RUNNING"
        );
        assert_eq!(api.cmd(PATH_NAME, "echo back").await.0, "back\n");

        // A second VM through the unprefixed routes; stop and restart it.
        let second = api
            .ok(
                Method::POST,
                "/vms",
                Some(json!({"vmName": "second", "x": 1})),
            )
            .await;
        assert_eq!(vm_status(&second), "RUNNING");
        let listed = api.ok(Method::GET, "/vms", None).await;
        let mut names: Vec<&str> = listed["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|vm| vm["vmName"].as_str().unwrap())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["my sb ü", "second"]);
        api.fails(
            Method::POST,
            "/v1/vms",
            Some(json!({"vmName": "second"})),
            409,
        )
        .await;
        api.cmd("second", "echo kept > /root/kept").await;
        api.ok(
            Method::PATCH,
            "/vms/second",
            Some(json!({"status": "stopped"})),
        )
        .await;
        assert_eq!(
            vm_status(&api.ok(Method::GET, "/vms/second", None).await),
            "STOPPED"
        );
        let stopped = api
            .fails(
                Method::POST,
                "/vms/second/cmd",
                Some(json!({"cmd": "true"})),
                409,
            )
            .await;
        assert!(stopped.contains("stopped"), "{stopped}");
        let restarted = api
            .ok(Method::POST, "/v1/vms", Some(json!({"vmName": "second"})))
            .await;
        assert_eq!(vm_status(&restarted), "RUNNING");
        assert_eq!(
            api.cmd("second", "cat /root/kept").await,
            ("kept\n".into(), String::new())
        );

        // Destroy one, then all.
        assert_eq!(
            api.ok(Method::DELETE, &vm_path, None).await,
            json!({"success": true})
        );
        let gone = api.fails(Method::GET, &vm_path, None, 404).await;
        assert!(gone.contains(NAME), "{gone}");
        api.fails(Method::DELETE, &vm_path, None, 404).await;
        assert_eq!(
            api.ok(Method::DELETE, "/v1/vms", None).await,
            json!({"success": true})
        );
        assert_eq!(
            api.ok(Method::GET, "/v1/vms", None).await,
            json!({"vms": []})
        );
        assert!(pids_under(&env.config.state_dir.join("sandboxes")).is_empty());

        // Error shapes.
        let empty = api.fails(Method::POST, "/v1/vms", None, 400).await;
        assert!(empty.contains("vmName"), "{empty}");
        api.fails(Method::GET, "/v1/vms/nope", None, 404).await;
        api.fails(
            Method::POST,
            "/vms/nope/cmd",
            Some(json!({"cmd": "true"})),
            404,
        )
        .await;
    });
}

/// Commands on the first VM: output, exit texts, any bash, no 30 s cap,
/// background runs.
async fn commands(api: &Api) {
    let vm = PATH_NAME;
    assert_eq!(
        api.cmd(vm, "echo hello world").await,
        ("hello world\n".into(), String::new())
    );
    assert_eq!(
        api.cmd(vm, "echo out; echo err >&2; exit 3").await.1,
        "exit status 3"
    );
    let (both, _) = api.cmd(vm, "echo out; sleep 0.3; echo err >&2").await;
    assert_eq!(both, "out\nerr\n");
    assert_eq!(api.cmd(vm, "kill -9 $$").await.1, "signal: killed");
    // Valid bash the original server's pre-parse rejected.
    assert_eq!(
        api.cmd(vm, "(cd /tmp && pwd); pwd").await,
        ("/tmp\n/tmp/server_files\n".into(), String::new())
    );
    assert_eq!(
        api.cmd(vm, "sleep 31; echo late").await,
        ("late\n".into(), String::new())
    );
    let started = api
        .ok(
            Method::POST,
            &format!("/v1/vms/{vm}/cmd"),
            Some(json!({"cmd": "sleep 1; echo bg > /tmp/bg.txt", "blocking": false})),
        )
        .await;
    assert_eq!(
        started,
        json!({"output": "Command '/usr/bin/bash -c sleep 1; echo bg > /tmp/bg.txt' started in background",
               "error": ""})
    );
    let mut seen = String::new();
    for _ in 0..50 {
        seen = api.cmd(vm, "cat /tmp/bg.txt 2>/dev/null").await.0;
        if seen == "bg\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen, "bg\n", "the background command never finished");
    let empty = api
        .fails(
            Method::POST,
            &format!("/v1/vms/{vm}/cmd"),
            Some(json!({"cmd": ""})),
            400,
        )
        .await;
    assert!(empty.contains("cmd"), "{empty}");
}

/// Upload and download round trips on the first VM, as py-arrakis sends them.
async fn files(api: &Api) {
    let vm = PATH_NAME;
    let files = json!({"files": [
        {"path": "/tmp/a b.txt", "content": "h\u{e9}llo"},
        {"path": "rel/x.txt", "content": "relative\n"},
    ]});
    assert_eq!(
        api.ok(Method::POST, &format!("/v1/vms/{vm}/files"), Some(files))
            .await,
        json!({})
    );
    assert_eq!(api.cmd(vm, "cat rel/x.txt").await.0, "relative\n");
    let got = api
        .ok(
            Method::GET,
            &format!("/v1/vms/{vm}/files?paths=/tmp/a%20b.txt,rel/x.txt,missing.txt"),
            None,
        )
        .await;
    let files = got["files"].as_array().unwrap();
    assert_eq!(files.len(), 3, "{got}");
    assert_eq!(
        files[0],
        json!({"path": "/tmp/a b.txt", "content": "héllo", "error": ""})
    );
    assert_eq!(
        files[1],
        json!({"path": "rel/x.txt", "content": "relative\n", "error": ""})
    );
    assert_eq!(files[2]["path"], "missing.txt");
    assert_eq!(files[2]["content"], "");
    let error = files[2]["error"].as_str().unwrap();
    assert!(error.starts_with("Failed to read file:"), "{error}");
    let missing = api
        .fails(Method::GET, &format!("/vms/{vm}/files"), None, 400)
        .await;
    assert!(missing.contains("paths"), "{missing}");
    let no_files = api
        .fails(
            Method::POST,
            &format!("/vms/{vm}/files"),
            Some(json!({"files": []})),
            400,
        )
        .await;
    assert!(no_files.contains("files"), "{no_files}");
}

/// Exec with exit codes, env and streaming; raw and tar file transfer;
/// list and stat; metrics.
async fn beyond_the_original(api: &Api, vm: &str) {
    let reply = api
        .ok(
            Method::POST,
            &format!("{vm}/exec"),
            Some(
                json!({"argv": ["sh", "-c", "echo $GREETING $MINE; echo oops >&2; exit 3"],
                        "env": {"MINE": "mine"}}),
            ),
        )
        .await;
    assert_eq!(reply["exitCode"], 3, "{reply}");
    assert_eq!(reply["stdout"], "hi there mine\n");
    assert_eq!(reply["stderr"], "oops\n");
    // `cmd` runs with the sandbox's env too.
    assert_eq!(api.cmd(PATH_NAME, "echo $GREETING").await.0, "hi there\n");

    // Streaming: the first line arrives while the command still runs.
    let started = std::time::Instant::now();
    let mut response = api
        .http
        .post(format!("{}{vm}/exec", api.base))
        .header("accept", "text/event-stream")
        .json(&json!({"shell": "echo one; sleep 2; echo two"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut text = String::new();
    let mut first_at = None;
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if first_at.is_none() && text.contains("one") {
            first_at = Some(started.elapsed());
        }
    }
    let total = started.elapsed();
    let first_at = first_at.unwrap_or_else(|| panic!("no first line in {text:?}"));
    assert!(
        total - first_at >= Duration::from_millis(1500),
        "the first line came at {first_at:?}, the end at {total:?}: not streamed"
    );
    assert!(
        text.contains("event: stdout\ndata: {\"data\":\"one\\n\"}"),
        "{text}"
    );
    assert!(
        text.contains("event: exit\ndata: {\"exitCode\":0,"),
        "{text}"
    );

    // Raw bytes up and down, with every byte value.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let written = api
        .http
        .put(format!(
            "{}{vm}/fs/file?path=bin/all.bin&mode=600",
            api.base
        ))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(written.status(), StatusCode::OK);
    let back = api
        .http
        .get(format!(
            "{}{vm}/fs/file?path=/tmp/server_files/bin/all.bin",
            api.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(back.status(), StatusCode::OK);
    assert_eq!(back.bytes().await.unwrap().as_ref(), bytes.as_slice());
    let stat = api
        .ok(Method::GET, &format!("{vm}/fs/stat?path=bin/all.bin"), None)
        .await;
    assert_eq!(
        (
            stat["name"].clone(),
            stat["size"].clone(),
            stat["mode"].clone()
        ),
        (json!("all.bin"), json!(300_000), json!("600"))
    );
    api.fails(Method::GET, &format!("{vm}/fs/stat?path=nope"), None, 404)
        .await;

    // A directory as tar: down, then up somewhere else, then listed.
    api.cmd(
        PATH_NAME,
        "mkdir -p tree/sub && echo a > tree/a && ln -s a tree/l && cp bin/all.bin tree/sub/",
    )
    .await;
    let tar = api
        .http
        .get(format!("{}{vm}/fs/archive?path=tree", api.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let copied = api
        .http
        .put(format!("{}{vm}/fs/archive?path=/tmp/copy", api.base))
        .body(tar)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(copied["entries"], 4, "{copied}");
    let (out, err) = api
        .cmd(
            PATH_NAME,
            "cd /tmp/copy && readlink l && cat a && cmp sub/all.bin /tmp/server_files/bin/all.bin && echo same",
        )
        .await;
    assert_eq!((out.as_str(), err.as_str()), ("a\na\nsame\n", ""));
    let listing = api
        .ok(Method::GET, &format!("{vm}/fs/list?path=/tmp/copy"), None)
        .await;
    let kinds: Vec<(&str, &str)> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("a", "file"), ("l", "symlink"), ("sub", "dir")]);
    let bad = api
        .http
        .put(format!("{}{vm}/fs/archive?path=/tmp/bad", api.base))
        .body(vec![7u8; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    port_forwards(api).await;

    let metrics = api
        .http
        .get(format!("{}/metrics", api.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("arrakis_sandboxes{state=\"running\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("arrakis_operation_duration_seconds_count{operation=\"boot\"} 2"));
}

/// A VM created with a port forward: the host's loopback port reaches a
/// server in the guest; forwards are added and removed at runtime; user
/// mode refuses to change the egress policy; destroying the VM frees the
/// ports.
async fn port_forwards(api: &Api) {
    let vm = api
        .ok(
            Method::POST,
            "/v1/vms",
            Some(json!({"vmName": "fwd", "portForwards": [{"guestPort": 8000, "description": "web"}]})),
        )
        .await;
    let forwards = vm["portForwards"].as_array().unwrap().clone();
    assert_eq!(forwards.len(), 7, "the 6 defaults and ours: {vm}");
    let web = forwards.iter().find(|f| f["guestPort"] == "8000").unwrap();
    assert_eq!(web["description"], "web");
    let host_port: u16 = web["hostPort"].as_str().unwrap().parse().unwrap();
    assert_ne!(host_port, 0);
    assert_eq!(
        api.ok(Method::GET, "/v1/vms/fwd", None).await["portForwards"],
        json!(forwards)
    );
    api.ok(
        Method::POST,
        "/v1/vms/fwd/exec",
        Some(
            json!({"shell": "mkdir -p /srv && echo served-from-guest > /srv/index.html && \
            (cd /srv && setsid python3 -m http.server 8000 >/dev/null 2>&1 &)"}),
        ),
    )
    .await;
    assert_eq!(fetch(host_port).await, "served-from-guest\n");
    let vm = api
        .ok(
            Method::POST,
            "/v1/vms/fwd/portForwards",
            Some(json!({"portForwards": [{"guestPort": 8000, "description": "again"}]})),
        )
        .await;
    let again = vm["portForwards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["description"] == "again")
        .unwrap()["hostPort"]
        .as_str()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    assert_eq!(fetch(again).await, "served-from-guest\n");
    let vm = api
        .ok(
            Method::DELETE,
            &format!("/v1/vms/fwd/portForwards?hostPort={again}"),
            None,
        )
        .await;
    assert_eq!(vm["portForwards"].as_array().unwrap().len(), 7);
    std::net::TcpListener::bind(("0.0.0.0", again)).expect("a removed forward frees its port");
    let (status, body) = api
        .call(
            Method::PUT,
            "/v1/vms/fwd/egress",
            Some(json!({"egress": "allow"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("user-mode"), "{body}");
    api.ok(Method::DELETE, "/v1/vms/fwd", None).await;
    // The listener is gone with the VM: the port can be bound again.
    std::net::TcpListener::bind(("0.0.0.0", host_port)).expect("the port is free again");
}

/// The body of `/index.html` on the host's loopback `port`, retried while
/// the guest server starts.
async fn fetch(port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/index.html");
    for _ in 0..50 {
        if let Ok(reply) = reqwest::get(&url).await {
            if reply.status().is_success() {
                return reply.text().await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("nothing served on {url}");
}
