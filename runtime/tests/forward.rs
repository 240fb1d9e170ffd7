//! TCP to guest ports tunnelled over the agent session, against a real VM:
//! an HTTP GET to `python3 -m http.server`, 10 MiB both ways through an echo
//! server, one-way throughput, a refused port, and a tunnel that lives
//! through a pause and resume. Needs the artifacts of `scripts/setup` (see
//! `tests/vm.rs`); prints the throughput it measures.

use std::future::Future;
use std::time::{Duration, Instant};

use arrakis_protocol::{Command, ErrorCode, ExecRequest};
use arrakis_runtime::agent::TcpTunnel;
use arrakis_runtime::testing::{run_bounded, VmTestEnv};
use arrakis_runtime::{AgentClient, AgentError, ExecOptions, SandboxSpec, WriteOptions};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TEST_TIMEOUT: Duration = Duration::from_secs(300);

fn run<F: Future<Output = ()>>(body: F) {
    run_bounded(TEST_TIMEOUT, "arrakis_runtime=info", body);
}

/// Guest services on loopback: 9000 echoes (and half-closes after the
/// client's EOF), 9001 sends the number of bytes asked for on its first
/// line, 9002 swallows everything and answers with the count.
const SERVICES: &str = r#"
import socket, threading

def serve(port, handler):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=handler, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()

def echo(c):
    while True:
        b = c.recv(65536)
        if not b:
            break
        c.sendall(b)
    c.shutdown(socket.SHUT_WR)
    c.close()

def source(c):
    line = b""
    while not line.endswith(b"\n"):
        line += c.recv(1)
    left = int(line)
    block = bytes(range(256)) * 256
    while left > 0:
        n = min(left, len(block))
        c.sendall(block[:n])
        left -= n
    c.close()

def sink(c):
    total = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        total += len(b)
    c.sendall(str(total).encode())
    c.close()

serve(9000, echo)
serve(9001, source)
serve(9002, sink)
threading.Event().wait()
"#;

fn shell(script: &str) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(script.to_string()),
        ..ExecRequest::default()
    }
}

async fn sh(agent: &AgentClient, script: &str) {
    let out = agent
        .exec(shell(script), ExecOptions::default())
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e:?}"));
    assert_eq!(
        out.status.shell_code(),
        0,
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects to `port` in the guest, retrying while the service starts.
async fn connect_when_up(agent: &AgentClient, port: u16) -> TcpTunnel {
    let start = Instant::now();
    loop {
        match agent.connect_tcp(port).await {
            Ok(tunnel) => return tunnel,
            Err(AgentError::Remote { body, .. })
                if body.code == ErrorCode::Unavailable
                    && start.elapsed() < Duration::from_secs(90) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("connect to guest port {port}: {e:?}"),
        }
    }
}

/// A host socket whose other end is spliced into a new tunnel to `port`,
/// as a port forward does it: (client end, the splice task).
async fn forwarded(
    agent: &AgentClient,
    port: u16,
) -> (
    TcpStream,
    tokio::task::JoinHandle<Result<arrakis_runtime::agent::Spliced, AgentError>>,
) {
    let tunnel = connect_when_up(agent, port).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    let splice = tokio::spawn(tunnel.splice(accepted.unwrap().0));
    (client.unwrap(), splice)
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

fn mib_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

#[test]
fn tcp_tunnels_reach_guest_services() {
    let env = VmTestEnv::new();
    run(async {
        let manager = env.manager().await;
        let info = manager
            .create(SandboxSpec::named("fwd"))
            .await
            .expect("create");
        println!("accelerator: {:?}", info.accel);
        let agent = manager.agent("fwd").await.unwrap();

        // Services: an HTTP server over a known file, and the raw ones.
        let mut page = &b"hello through the tunnel\n"[..];
        agent
            .write_file(
                "/root/www/hello.txt",
                &mut page,
                WriteOptions {
                    create_parents: true,
                    ..WriteOptions::default()
                },
            )
            .await
            .unwrap();
        let mut script = SERVICES.as_bytes();
        agent
            .write_file("/root/services.py", &mut script, WriteOptions::default())
            .await
            .unwrap();
        sh(
            &agent,
            "cd /root/www && setsid python3 -m http.server 8000 --bind 127.0.0.1 >/tmp/http.log 2>&1 </dev/null &
             setsid python3 /root/services.py >/tmp/services.log 2>&1 </dev/null &",
        )
        .await;

        // A port nothing listens on: a clear error, and the session lives on.
        match agent.connect_tcp(8999).await {
            Err(AgentError::Remote { body, .. }) if body.message.contains("unknown variant") => {
                panic!(
                    "the agent in the initramfs predates `connect`; rebuild it with scripts/build-initramfs: {}",
                    body.message
                )
            }
            Err(AgentError::Remote { op, body }) => {
                assert_eq!(op, "connect");
                assert_eq!(body.code, ErrorCode::Unavailable);
                assert!(
                    body.message.contains("connection refused on port 8999"),
                    "{}",
                    body.message
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        agent.ping().await.unwrap();

        // HTTP GET through a spliced host socket.
        let (mut client, splice) = forwarded(&agent, 8000).await;
        client
            .write_all(b"GET /hello.txt HTTP/1.0\r\nHost: guest\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.0 200"), "{response}");
        assert!(
            response.ends_with("\r\n\r\nhello through the tunnel\n"),
            "{response}"
        );
        drop(client);
        let spliced = splice.await.unwrap().unwrap();
        assert_eq!(spliced.from_guest as usize, response.len());

        // 10 MiB both ways at once through the echo server, byte exact.
        const ECHO: usize = 10 << 20;
        let input = pattern(ECHO, 7);
        let (client, splice) = forwarded(&agent, 9000).await;
        let (mut rd, mut wr) = client.into_split();
        let started = Instant::now();
        let body = input.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&body).await.unwrap();
            wr.shutdown().await.unwrap();
            wr
        });
        let mut echoed = Vec::with_capacity(ECHO);
        rd.read_to_end(&mut echoed).await.unwrap();
        let elapsed = started.elapsed();
        let _wr = writer.await.unwrap();
        assert_eq!(echoed.len(), ECHO);
        assert_eq!(
            format!("{:x}", Sha256::digest(&echoed)),
            format!("{:x}", Sha256::digest(&input)),
            "the echo differs"
        );
        let spliced = splice.await.unwrap().unwrap();
        assert_eq!(
            (spliced.to_guest, spliced.from_guest),
            (ECHO as u64, ECHO as u64)
        );
        println!(
            "echo: 10 MiB each way in {:.2} s ({:.1} MiB/s each way)",
            elapsed.as_secs_f64(),
            mib_per_s(ECHO, elapsed)
        );

        // One way: guest -> host, then host -> guest.
        const ONE_WAY: usize = 32 << 20;
        let (mut client, splice) = forwarded(&agent, 9001).await;
        let started = Instant::now();
        client
            .write_all(format!("{ONE_WAY}\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::with_capacity(ONE_WAY);
        client.read_to_end(&mut got).await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(got.len(), ONE_WAY);
        let block: Vec<u8> = (0..=255u8).cycle().take(65536).collect();
        assert!(got.chunks(65536).all(|c| c == &block[..c.len()]));
        drop(client);
        splice.await.unwrap().unwrap();
        println!(
            "guest -> host: 32 MiB in {:.2} s ({:.1} MiB/s)",
            elapsed.as_secs_f64(),
            mib_per_s(ONE_WAY, elapsed)
        );

        let (mut client, splice) = forwarded(&agent, 9002).await;
        let upload = pattern(ONE_WAY, 3);
        let started = Instant::now();
        client.write_all(&upload).await.unwrap();
        client.shutdown().await.unwrap();
        let mut count = String::new();
        client.read_to_string(&mut count).await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(count, ONE_WAY.to_string());
        splice.await.unwrap().unwrap();
        println!(
            "host -> guest: 32 MiB in {:.2} s ({:.1} MiB/s)",
            elapsed.as_secs_f64(),
            mib_per_s(ONE_WAY, elapsed)
        );

        // A tunnel opened before a pause carries on after the resume, and
        // the manager's agent (what port forwards ask for per connection)
        // opens new ones.
        let (client, splice) = forwarded(&agent, 9000).await;
        let (mut rd, mut wr) = client.into_split();
        wr.write_all(b"before pause\n").await.unwrap();
        let mut line = [0u8; 13];
        rd.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"before pause\n");
        manager.pause("fwd").await.expect("pause");
        manager.resume("fwd").await.expect("resume");
        wr.write_all(b"after resume\n").await.unwrap();
        rd.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"after resume\n");
        wr.shutdown().await.unwrap();
        assert_eq!(rd.read(&mut line).await.unwrap(), 0);
        splice.await.unwrap().unwrap();
        let agent = manager.agent("fwd").await.unwrap();
        let (mut client, splice) = forwarded(&agent, 8000).await;
        client
            .write_all(b"GET /hello.txt HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        client.read_to_string(&mut response).await.unwrap();
        assert!(response.starts_with("HTTP/1.0 200"), "{response}");
        // The server closed; the tunnel ends once the client closes too.
        drop(client);
        splice.await.unwrap().unwrap();

        manager.destroy("fwd").await.expect("destroy");
    });
}
