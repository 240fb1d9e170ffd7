use std::io::Write;
use std::os::unix::fs::symlink;

use tempfile::TempDir;

use super::pattern::{clean, has_wildcards, Glob};
use super::*;

// --- patterns and .dockerignore --------------------------------------------------------------

fn ignored(rules: &str, path: &str) -> bool {
    IgnoreRules::parse(rules).unwrap().is_ignored(path)
}

#[test]
fn star_and_question_stay_within_one_segment() {
    assert!(ignored("*.log", "a.log"));
    assert!(
        !ignored("*.log", "dir/a.log"),
        "root-level only, as in Docker"
    );
    assert!(ignored("*/*.log", "dir/a.log"));
    assert!(ignored("file?.txt", "file1.txt"));
    assert!(!ignored("file?.txt", "file10.txt"));
    assert!(!ignored("a?b", "a/b"));
}

#[test]
fn double_star_matches_any_number_of_directories() {
    assert!(ignored("**/*.log", "a.log"));
    assert!(ignored("**/*.log", "x/y/a.log"));
    assert!(ignored("a/**/b", "a/b"));
    assert!(ignored("a/**/b", "a/x/y/b"));
    assert!(!ignored("a/**/b", "c/a/x/b"));
    assert!(ignored("**", "anything/at/all"));
    assert!(ignored("logs/**", "logs/x"));
    assert!(
        !ignored("logs/**", "logs"),
        "`dir/**` is the contents, not the directory"
    );
}

#[test]
fn a_pattern_matching_a_directory_excludes_everything_under_it() {
    assert!(ignored("node_modules", "node_modules/pkg/index.js"));
    assert!(
        ignored("/build", "build/out/a.o"),
        "leading slash is stripped"
    );
    assert!(ignored("./target/", "target/debug"), "patterns are cleaned");
    assert!(!ignored("node_modules", "src/node_modules_x"));
}

#[test]
fn exceptions_reinclude_and_the_last_matching_rule_wins() {
    let rules = "*.md\n!README.md\n";
    assert!(ignored(rules, "CHANGES.md"));
    assert!(!ignored(rules, "README.md"));
    let rules = "!README.md\n*.md\n";
    assert!(ignored(rules, "README.md"));
    let rules = "docs\n!docs/keep.md\n";
    assert!(ignored(rules, "docs/other.md"));
    assert!(!ignored(rules, "docs/keep.md"));
    assert!(IgnoreRules::parse(rules).unwrap().has_exceptions());
}

#[test]
fn comments_blank_lines_classes_and_escapes() {
    let rules = "# a comment\n\n   \n[a-c].txt\n\\*literal\n[^x]y\r\n";
    assert!(ignored(rules, "b.txt"));
    assert!(!ignored(rules, "d.txt"));
    assert!(ignored(rules, "*literal"));
    assert!(!ignored(rules, "xliteral"));
    assert!(ignored(rules, "ay"));
    assert!(!ignored(rules, "xy"));
    assert!(!ignored(rules, "# a comment"));
}

#[test]
fn bad_ignore_patterns_name_their_line() {
    assert_eq!(
        IgnoreRules::parse("ok\n!\n"),
        Err((2, PatternError::EmptyExclusion))
    );
    assert_eq!(
        IgnoreRules::parse("a\nb\n[abc\n"),
        Err((3, PatternError::UnterminatedClass))
    );
}

#[test]
fn globs_and_cleaning() {
    let glob = Glob::new("*.rs", false).unwrap();
    assert!(
        glob.matches(".hidden.rs"),
        "`*` matches a leading dot, as in Go"
    );
    assert!(!Glob::new("**", false).unwrap().matches("a/b"));
    assert!(has_wildcards("src/*.rs"));
    assert!(has_wildcards("a[0-9]"));
    assert!(!has_wildcards("plain/path"));
    assert!(!has_wildcards("escaped\\*"));
    assert_eq!(clean("a//b/./c/.."), "a/b");
    assert_eq!(clean("/../x"), "/x");
    assert_eq!(clean("../x"), "../x");
    assert_eq!(clean(""), ".");
}

// --- a context on disk -----------------------------------------------------------------------

/// A build context under construction.
struct Ctx {
    dir: TempDir,
}

impl Ctx {
    fn new() -> Ctx {
        Ctx {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn file(&self, rel: &str, data: &[u8]) -> &Ctx {
        self.file_mode(rel, data, 0o644)
    }

    fn file_mode(&self, rel: &str, data: &[u8], mode: u32) -> &Ctx {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, data).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    fn dir(&self, rel: &str) -> &Ctx {
        fs::create_dir_all(self.path(rel)).unwrap();
        self
    }

    fn link(&self, rel: &str, target: &str) -> &Ctx {
        let path = self.path(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(target, path).unwrap();
        self
    }

    fn open(&self) -> BuildContext {
        BuildContext::open(self.dir.path()).unwrap()
    }
}

/// A sample project: files at the root, a nested source tree, and some junk to ignore.
fn project() -> Ctx {
    let ctx = Ctx::new();
    ctx.file("Dockerfile", b"FROM a\n")
        .file("README.md", b"readme")
        .file("a.txt", b"a")
        .file("b.txt", b"b")
        .file("src/main.rs", b"fn main() {}")
        .file("src/lib.rs", b"")
        .file("src/util/mod.rs", b"// util")
        .file_mode("run.sh", b"#!/bin/sh\n", 0o755);
    ctx
}

fn sources(ctx: &BuildContext, written: &[&str]) -> Result<Vec<Source>, ContextError> {
    let written: Vec<String> = written.iter().map(|s| (*s).to_owned()).collect();
    ctx.resolve_sources(&written)
}

fn paths(sources: &[Source]) -> Vec<String> {
    sources
        .iter()
        .map(|s| s.path.to_string_lossy().into_owned())
        .collect()
}

fn plan(
    ctx: &BuildContext,
    written: &[&str],
    dest: &str,
    dest_is_dir: bool,
) -> Vec<(String, EntryKind)> {
    plan_kind(ctx, written, dest, dest_is_dir, CopyKind::Copy)
}

fn plan_kind(
    ctx: &BuildContext,
    written: &[&str],
    dest: &str,
    dest_is_dir: bool,
    kind: CopyKind,
) -> Vec<(String, EntryKind)> {
    let resolved = sources(ctx, written).unwrap();
    ctx.plan_copy(&resolved, dest, dest_is_dir, kind)
        .unwrap()
        .into_iter()
        .map(|e| (e.dest.to_string_lossy().into_owned(), e.kind))
        .collect()
}

fn file(dest: &str) -> (String, EntryKind) {
    (dest.to_owned(), EntryKind::File)
}

fn dir(dest: &str) -> (String, EntryKind) {
    (dest.to_owned(), EntryKind::Dir)
}

fn digest(ctx: &Ctx, written: &[&str]) -> Digest {
    let context = ctx.open();
    let resolved = sources(&context, written).unwrap();
    context.digest_sources(&resolved).unwrap()
}

#[test]
fn open_rejects_missing_and_non_directories() {
    let ctx = project();
    let e = BuildContext::open(&ctx.path("nope")).unwrap_err();
    assert!(matches!(e, ContextError::Open { .. }));
    assert!(e.to_string().contains("nope"), "{e}");
    let e = BuildContext::open(&ctx.path("a.txt")).unwrap_err();
    assert!(e.to_string().contains("is not a directory"), "{e}");
}

#[test]
fn open_reports_a_bad_dockerignore_line() {
    let ctx = project();
    ctx.file(".dockerignore", b"# ok\n*.log\n!\n");
    let e = BuildContext::open(ctx.dir.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        ".dockerignore line 3: `!` must be followed by a pattern"
    );
}

#[test]
fn literal_sources_resolve_relative_to_the_root() {
    let ctx = project();
    let context = ctx.open();
    let found = sources(
        &context,
        &["a.txt", "/src", "./src/../b.txt", ".", "src/util/"],
    )
    .unwrap();
    assert_eq!(paths(&found), ["a.txt", "src", "b.txt", "", "src/util"]);
    let kinds: Vec<SourceKind> = found.iter().map(|s| s.kind).collect();
    use SourceKind::{Dir, File};
    assert_eq!(kinds, [File, Dir, File, Dir, Dir]);
    assert_eq!(found[2].written, "./src/../b.txt");
}

#[test]
fn absolute_sources_are_taken_under_the_root() {
    let ctx = project();
    let context = ctx.open();
    let found = sources(&context, &["/../../a.txt"]).unwrap();
    assert_eq!(paths(&found), ["a.txt"]);
}

#[test]
fn climbing_out_with_dot_dot_is_rejected() {
    let ctx = project();
    let context = ctx.open();
    for written in ["../secret", "src/../../x", ".."] {
        let e = sources(&context, &[written]).unwrap_err();
        assert!(matches!(e, ContextError::Escapes { .. }), "{written}: {e}");
        assert!(
            e.to_string().contains(&format!(
                "source `{written}` leads outside the build context"
            )),
            "{e}"
        );
    }
}

#[test]
fn a_missing_source_is_named() {
    let ctx = project();
    let e = sources(&ctx.open(), &["a.txt", "missing.txt"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "source `missing.txt` is not in the build context"
    );
    let e = sources(&ctx.open(), &["a.txt/child"]).unwrap_err();
    assert!(matches!(e, ContextError::NotFound { .. }), "{e}");
}

#[test]
fn globs_match_per_segment_in_name_order() {
    let ctx = project();
    let context = ctx.open();
    assert_eq!(
        paths(&sources(&context, &["*.txt"]).unwrap()),
        ["a.txt", "b.txt"]
    );
    assert_eq!(
        paths(&sources(&context, &["src/*.rs"]).unwrap()),
        ["src/lib.rs", "src/main.rs"]
    );
    assert_eq!(
        paths(&sources(&context, &["*/*/mod.rs"]).unwrap()),
        ["src/util/mod.rs"]
    );
    assert_eq!(
        paths(&sources(&context, &["[ab].txt", "?EADME.md"]).unwrap()),
        ["a.txt", "b.txt", "README.md"]
    );
    let e = sources(&context, &["*.none"]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "source pattern `*.none` matches no file in the build context (or only excluded ones)"
    );
}

#[test]
fn ignored_files_are_excluded_from_globs_and_rejected_when_named() {
    let ctx = project();
    ctx.file(".dockerignore", b"b.txt\nsrc/util\n*.md\n");
    let context = ctx.open();
    assert_eq!(paths(&sources(&context, &["*.txt"]).unwrap()), ["a.txt"]);
    let e = sources(&context, &["b.txt"]).unwrap_err();
    assert_eq!(e.to_string(), "source `b.txt` is excluded by .dockerignore");
    let e = sources(&context, &["src/util/mod.rs"]).unwrap_err();
    assert!(matches!(e, ContextError::Ignored { .. }), "{e}");
    let e = sources(&context, &["*.md"]).unwrap_err();
    assert!(matches!(e, ContextError::NoMatch { .. }), "{e}");
    // Copying a directory leaves the ignored parts out.
    assert_eq!(
        plan(&context, &["src"], "/app", false),
        [dir("/app"), file("/app/lib.rs"), file("/app/main.rs")]
    );
}

#[test]
fn exceptions_reinclude_files_in_an_excluded_directory() {
    let ctx = project();
    ctx.file("docs/keep.md", b"keep")
        .file("docs/drop.md", b"drop")
        .file("docs/deep/drop.md", b"drop")
        .file(".dockerignore", b"docs\n!docs/keep.md\n");
    let context = ctx.open();
    assert_eq!(
        plan(&context, &["docs"], "/d", false),
        [dir("/d"), file("/d/keep.md")]
    );
    assert_eq!(
        plan(&context, &["."], "/ctx", true)
            .into_iter()
            .filter(|(d, _)| d.starts_with("/ctx/docs"))
            .collect::<Vec<_>>(),
        [dir("/ctx/docs"), file("/ctx/docs/keep.md")]
    );
}

#[test]
fn the_whole_context_copies_without_ignored_files() {
    let ctx = project();
    ctx.file(".dockerignore", b"src\nDockerfile\n.dockerignore\n");
    let context = ctx.open();
    assert_eq!(
        plan(&context, &["."], "/app", true),
        [
            dir("/app"),
            file("/app/README.md"),
            file("/app/a.txt"),
            file("/app/b.txt"),
            file("/app/run.sh"),
        ]
    );
}

// --- symlinks --------------------------------------------------------------------------------

#[test]
fn a_symlink_source_is_followed_inside_the_context_and_keeps_its_name() {
    let ctx = project();
    ctx.link("current", "src/main.rs").link("srclink", "./src");
    let context = ctx.open();
    let found = sources(&context, &["current", "srclink/util/mod.rs"]).unwrap();
    assert_eq!(found[0].resolved, PathBuf::from("src/main.rs"));
    assert_eq!(found[0].kind, SourceKind::File);
    assert_eq!(found[1].resolved, PathBuf::from("src/util/mod.rs"));
    assert_eq!(
        plan(&context, &["current"], "/bin/", true),
        [file("/bin/current")]
    );
}

#[test]
fn relative_symlinks_out_of_the_context_are_rejected() {
    let ctx = project();
    ctx.link("out", "../../etc/passwd")
        .link("src/up", "../../x");
    let context = ctx.open();
    for written in ["out", "src/up/y"] {
        let e = sources(&context, &[written]).unwrap_err();
        assert!(matches!(e, ContextError::Escapes { .. }), "{e}");
        assert!(e.to_string().contains("points to `../"), "{e}");
    }
}

#[test]
fn absolute_symlinks_must_point_inside_the_context() {
    let ctx = project();
    ctx.link("etc", "/etc");
    let inside = ctx.open().root().join("a.txt");
    ctx.link("abs", inside.to_str().unwrap());
    let context = ctx.open();
    let e = sources(&context, &["etc/passwd"]).unwrap_err();
    assert!(e.to_string().contains("`etc` points to `/etc`"), "{e}");
    let found = sources(&context, &["abs"]).unwrap();
    assert_eq!(found[0].resolved, PathBuf::from("a.txt"));
}

#[test]
fn symlink_loops_are_an_error() {
    let ctx = project();
    ctx.link("loop1", "loop2").link("loop2", "loop1");
    let e = sources(&ctx.open(), &["loop1"]).unwrap_err();
    assert!(matches!(e, ContextError::SymlinkLoop { .. }), "{e}");
}

#[test]
fn a_symlink_whose_target_is_ignored_cannot_be_copied() {
    let ctx = project();
    ctx.link("link", "a.txt").file(".dockerignore", b"a.txt\n");
    let e = sources(&ctx.open(), &["link"]).unwrap_err();
    assert!(matches!(e, ContextError::Ignored { .. }), "{e}");
}

#[test]
fn symlinks_inside_a_copied_directory_are_copied_as_symlinks() {
    let ctx = project();
    ctx.link("src/outside", "/etc/passwd")
        .link("src/rel", "main.rs");
    let context = ctx.open();
    let planned = plan(&context, &["src"], "/app", false);
    assert!(planned.contains(&(
        "/app/outside".to_owned(),
        EntryKind::Symlink("/etc/passwd".into())
    )));
    assert!(planned.contains(&("/app/rel".to_owned(), EntryKind::Symlink("main.rs".into()))));
}

#[test]
fn sockets_are_skipped_in_directories_and_globs() {
    let ctx = project();
    let _listener = std::os::unix::net::UnixListener::bind(ctx.path("src/sock")).unwrap();
    let context = ctx.open();
    let planned = plan(&context, &["src"], "/app", false);
    assert!(planned.iter().all(|(d, _)| d != "/app/sock"), "{planned:?}");
    assert_eq!(
        paths(&sources(&context, &["src/s*"]).unwrap_or_default()),
        Vec::<String>::new()
    );
    let e = sources(&context, &["src/sock"]).unwrap_err();
    assert!(
        e.to_string()
            .contains("neither a regular file nor a directory"),
        "{e}"
    );
}

// --- destinations ----------------------------------------------------------------------------

#[test]
fn a_single_file_to_a_plain_destination_is_that_file() {
    let ctx = project();
    let context = ctx.open();
    assert_eq!(
        plan(&context, &["a.txt"], "/etc/conf", false),
        [file("/etc/conf")]
    );
}

#[test]
fn a_file_into_a_directory_keeps_its_name() {
    let ctx = project();
    let context = ctx.open();
    assert_eq!(
        plan(&context, &["src/main.rs"], "/app", true),
        [file("/app/main.rs")]
    );
}

#[test]
fn several_sources_go_into_the_destination_directory() {
    let ctx = project();
    let context = ctx.open();
    assert_eq!(
        plan(&context, &["*.txt"], "/data", false),
        [file("/data/a.txt"), file("/data/b.txt")]
    );
    assert_eq!(
        plan(&context, &["a.txt", "src/util"], "/x", false),
        [file("/x/a.txt"), dir("/x"), file("/x/mod.rs")]
    );
}

#[test]
fn a_directory_copies_its_contents_not_itself() {
    let ctx = project();
    let context = ctx.open();
    assert_eq!(
        plan(&context, &["src"], "/app/src", false),
        [
            dir("/app/src"),
            file("/app/src/lib.rs"),
            file("/app/src/main.rs"),
            dir("/app/src/util"),
            file("/app/src/util/mod.rs"),
        ]
    );
}

#[test]
fn entries_carry_host_paths_and_modes() {
    let ctx = project();
    let context = ctx.open();
    let resolved = sources(&context, &["run.sh"]).unwrap();
    let entries = context
        .plan_copy(&resolved, "/usr/local/bin/run", false, CopyKind::Copy)
        .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].mode, 0o755);
    assert_eq!(entries[0].host_path, context.root().join("run.sh"));
    assert_eq!(fs::read(&entries[0].host_path).unwrap(), b"#!/bin/sh\n");
}

// --- ADD archives ----------------------------------------------------------------------------

fn tar_bytes() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_path("hello.txt").unwrap();
    header.set_size(5);
    header.set_mode(0o644);
    header.set_cksum();
    builder.append(&header, &b"hello"[..]).unwrap();
    builder.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn add_extracts_local_tar_archives_and_copy_does_not() {
    let ctx = project();
    ctx.file("plain.tar", &tar_bytes())
        .file("files.tgz", &gzip(&tar_bytes()))
        .file(
            "files.tar.zst",
            &zstd::encode_all(&tar_bytes()[..], 3).unwrap(),
        )
        .file("notes.gz", &gzip(b"just some text, not a tar archive"))
        .file("fake.tar", b"not really a tar");
    let context = ctx.open();
    use crate::unpack::Compression as C;
    let add = |src: &str, dest: &str| plan_kind(&context, &[src], dest, false, CopyKind::Add);
    assert_eq!(
        add("plain.tar", "/opt"),
        [("/opt".to_owned(), EntryKind::Archive(C::None))]
    );
    assert_eq!(
        add("files.tgz", "/opt/"),
        [("/opt/".to_owned(), EntryKind::Archive(C::Gzip))]
    );
    assert_eq!(
        add("files.tar.zst", "/o"),
        [("/o".to_owned(), EntryKind::Archive(C::Zstd))]
    );
    assert_eq!(add("notes.gz", "/n"), [file("/n")]);
    assert_eq!(add("fake.tar", "/f"), [file("/f")]);
    assert_eq!(
        plan(&context, &["plain.tar"], "/opt", true),
        [file("/opt/plain.tar")]
    );
}

#[test]
fn add_refuses_archives_it_cannot_extract() {
    let ctx = project();
    ctx.file("x.tar.bz2", b"BZh91AY&SY...")
        .file("x.tar.xz", b"\xfd7zXZ\x00\x00...");
    let context = ctx.open();
    for name in ["x.tar.bz2", "x.tar.xz"] {
        let resolved = sources(&context, &[name]).unwrap();
        let e = context
            .plan_copy(&resolved, "/x", false, CopyKind::Add)
            .unwrap_err();
        assert!(e.to_string().contains("ADD cannot extract"), "{e}");
        assert!(e.to_string().contains(name), "{e}");
    }
}

#[test]
fn tar_headers_are_recognized_by_checksum() {
    assert!(is_tar_header(&tar_bytes()[..512]));
    let mut corrupt = tar_bytes();
    corrupt[0] ^= 1;
    assert!(!is_tar_header(&corrupt[..512]));
    assert!(!is_tar_header(&[0u8; 512]));
    assert!(!is_tar_header(b"short"));
}

// --- digests ---------------------------------------------------------------------------------

#[test]
fn equal_content_gives_equal_digests() {
    let one = project();
    let two = project();
    assert_eq!(digest(&one, &["."]), digest(&two, &["."]));
    assert_eq!(
        digest(&one, &["src", "*.txt"]),
        digest(&two, &["src", "*.txt"])
    );
}

#[test]
fn digests_ignore_times() {
    let ctx = project();
    let before = digest(&ctx, &["src"]);
    let file = File::options()
        .write(true)
        .open(ctx.path("src/main.rs"))
        .unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    assert_eq!(digest(&ctx, &["src"]), before);
}

#[test]
fn one_changed_byte_changes_the_digest() {
    let ctx = project();
    let before = digest(&ctx, &["."]);
    ctx.file("src/util/mod.rs", b"// utiL");
    assert_ne!(digest(&ctx, &["."]), before);
}

#[test]
fn a_changed_mode_changes_the_digest() {
    let ctx = project();
    let before = digest(&ctx, &["src"]);
    fs::set_permissions(ctx.path("src/lib.rs"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_ne!(digest(&ctx, &["src"]), before);
}

#[test]
fn renames_symlink_targets_and_new_files_change_the_digest() {
    let ctx = project();
    ctx.link("src/l", "main.rs");
    let base = digest(&ctx, &["src"]);
    fs::rename(ctx.path("src/lib.rs"), ctx.path("src/lib2.rs")).unwrap();
    let renamed = digest(&ctx, &["src"]);
    assert_ne!(renamed, base);
    fs::remove_file(ctx.path("src/l")).unwrap();
    ctx.link("src/l", "lib2.rs");
    let relinked = digest(&ctx, &["src"]);
    assert_ne!(relinked, renamed);
    ctx.dir("src/empty");
    assert_ne!(digest(&ctx, &["src"]), relinked);
}

#[test]
fn moving_bytes_between_files_changes_the_digest() {
    let one = Ctx::new();
    one.file("d/a", b"xy").file("d/b", b"");
    let two = Ctx::new();
    two.file("d/a", b"x").file("d/b", b"y");
    assert_ne!(digest(&one, &["d"]), digest(&two, &["d"]));
}

#[test]
fn ignored_files_do_not_change_the_digest() {
    let ctx = project();
    ctx.file(".dockerignore", b"*.log\n");
    let before = digest(&ctx, &["."]);
    ctx.file("debug.log", b"noise");
    assert_eq!(digest(&ctx, &["."]), before);
}

#[test]
fn the_source_names_are_part_of_the_digest() {
    let ctx = project();
    ctx.file("c.txt", b"a");
    assert_ne!(digest(&ctx, &["a.txt"]), digest(&ctx, &["c.txt"]));
}
