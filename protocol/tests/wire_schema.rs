//! Freezes wire format version 1. If one of these fails, the change breaks
//! agents already baked into images and snapshots: bump PROTOCOL_VERSION and
//! teach both ends the old form instead of editing the expected bytes.

use std::collections::BTreeMap;

use arrakis_protocol::frame::{Frame, Hello, HelloAck, Kind, CHUNK, MAX_PAYLOAD, SYNC, WINDOW};
use arrakis_protocol::*;
use bytes::BytesMut;

#[test]
fn constants() {
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(&SYNC, b"\0ARRAKIS-SYNC-v1");
    assert_eq!(MAX_PAYLOAD, 1_048_576);
    assert_eq!(WINDOW, 524_288);
    assert_eq!(CHUNK, 65_536);
    let kinds = [
        (Kind::Hello, 1),
        (Kind::HelloAck, 2),
        (Kind::Open, 3),
        (Kind::Message, 4),
        (Kind::Data, 5),
        (Kind::Eof, 6),
        (Kind::Close, 7),
        (Kind::Credit, 8),
        (Kind::Reset, 9),
    ];
    for (kind, number) in kinds {
        assert_eq!(kind as u8, number);
        assert_eq!(Kind::try_from(number).unwrap(), kind);
    }
    for (channel, number) in [
        (Channel::Stdin, 0),
        (Channel::Stdout, 1),
        (Channel::Stderr, 2),
        (Channel::File, 3),
    ] {
        assert_eq!(channel as u8, number);
    }
}

#[test]
fn frame_layout() {
    let mut buf = BytesMut::new();
    Frame::data(3, Channel::Stderr, b"hi").encode(&mut buf);
    assert_eq!(&buf[..], &[0, 0, 0, 8, 0, 0, 0, 3, 5, 2, b'h', b'i']);
    buf.clear();
    Frame::credit(5, 65536).encode(&mut buf);
    assert_eq!(&buf[..], &[0, 0, 0, 9, 0, 0, 0, 5, 8, 0, 1, 0, 0]);
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap()
}

#[test]
fn greetings() {
    assert_eq!(
        json(&Hello {
            version: 1,
            nonce: 9
        }),
        r#"{"version":1,"nonce":9}"#
    );
    let ack = HelloAck {
        version: 1,
        nonce: 9,
        agent_version: "0.1.0".into(),
    };
    assert_eq!(
        json(&ack),
        r#"{"version":1,"nonce":9,"agent_version":"0.1.0"}"#
    );
}

#[test]
fn requests() {
    let exec = Request::Exec(ExecRequest {
        command: Command::Shell("echo hi".into()),
        env: BTreeMap::from([("A".into(), "1".into())]),
        cwd: Some("/tmp".into()),
        user: Some("arrakis".into()),
        timeout_ms: Some(1000),
        stdin: true,
        ..ExecRequest::default()
    });
    let cases = [
        (Request::Ping, r#"{"op":"ping"}"#.to_string()),
        (Request::Info, r#"{"op":"info"}"#.to_string()),
        (
            exec,
            r#"{"op":"exec","command":{"shell":"echo hi"},"env":{"A":"1"},"cwd":"/tmp","user":"arrakis","timeout_ms":1000,"stdin":true}"#.to_string(),
        ),
        (
            Request::Exec(ExecRequest {
                command: Command::Argv(vec!["ls".into(), "-l".into()]),
                ..ExecRequest::default()
            }),
            r#"{"op":"exec","command":{"argv":["ls","-l"]},"env":{},"cwd":null,"user":null,"timeout_ms":null,"stdin":false}"#.to_string(),
        ),
        (
            Request::ReadFile(ReadFileRequest { path: "/a".into(), offset: 4, length: Some(2) }),
            r#"{"op":"read_file","path":"/a","offset":4,"length":2}"#.to_string(),
        ),
        (
            Request::WriteFile(WriteFileRequest {
                path: "/a".into(),
                mode: Some(0o600),
                create_parents: true,
                append: false,
            }),
            r#"{"op":"write_file","path":"/a","mode":384,"create_parents":true,"append":false}"#.to_string(),
        ),
        (
            Request::Mkdir(MkdirRequest { path: "/d".into(), parents: true, mode: None }),
            r#"{"op":"mkdir","path":"/d","parents":true,"mode":null}"#.to_string(),
        ),
        (Request::List(PathRequest { path: "/".into() }), r#"{"op":"list","path":"/"}"#.to_string()),
        (Request::Stat(PathRequest { path: "/".into() }), r#"{"op":"stat","path":"/"}"#.to_string()),
        (
            Request::Remove(RemoveRequest { path: "/x".into(), recursive: true }),
            r#"{"op":"remove","path":"/x","recursive":true}"#.to_string(),
        ),
        (
            Request::Chmod(ChmodRequest { path: "/x".into(), mode: 0o755 }),
            r#"{"op":"chmod","path":"/x","mode":493}"#.to_string(),
        ),
        (
            Request::SetTime(SetTimeRequest { unix_nanos: 5 }),
            r#"{"op":"set_time","unix_nanos":5}"#.to_string(),
        ),
        (
            Request::Configure(ConfigureRequest {
                hostname: Some("h".into()),
                network: Some(NetworkConfig {
                    interface: "eth0".into(),
                    address: "10.0.0.2/24".into(),
                    gateway: None,
                    nameservers: vec![],
                    mac: Some("02:a5:0a:00:00:02".into()),
                }),
                entropy: Some(vec![1, 2]),
            }),
            r#"{"op":"configure","hostname":"h","network":{"interface":"eth0","address":"10.0.0.2/24","gateway":null,"nameservers":[],"mac":"02:a5:0a:00:00:02"},"entropy":[1,2]}"#.to_string(),
        ),
        (
            Request::Freeze(FreezeRequest { frozen: true, lease_ms: 10_000 }),
            r#"{"op":"freeze","frozen":true,"lease_ms":10000}"#.to_string(),
        ),
        (
            Request::Shutdown(ShutdownRequest { reboot: false }),
            r#"{"op":"shutdown","reboot":false}"#.to_string(),
        ),
        (
            Request::Connect(ConnectRequest { port: 8080 }),
            r#"{"op":"connect","port":8080}"#.to_string(),
        ),
        (
            Request::Attach(AttachRequest { id: "init".into() }),
            r#"{"op":"attach","id":"init"}"#.to_string(),
        ),
    ];
    for (request, wire) in cases {
        assert_eq!(json(&request), wire);
        assert_eq!(serde_json::from_str::<Request>(&wire).unwrap(), request);
    }
}

#[test]
fn replies_and_messages() {
    let cases: Vec<(Outcome, &str)> = vec![
        (Ok(Response::Pong), r#"{"Ok":{"reply":"pong"}}"#),
        (
            Ok(Response::Exited(ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
            })),
            r#"{"Ok":{"reply":"exited","code":null,"signal":9,"timed_out":true}}"#,
        ),
        (
            Ok(Response::FileRead { bytes: 3 }),
            r#"{"Ok":{"reply":"file_read","bytes":3}}"#,
        ),
        (Ok(Response::Done), r#"{"Ok":{"reply":"done"}}"#),
        (
            Ok(Response::Stat(FileStat {
                name: "l".into(),
                kind: FileKind::Symlink,
                size: 1,
                mode: 0o777,
                uid: 0,
                gid: 0,
                mtime: 2,
                link_target: Some("t".into()),
            })),
            r#"{"Ok":{"reply":"stat","name":"l","kind":"symlink","size":1,"mode":511,"uid":0,"gid":0,"mtime":2,"link_target":"t"}}"#,
        ),
        (
            Err(ErrorBody::new(ErrorCode::WrongKind, "is a directory")),
            r#"{"Err":{"code":"wrong_kind","message":"is a directory"}}"#,
        ),
        (
            Err(ErrorBody::new(ErrorCode::Unavailable, "refused")),
            r#"{"Err":{"code":"unavailable","message":"refused"}}"#,
        ),
    ];
    for (outcome, wire) in cases {
        assert_eq!(json(&outcome), wire);
    }
    assert_eq!(
        json(&StreamMessage::Started { pid: 7 }),
        r#"{"msg":"started","pid":7}"#
    );
    assert_eq!(
        json(&StreamMessage::Signal {
            signal: 15,
            group: true
        }),
        r#"{"msg":"signal","signal":15,"group":true}"#
    );
    assert_eq!(json(&StreamMessage::Connected), r#"{"msg":"connected"}"#);
    let resize = StreamMessage::Resize {
        rows: 40,
        cols: 120,
    };
    let wire = r#"{"msg":"resize","rows":40,"cols":120}"#;
    assert_eq!(json(&resize), wire);
    assert_eq!(serde_json::from_str::<StreamMessage>(wire).unwrap(), resize);
}

/// The exec fields added after version 1 shipped: present when set, absent
/// (so older agents still accept the request) when not.
#[test]
fn exec_additions() {
    let request = Request::Exec(ExecRequest {
        command: Command::Argv(vec!["sh".into()]),
        stdin: true,
        keep: Some("init".into()),
        tty: Some(TtySize { rows: 24, cols: 80 }),
        rlimits: vec![Rlimit {
            resource: "RLIMIT_NOFILE".into(),
            soft: 512,
            hard: 1024,
        }],
        groups: vec![10, 20],
        clear_env: true,
        ..ExecRequest::default()
    });
    let wire = concat!(
        r#"{"op":"exec","command":{"argv":["sh"]},"env":{},"cwd":null,"user":null,"#,
        r#""timeout_ms":null,"stdin":true,"keep":"init","tty":{"rows":24,"cols":80},"#,
        r#""rlimits":[{"resource":"RLIMIT_NOFILE","soft":512,"hard":1024}],"#,
        r#""groups":[10,20],"clear_env":true}"#
    );
    assert_eq!(json(&request), wire);
    assert_eq!(serde_json::from_str::<Request>(wire).unwrap(), request);
    // The shortest form still parses, with everything defaulted.
    let minimal = serde_json::from_str::<Request>(r#"{"op":"exec","command":{"shell":"true"}}"#);
    assert_eq!(
        minimal.unwrap(),
        Request::Exec(ExecRequest {
            command: Command::Shell("true".into()),
            ..ExecRequest::default()
        })
    );
    for bad in [
        r#"{"op":"exec","command":{"shell":"true"},"tty":{"rows":1}}"#,
        r#"{"op":"exec","command":{"shell":"true"},"tty":{"rows":1,"cols":1,"x":0}}"#,
        r#"{"op":"exec","command":{"shell":"true"},"rlimits":[{"resource":"RLIMIT_CORE","soft":-1,"hard":0}]}"#,
        r#"{"op":"exec","command":{"shell":"true"},"groups":[-1]}"#,
        r#"{"op":"attach"}"#,
        r#"{"op":"attach","id":"a","pid":1}"#,
        r#"{"msg":"resize","rows":70000,"cols":1}"#,
    ] {
        let parsed = serde_json::from_str::<Request>(bad)
            .map(drop)
            .or_else(|_| serde_json::from_str::<StreamMessage>(bad).map(drop));
        assert!(parsed.is_err(), "{bad}");
    }
}

#[test]
fn keep_ids() {
    for good in ["a", "init", "exec-1.2_x", &"x".repeat(KEEP_ID_MAX)] {
        assert!(valid_keep_id(good), "{good}");
    }
    for bad in ["", "a b", "a/b", "é", "a\0", &"x".repeat(KEEP_ID_MAX + 1)] {
        assert!(!valid_keep_id(bad), "{bad}");
    }
    assert_eq!(RLIMIT_NAMES.len(), 16);
    assert!(RLIMIT_NAMES.contains(&"RLIMIT_NOFILE"));
}

#[test]
fn connect_rejects_what_it_does_not_know() {
    for wire in [
        r#"{"op":"connect"}"#,
        r#"{"op":"connect","port":70000}"#,
        r#"{"op":"connect","port":80,"host":"10.0.0.1"}"#,
    ] {
        assert!(serde_json::from_str::<Request>(wire).is_err(), "{wire}");
    }
}
