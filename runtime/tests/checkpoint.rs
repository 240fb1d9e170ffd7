//! Real-VM tests of checkpoints (`Manager::export_snapshot` and
//! `Manager::import_snapshot`): a snapshot exported to a directory, carried
//! through a plain (non-sparse) tar as containerd does, imported and
//! restored; and tampered checkpoints refused without leaving anything.
//!
//! They need the artifacts from `scripts/setup` (under `$ARRAKIS_HOME`,
//! default `~/.cache/arrakis`) and fail, naming what is missing, when those
//! are absent. Each test has its own temporary state directory, kills every
//! QEMU started under it even when it fails, boots one 256 MiB VM at a time
//! and is bounded in time.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command as Process;
use std::time::{Duration, Instant};

use arrakis_protocol::{Command, ExecRequest};
use arrakis_runtime::testing::{pids_under, run_bounded, VmTestEnv as TestEnv};
use arrakis_runtime::{
    AccelKind, AgentClient, ErrorKind, ExecOptions, Manager, RuntimeError, SandboxSpec,
};
use sha2::{Digest, Sha256};

const TEST_TIMEOUT: Duration = Duration::from_secs(600);

const RAM_MB: u32 = 256;

/// A counter in RAM only (`/dev/shm`), advanced by a background process.
const START_COUNTER: &str = "printf '#!/bin/sh\\ni=0\\nwhile :; do i=$((i+1)); echo $i > /dev/shm/counter.new; mv /dev/shm/counter.new /dev/shm/counter; sleep 0.1; done\\n' \
     > /dev/shm/count.sh && chmod +x /dev/shm/count.sh && (setsid /dev/shm/count.sh >/dev/null 2>&1 &)";

fn run<F: Future<Output = ()>>(body: F) {
    run_bounded(TEST_TIMEOUT, "arrakis_runtime=info", body);
}

async fn sh(agent: &AgentClient, script: &str) -> (String, i32) {
    let request = ExecRequest {
        command: Command::Shell(script.to_string()),
        ..ExecRequest::default()
    };
    let out = agent
        .exec(request, ExecOptions::default())
        .await
        .unwrap_or_else(|e| panic!("exec {script:?}: {e:?}"));
    assert!(
        out.stderr.is_empty(),
        "{script:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        out.status.shell_code(),
    )
}

/// The counter's value, once it has one (waits up to 5 s).
async fn counter(agent: &AgentClient) -> u64 {
    for _ in 0..25 {
        let (out, _) = sh(agent, "cat /dev/shm/counter 2>/dev/null || true").await;
        if let Ok(value) = out.parse::<u64>() {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the counter has no value");
}

/// Creates sandbox `name` (256 MiB) with a RAM counter running, a marker
/// in `/dev/shm` and a file on disk; returns its boot id and counter.
async fn prepared_sandbox(manager: &Manager, name: &str) -> (String, u64) {
    manager
        .create(SandboxSpec {
            memory_mb: Some(RAM_MB),
            env: [("GREETING".to_string(), "hi".to_string())].into(),
            ..SandboxSpec::named(name)
        })
        .await
        .expect("create");
    let agent = manager.agent(name).await.unwrap();
    let (boot_id, _) = sh(&agent, "cat /proc/sys/kernel/random/boot_id").await;
    let (_, code) = sh(
        &agent,
        "echo in-ram > /dev/shm/marker && echo on-disk > /root/disk.txt && sync",
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(sh(&agent, START_COUNTER).await.1, 0);
    (boot_id, counter(&agent).await)
}

/// Nothing of any sandbox or snapshot is left in the state directory.
async fn assert_all_gone(env: &TestEnv, manager: &Manager) {
    assert!(manager.list_snapshots().await.unwrap().is_empty());
    assert!(manager.list().await.unwrap().is_empty());
    assert!(pids_under(&env.sandboxes_dir()).is_empty());
    for dir in [
        env.layers_dir(),
        env.snapshots_dir(),
        env.ram_dir(),
        env.sandboxes_dir(),
    ] {
        let left = TestEnv::entries(&dir);
        assert!(left.is_empty(), "{} still has {left:?}", dir.display());
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len()
}

fn sh_host(script: &str) {
    let status = Process::new("sh").args(["-c", script]).status().unwrap();
    assert!(status.success(), "{script}");
}

/// `qemu-img info` of `path` as JSON (`-U`: a running VM may hold it).
fn qemu_img_info(path: &Path) -> serde_json::Value {
    let out = Process::new("qemu-img")
        .args(["info", "-U", "--output=json", "--backing-chain"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_checkpoint_carried_through_a_plain_tar_restores_the_running_sandbox() {
    let env = TestEnv::new();
    let work = tempfile::tempdir().unwrap();
    run(async {
        let manager = env.manager().await;
        let (boot_id, count_before) = prepared_sandbox(&manager, "origin").await;
        let snap = manager
            .snapshot("origin", Some("to carry".into()))
            .await
            .expect("snapshot");

        let a = work.path().join("a");
        std::fs::create_dir(&a).unwrap();
        let started = Instant::now();
        let exported = manager
            .export_snapshot("to carry", &a)
            .await
            .expect("export");
        let export_time = started.elapsed();
        let names: Vec<&str> = exported.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["state.bin", "memory.pack", "disk.qcow2", "checkpoint.json"]
        );
        for file in &exported.files {
            let bytes = std::fs::read(a.join(&file.name)).unwrap();
            assert_eq!(bytes.len() as u64, file.size, "{}", file.name);
            assert_eq!(
                format!("{:x}", Sha256::digest(&bytes)),
                file.sha256,
                "{}",
                file.name
            );
        }
        assert_eq!(
            exported.bytes,
            exported.files.iter().map(|f| f.size).sum::<u64>()
        );
        // The disk stands alone: the base image is in it, not under it.
        let chain = qemu_img_info(&a.join("disk.qcow2"));
        assert_eq!(chain.as_array().map(Vec::len), Some(1), "{chain}");
        assert!(chain[0].get("backing-filename").is_none(), "{chain}");
        // A directory that is not empty is refused.
        let err = manager.export_snapshot("to carry", &a).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
        assert!(err.to_string().contains("not empty"), "{err}");

        // The snapshot and its sandbox are gone from this host.
        manager.delete_snapshot("to carry").await.unwrap();
        manager.destroy("origin").await.unwrap();
        assert_all_gone(&env, &manager).await;

        // As containerd does: a tar without sparse support, untarred elsewhere.
        let tar = work.path().join("checkpoint.tar");
        let b = work.path().join("b");
        std::fs::create_dir(&b).unwrap();
        sh_host(&format!(
            "tar -cf {} -C {} . && tar -xf {} -C {}",
            tar.display(),
            a.display(),
            tar.display(),
            b.display()
        ));
        std::fs::remove_dir_all(&a).unwrap();
        let tar_size = file_size(&tar);
        let pack_size = file_size(&b.join("memory.pack"));
        let ram = u64::from(RAM_MB) << 20;
        assert!(
            tar_size < exported.bytes + (1 << 20),
            "the tar ({tar_size} bytes) is much larger than the files ({})",
            exported.bytes
        );
        assert!(
            pack_size < ram / 2,
            "the packed RAM is {pack_size} bytes of {ram}"
        );

        let started = Instant::now();
        let imported = manager.import_snapshot(&b).await.expect("import");
        let import_time = started.elapsed();
        assert_ne!(imported.id, snap.id, "an import gets its own id");
        assert_eq!(
            (
                imported.vcpus,
                imported.memory_mb,
                &imported.image,
                &imported.env,
                imported.accel,
                &imported.sandbox
            ),
            (
                snap.vcpus,
                snap.memory_mb,
                &snap.image,
                &snap.env,
                snap.accel,
                &snap.sandbox
            )
        );
        assert_eq!(
            manager.list_snapshots().await.unwrap(),
            std::slice::from_ref(&imported)
        );
        // The restore needs nothing of the checkpoint directory.
        std::fs::remove_dir_all(&b).unwrap();

        let started = Instant::now();
        let restored = manager
            .restore(&imported.id, "restored")
            .await
            .expect("restore");
        let restore_time = started.elapsed();
        assert_eq!(restored.env["GREETING"], "hi");
        let agent = manager.agent("restored").await.unwrap();
        assert_eq!(
            sh(&agent, "cat /proc/sys/kernel/random/boot_id").await.0,
            boot_id,
            "the restored guest booted again"
        );
        assert_eq!(sh(&agent, "cat /dev/shm/marker").await.0, "in-ram");
        assert_eq!(sh(&agent, "cat /root/disk.txt").await.0, "on-disk");
        let resumed = counter(&agent).await;
        assert!(resumed >= count_before, "{resumed} < {count_before}");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(
            counter(&agent).await > resumed,
            "the counter process did not survive"
        );
        assert_eq!(sh(&agent, "echo $((40 + 2))").await, ("42".into(), 0));
        assert_eq!(sh(&agent, "hostname").await.0, "restored");
        // No disk layer here stands on the base image: the chain of the
        // restored sandbox ends in the imported layer.
        for layer in TestEnv::entries(&env.layers_dir()) {
            let chain = qemu_img_info(&env.layers_dir().join(&layer));
            let bottom = chain.as_array().and_then(|c| c.last()).unwrap();
            assert!(
                bottom.get("backing-filename").is_none() && bottom["format"] == "qcow2",
                "{layer}: {chain}"
            );
        }
        println!(
            "TIMINGS ram_mib={RAM_MB} export_ms={} import_ms={} restore_ms={} \
             tar_bytes={tar_size} files_bytes={} memory_pack_bytes={pack_size} disk_bytes={}",
            export_time.as_millis(),
            import_time.as_millis(),
            restore_time.as_millis(),
            exported.bytes,
            exported
                .files
                .iter()
                .find(|f| f.name == "disk.qcow2")
                .map(|f| f.size)
                .unwrap_or(0),
        );

        drop(agent);
        manager.destroy("restored").await.unwrap();
        manager.delete_snapshot(&imported.id).await.unwrap();
        assert_all_gone(&env, &manager).await;
    });
}

/// Copies checkpoint `src` to a new directory `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("checkpoint.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut manifest);
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

/// Records `file`'s present size and digest in `checkpoint.json`, as a
/// crafter would.
fn reseal(dir: &Path, file: &str) {
    let bytes = std::fs::read(dir.join(file)).unwrap();
    edit_manifest(dir, |m| {
        m["files"][file] = serde_json::json!({
            "size": bytes.len(),
            "sha256": format!("{:x}", Sha256::digest(&bytes)),
        });
    });
}

fn flip_byte(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn tampered_checkpoints_are_refused_and_leave_nothing() {
    let env = TestEnv::new();
    let work = tempfile::tempdir().unwrap();
    run(async {
        let manager = env.manager().await;
        prepared_sandbox(&manager, "origin").await;
        manager
            .snapshot("origin", Some("original".into()))
            .await
            .expect("snapshot");
        let good = work.path().join("good");
        std::fs::create_dir(&good).unwrap();
        manager
            .export_snapshot("original", &good)
            .await
            .expect("export");
        manager.delete_snapshot("original").await.unwrap();
        manager.destroy("origin").await.unwrap();
        assert_all_gone(&env, &manager).await;

        let (other, taken_under) = match manager.accel().kind() {
            AccelKind::Tcg => ("kvm", "taken under kvm"),
            AccelKind::Kvm => ("tcg", "taken under tcg"),
        };
        let base_image = env
            .config
            .images_dir
            .join(&env.config.default_image)
            .join("rootfs.ext4");
        let mut n = 0;
        let mut refused = |tamper: Box<dyn FnOnce(&Path)>| {
            n += 1;
            let dir: PathBuf = work.path().join(format!("case-{n}"));
            copy_dir(&good, &dir);
            tamper(&dir);
            dir
        };
        type Case = (
            &'static str,
            Box<dyn FnOnce(&Path)>,
            ErrorKind,
            Vec<&'static str>,
        );
        let pack_size = file_size(&good.join("memory.pack"));
        let cases: Vec<Case> = vec![
            (
                "a flipped byte in the RAM",
                Box::new(move |d| flip_byte(&d.join("memory.pack"), pack_size / 2)),
                ErrorKind::InvalidArgument,
                vec!["memory.pack", "sha256"],
            ),
            (
                "a flipped byte in the disk",
                Box::new(|d| flip_byte(&d.join("disk.qcow2"), 1000)),
                ErrorKind::InvalidArgument,
                vec!["disk.qcow2", "sha256"],
            ),
            (
                "a longer device state",
                Box::new(|d| {
                    let path = d.join("state.bin");
                    let mut bytes = std::fs::read(&path).unwrap();
                    bytes.push(0);
                    std::fs::write(&path, bytes).unwrap();
                }),
                ErrorKind::InvalidArgument,
                vec!["state.bin", "bytes"],
            ),
            (
                "a disk with a backing file",
                Box::new(move |d| {
                    let disk = d.join("disk.qcow2");
                    std::fs::remove_file(&disk).unwrap();
                    sh_host(&format!(
                        "qemu-img create -q -f qcow2 -F raw -b {} {}",
                        base_image.display(),
                        disk.display()
                    ));
                    reseal(d, "disk.qcow2");
                }),
                ErrorKind::InvalidArgument,
                vec!["disk.qcow2", "backing file"],
            ),
            (
                "a disk with an external data file",
                Box::new(|d| {
                    let disk = d.join("disk.qcow2");
                    std::fs::remove_file(&disk).unwrap();
                    sh_host(&format!(
                        "qemu-img create -q -f qcow2 -o data_file={} {} 1M",
                        d.join("data.raw").display(),
                        disk.display()
                    ));
                    reseal(d, "disk.qcow2");
                }),
                ErrorKind::InvalidArgument,
                vec!["disk.qcow2", "external file"],
            ),
            (
                "a disk that is not qcow2",
                Box::new(|d| {
                    std::fs::write(d.join("disk.qcow2"), vec![0u8; 4096]).unwrap();
                    reseal(d, "disk.qcow2");
                }),
                ErrorKind::InvalidArgument,
                vec!["disk.qcow2", "not a qcow2"],
            ),
            (
                "a missing file",
                Box::new(|d| std::fs::remove_file(d.join("state.bin")).unwrap()),
                ErrorKind::InvalidArgument,
                vec!["state.bin", "missing"],
            ),
            (
                "a link instead of a file",
                Box::new(|d| {
                    let state = d.join("state.bin");
                    let elsewhere = d.with_extension("state");
                    std::fs::rename(&state, &elsewhere).unwrap();
                    std::os::unix::fs::symlink(&elsewhere, &state).unwrap();
                }),
                ErrorKind::InvalidArgument,
                vec!["state.bin", "symbolic link"],
            ),
            (
                "an unknown version",
                Box::new(|d| edit_manifest(d, |m| m["version"] = 2.into())),
                ErrorKind::InvalidArgument,
                vec!["checkpoint.json", "unknown version 2"],
            ),
            (
                "an unknown field",
                Box::new(|d| edit_manifest(d, |m| m["snapshot"]["extra"] = 1.into())),
                ErrorKind::InvalidArgument,
                vec!["checkpoint.json", "extra"],
            ),
            (
                "overlapping RAM extents",
                Box::new(|d| {
                    let path = d.join("memory.pack");
                    let mut bytes = std::fs::read(&path).unwrap();
                    // Extent 1's offset := extent 0's.
                    let first: [u8; 8] = bytes[32..40].try_into().unwrap();
                    bytes[48..56].copy_from_slice(&first);
                    std::fs::write(&path, bytes).unwrap();
                    reseal(d, "memory.pack");
                }),
                ErrorKind::InvalidArgument,
                vec!["memory.pack", "extent 1", "does not start after"],
            ),
            (
                "RAM of another size",
                Box::new(|d| edit_manifest(d, |m| m["snapshot"]["memory_mb"] = 128.into())),
                ErrorKind::InvalidArgument,
                vec!["memory.pack", "expected 134217728"],
            ),
            (
                "another accelerator",
                Box::new(move |d| edit_manifest(d, |m| m["snapshot"]["accel"] = other.into())),
                ErrorKind::FailedPrecondition,
                vec![taken_under, "VMs here run under"],
            ),
            (
                "more memory than allowed",
                Box::new(|d| edit_manifest(d, |m| m["snapshot"]["memory_mb"] = (1 << 30).into())),
                ErrorKind::FailedPrecondition,
                vec!["this runtime allows at most"],
            ),
            (
                "no vCPU",
                Box::new(|d| edit_manifest(d, |m| m["snapshot"]["vcpus"] = 0.into())),
                ErrorKind::InvalidArgument,
                vec!["checkpoint.json", "0 vCPUs"],
            ),
        ];
        for (what, tamper, kind, expected) in cases {
            let dir = refused(tamper);
            let err: RuntimeError = manager.import_snapshot(&dir).await.expect_err(what);
            let message = err.chain();
            println!("refused {what}: {message}");
            assert_eq!(err.kind(), kind, "{what}: {message}");
            for part in expected {
                assert!(message.contains(part), "{what}: {message:?} lacks {part:?}");
            }
            assert_all_gone(&env, &manager).await;
        }

        // The untampered checkpoint still imports.
        let imported = manager.import_snapshot(&good).await.expect("import");
        assert_eq!(manager.list_snapshots().await.unwrap().len(), 1);
        manager.delete_snapshot(&imported.id).await.unwrap();
        assert_all_gone(&env, &manager).await;
    });
}
