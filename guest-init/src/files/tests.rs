//! File requests in a temporary directory.

use std::collections::VecDeque;
use std::os::unix::fs::symlink;
use std::sync::Mutex;

use super::*;

/// Collects what a read sends.
#[derive(Default)]
struct Collect(Mutex<Vec<Bytes>>);

impl Collect {
    fn bytes(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.to_vec())
            .collect()
    }
}

impl FileSink for Collect {
    async fn data(&self, data: Bytes) -> Result<(), Gone> {
        self.0.lock().unwrap().push(data);
        Ok(())
    }
}

/// Replays a fixed sequence of host events.
struct Replay(VecDeque<Incoming>);

impl Replay {
    fn of(content: &[u8], chunk: usize) -> Replay {
        let mut events: VecDeque<Incoming> = content
            .chunks(chunk)
            .map(|c| Incoming::Data(Bytes::copy_from_slice(c)))
            .collect();
        events.push_back(Incoming::Eof);
        Replay(events)
    }
}

impl FileSource for Replay {
    async fn next(&mut self) -> Incoming {
        self.0.pop_front().unwrap_or(Incoming::Cancel)
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn io_kind(err: &FileError) -> Option<io::ErrorKind> {
    match err {
        FileError::Io { source, .. } => Some(source.kind()),
        _ => None,
    }
}

async fn write(path: &Path, content: &[u8], options: WriteOptions) -> Result<u64, FileError> {
    write_file(path, options, &mut Replay::of(content, 7000)).await
}

#[test]
fn relative_paths_resolve_under_the_workdir() {
    assert_eq!(
        resolve("notes/a.txt").unwrap(),
        Path::new("/root/notes/a.txt")
    );
    assert_eq!(resolve("/etc/hosts").unwrap(), Path::new("/etc/hosts"));
    assert_eq!(resolve("a/../b").unwrap(), Path::new("/root/a/../b"));
    for bad in ["", "../etc/passwd", "a/../../x", "a\0b"] {
        let err = resolve(bad).unwrap_err();
        assert!(matches!(err, FileError::BadPath { .. }), "{bad:?}: {err}");
    }
}

#[tokio::test]
async fn binary_round_trip_with_offset_and_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob.bin");
    let content: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    assert!(content.contains(&0) && content.contains(&255));
    assert_eq!(
        write(&path, &content, WriteOptions::default())
            .await
            .unwrap(),
        300_000
    );
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert_eq!(mode_of(&path), 0o644);

    let all = Collect::default();
    assert_eq!(read_file(&path, 0, None, &all).await.unwrap(), 300_000);
    assert_eq!(all.bytes(), content);
    assert!(all.0.lock().unwrap().iter().all(|c| c.len() <= CHUNK));

    let part = Collect::default();
    assert_eq!(
        read_file(&path, 100_000, Some(70_000), &part)
            .await
            .unwrap(),
        70_000
    );
    assert_eq!(part.bytes(), &content[100_000..170_000]);
    let past_end = Collect::default();
    assert_eq!(
        read_file(&path, 299_990, Some(1000), &past_end)
            .await
            .unwrap(),
        10
    );
    let zero = Collect::default();
    assert_eq!(read_file(&path, 0, Some(0), &zero).await.unwrap(), 0);
}

#[tokio::test]
async fn empty_file_and_append() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    assert_eq!(write(&path, b"", WriteOptions::default()).await.unwrap(), 0);
    assert_eq!(std::fs::read(&path).unwrap(), b"");
    let append = WriteOptions {
        append: true,
        ..WriteOptions::default()
    };
    write(&path, b"one\n", append).await.unwrap();
    write(&path, b"two\n", append).await.unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
}

#[tokio::test]
async fn cancelled_write_keeps_the_old_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config");
    std::fs::write(&path, "old").unwrap();
    let mut source = Replay(VecDeque::from([
        Incoming::Data(Bytes::from_static(b"new")),
        Incoming::Cancel,
    ]));
    let err = write_file(&path, WriteOptions::default(), &mut source)
        .await
        .unwrap_err();
    assert!(matches!(err, FileError::Cancelled { .. }));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temp file left behind"
    );
}

#[tokio::test]
async fn modes_parents_symlinks_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/c.txt");
    let err = write(&nested, b"x", WriteOptions::default())
        .await
        .unwrap_err();
    assert_eq!(io_kind(&err), Some(io::ErrorKind::NotFound), "{err}");
    assert!(err.to_string().contains("c.txt"), "{err}");
    let options = WriteOptions {
        create_parents: true,
        mode: Some(0o600),
        append: false,
    };
    write(&nested, b"x", options).await.unwrap();
    assert_eq!(mode_of(&nested), 0o600);

    // An existing file keeps its mode when rewritten.
    std::fs::set_permissions(&nested, std::fs::Permissions::from_mode(0o640)).unwrap();
    write(&nested, b"y", WriteOptions::default()).await.unwrap();
    assert_eq!(mode_of(&nested), 0o640);

    // Writing through a symlink replaces the target, not the link.
    let link = dir.path().join("link");
    symlink(&nested, &link).unwrap();
    write(&link, b"via link", WriteOptions::default())
        .await
        .unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&nested).unwrap(), "via link");

    let err = write(dir.path(), b"x", WriteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, FileError::IsDir { .. }), "{err}");
    let bad_mode = WriteOptions {
        mode: Some(0o10000),
        ..WriteOptions::default()
    };
    assert!(matches!(
        write(&nested, b"", bad_mode).await,
        Err(FileError::BadMode { .. })
    ));
}

#[tokio::test]
async fn reading_missing_files_and_directories_fails() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Collect::default();
    let err = read_file(&dir.path().join("nope"), 0, None, &sink)
        .await
        .unwrap_err();
    assert_eq!(io_kind(&err), Some(io::ErrorKind::NotFound));
    assert!(err.to_string().contains("nope"));
    let err = read_file(dir.path(), 0, None, &sink).await.unwrap_err();
    assert!(matches!(err, FileError::IsDir { .. }));
}

#[test]
fn mkdir_plain_and_parents() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("x/y/z");
    let err = mkdir(&deep, false, None).unwrap_err();
    assert_eq!(io_kind(&err), Some(io::ErrorKind::NotFound));
    mkdir(&deep, true, Some(0o700)).unwrap();
    assert!(deep.is_dir());
    assert_eq!(mode_of(&deep), 0o700);
    mkdir(&deep, true, None).unwrap();
    let err = mkdir(&deep, false, None).unwrap_err();
    assert_eq!(io_kind(&err), Some(io::ErrorKind::AlreadyExists));
    let plain = dir.path().join("plain");
    mkdir(&plain, false, None).unwrap();
    assert_eq!(mode_of(&plain), 0o755);
}

#[test]
fn list_and_stat() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("b.txt"), "12345").unwrap();
    std::fs::create_dir(dir.path().join("a-dir")).unwrap();
    symlink("b.txt", dir.path().join("c-link")).unwrap();
    symlink("/nonexistent", dir.path().join("d-dangling")).unwrap();
    let entries = list(dir.path()).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a-dir", "b.txt", "c-link", "d-dangling"]);
    assert_eq!(entries[0].kind, FileKind::Dir);
    assert_eq!((entries[1].kind, entries[1].size), (FileKind::File, 5));
    assert_eq!(entries[2].kind, FileKind::Symlink);
    assert_eq!(entries[2].link_target.as_deref(), Some("b.txt"));
    assert_eq!(entries[3].link_target.as_deref(), Some("/nonexistent"));

    let link_stat = stat(&dir.path().join("c-link"), "c-link").unwrap();
    assert_eq!(link_stat.name, "c-link");
    assert_eq!(link_stat.kind, FileKind::Symlink);
    assert_eq!(link_stat.link_target.as_deref(), Some("b.txt"));
    let file_stat = stat(&dir.path().join("b.txt"), "b.txt").unwrap();
    assert_eq!((file_stat.size, file_stat.mode & 0o777 != 0), (5, true));
    assert!(file_stat.mtime > 1_600_000_000);
    assert_eq!(file_stat.link_target, None);

    let err = list(&dir.path().join("b.txt")).unwrap_err();
    match &err {
        FileError::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::ENOTDIR)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        io_kind(&stat(&dir.path().join("zz"), "zz").unwrap_err()),
        Some(io::ErrorKind::NotFound)
    );
}

#[test]
fn remove_files_links_and_trees() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let link = dir.path().join("l");
    symlink(&file, &link).unwrap();
    remove(&link, false).unwrap();
    assert!(file.exists() && std::fs::symlink_metadata(&link).is_err());
    remove(&file, false).unwrap();
    assert!(!file.exists());

    let tree = dir.path().join("t");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/file"), "x").unwrap();
    assert!(matches!(
        remove(&tree, false),
        Err(FileError::NotEmpty { .. })
    ));
    remove(&tree, true).unwrap();
    assert!(!tree.exists());
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    remove(&empty, false).unwrap();
    assert!(!empty.exists());

    assert_eq!(
        io_kind(&remove(&tree, true).unwrap_err()),
        Some(io::ErrorKind::NotFound)
    );
    assert!(matches!(
        remove(Path::new("/"), true),
        Err(FileError::RemoveRoot)
    ));
}

#[test]
fn chmod_sets_exact_bits() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    chmod(&file, 0o4751).unwrap();
    assert_eq!(mode_of(&file), 0o4751);
    assert!(matches!(
        chmod(&file, 0o17777),
        Err(FileError::BadMode { .. })
    ));
    assert_eq!(
        io_kind(&chmod(&dir.path().join("missing"), 0o644).unwrap_err()),
        Some(io::ErrorKind::NotFound)
    );
}

#[tokio::test]
async fn writes_never_replace_devices_or_fifos() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates a node.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let err = write(&fifo, b"x", WriteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, FileError::NotRegular { .. }), "{err}");
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    let link = dir.path().join("to-null");
    symlink("/dev/null", &link).unwrap();
    let err = write(&link, b"x", WriteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, FileError::NotRegular { .. }), "{err}");
}
