use std::collections::BTreeMap;

use super::builder::resolve_path;
use super::*;

fn no_args() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ok(text: &str) -> Dockerfile {
    parse(text, &no_args()).unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
}

fn err(text: &str) -> ParseError {
    match parse(text, &no_args()) {
        Ok(df) => panic!("{text:?} should fail, got {df:?}"),
        Err(e) => e,
    }
}

/// The instructions of a Dockerfile whose first line is `FROM base`.
fn instructions(body: &str) -> Vec<Instruction> {
    ok(&format!("FROM base\n{body}"))
        .steps
        .into_iter()
        .map(|s| s.instruction)
        .collect()
}

fn only(body: &str) -> Instruction {
    let mut all = instructions(body);
    assert_eq!(all.len(), 1, "{all:?}");
    all.remove(0)
}

fn copy(body: &str) -> CopyInstruction {
    match only(body) {
        Instruction::Copy(c) => c,
        other => panic!("not a copy: {other:?}"),
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn env_of(df: &Dockerfile) -> Vec<(String, String)> {
    df.config.env.clone()
}

// --- structure ------------------------------------------------------------------------------

#[test]
fn minimal_file_has_base_and_no_steps() {
    let df = ok("FROM alpine:3.20\n");
    assert_eq!(df.from.reference, "alpine:3.20");
    assert_eq!(df.from.alias, None);
    assert_eq!(df.from.line, 1);
    assert!(df.steps.is_empty());
    assert_eq!(df.config.workdir, "/");
    assert!(df.unused_args.is_empty());
}

#[test]
fn instructions_are_case_insensitive_and_keep_line_and_text() {
    let df = ok("from alpine\n\n# comment\nrun echo hi\nWorkDir /app\n");
    assert_eq!(df.steps.len(), 2);
    assert_eq!(df.steps[0].line, 4);
    assert_eq!(df.steps[0].text, "run echo hi");
    assert_eq!(
        df.steps[0].instruction,
        Instruction::Run(Command::Shell("echo hi".into()))
    );
    assert_eq!(df.steps[1].line, 5);
    assert_eq!(df.steps[1].instruction, Instruction::Workdir("/app".into()));
}

#[test]
fn from_with_alias_is_accepted() {
    let df = ok("FROM debian:12 AS build\nRUN true");
    assert_eq!(df.from.reference, "debian:12");
    assert_eq!(df.from.alias.as_deref(), Some("build"));
    let df = ok("FROM debian:12 as build");
    assert_eq!(df.from.alias.as_deref(), Some("build"));
}

#[test]
fn from_with_bad_arguments_is_an_error() {
    let e = err("FROM a b");
    assert_eq!(e.line, 1);
    assert!(e.to_string().contains("AS name"), "{e}");
    let e = err("FROM");
    assert!(matches!(
        e.kind,
        ParseErrorKind::Arguments {
            instruction: "FROM",
            ..
        }
    ));
}

#[test]
fn a_second_from_is_rejected_as_multi_stage() {
    let e = err("FROM a AS one\nRUN x\nFROM b\n");
    assert_eq!(e.line, 3);
    let message = e.to_string();
    assert!(
        message.contains("multi-stage builds are not supported"),
        "{message}"
    );
    assert!(message.starts_with("Dockerfile line 3:"), "{message}");
}

#[test]
fn copy_from_is_rejected_as_multi_stage() {
    let e = err("FROM a\nCOPY --from=build /out /out\n");
    assert_eq!(e.line, 2);
    assert!(matches!(e.kind, ParseErrorKind::MultiStage { .. }));
    assert!(e.to_string().contains("COPY --from"), "{e}");
}

#[test]
fn missing_from_is_an_error() {
    let e = err("# only a comment\nARG X=1\n");
    assert_eq!(e.kind, ParseErrorKind::NoFrom);
    assert_eq!(e.line, 0);
    assert_eq!(e.to_string(), "Dockerfile: there is no FROM instruction");
    assert_eq!(err("").kind, ParseErrorKind::NoFrom);
}

#[test]
fn only_arg_may_precede_from() {
    let e = err("ENV A=1\nFROM a\n");
    assert_eq!(e.line, 1);
    assert!(e.to_string().contains("ENV comes before FROM"), "{e}");
}

#[test]
fn unknown_instructions_name_themselves_the_line_and_the_supported_list() {
    for name in [
        "HEALTHCHECK CMD true",
        "ONBUILD RUN x",
        "SHELL [\"bash\"]",
        "MAINTAINER me",
        "FOO bar",
    ] {
        let e = err(&format!("FROM a\nRUN x\n{name}\n"));
        assert_eq!(e.line, 3, "{name}");
        let keyword = name.split(' ').next().unwrap_or_default();
        let message = e.to_string();
        assert!(message.contains(&format!("`{keyword}`")), "{message}");
        assert!(
            message.contains("supported: FROM, RUN, COPY, ADD"),
            "{message}"
        );
    }
    let e = err("healthcheck NONE\nFROM a");
    assert_eq!(
        e.kind,
        ParseErrorKind::UnknownInstruction {
            name: "HEALTHCHECK".into()
        }
    );
}

// --- lines, comments, continuations, directives ---------------------------------------------

#[test]
fn continuation_lines_join_and_skip_comments_and_blank_lines() {
    let df = ok("FROM a\nRUN apt-get update && \\\n    # a comment inside\n\n    apt-get install -y curl \\   \n    && true\nUSER me\n");
    assert_eq!(df.steps.len(), 2);
    assert_eq!(df.steps[0].line, 2);
    assert_eq!(
        df.steps[0].instruction,
        Instruction::Run(Command::Shell(
            "apt-get update &&     apt-get install -y curl     && true".into()
        ))
    );
    assert_eq!(df.steps[1].line, 7);
}

#[test]
fn crlf_line_endings_and_a_byte_order_mark_are_accepted() {
    let df = ok("\u{feff}FROM a\r\nRUN echo \\\r\n  hi\r\n");
    assert_eq!(df.from.reference, "a");
    assert_eq!(
        df.steps[0].instruction,
        Instruction::Run(Command::Shell("echo   hi".into()))
    );
}

#[test]
fn indented_comments_are_comments() {
    let df = ok("FROM a\n   # indented\n\tRUN x\n");
    assert_eq!(df.steps.len(), 1);
    assert_eq!(df.steps[0].line, 3);
}

#[test]
fn escape_directive_switches_to_backtick() {
    let df = ok("# escape=`\nFROM a\nRUN dir c:\\ `\n  && echo done\nWORKDIR C:\\\\x\n");
    assert_eq!(
        df.steps[0].instruction,
        Instruction::Run(Command::Shell("dir c:\\   && echo done".into()))
    );
    // With the backtick as escape, backslashes are ordinary characters in substitution.
    assert_eq!(
        df.steps[1].instruction,
        Instruction::Workdir("/C:\\\\x".into())
    );
}

#[test]
fn escape_and_syntax_directives_may_combine_and_are_case_insensitive() {
    let df = ok("# syntax=docker/dockerfile:1\n# ESCAPE = `\nFROM a\nENV A=x`$B\n");
    assert_eq!(df.config.env_value("A"), Some("x$B"));
}

#[test]
fn directives_after_a_comment_or_blank_line_are_plain_comments() {
    let df = ok("# a comment\n# escape=`\nFROM a\nENV A=x\\$B\n");
    assert_eq!(df.config.env_value("A"), Some("x$B"));
    let df = ok("\n# escape=`\nFROM a\nENV A=x\\$B\n");
    assert_eq!(df.config.env_value("A"), Some("x$B"));
}

#[test]
fn bad_or_duplicate_directives_are_errors() {
    let e = err("# escape=x\nFROM a");
    assert_eq!(e.line, 1);
    assert!(
        e.to_string().contains("invalid `# escape=` directive `x`"),
        "{e}"
    );
    let e = err("# escape=`\n# escape=\\\nFROM a");
    assert_eq!(e.line, 2);
    assert!(matches!(e.kind, ParseErrorKind::DuplicateDirective { .. }));
}

// --- RUN, CMD, ENTRYPOINT -------------------------------------------------------------------

#[test]
fn run_shell_and_exec_forms() {
    assert_eq!(
        only("RUN echo $HOME > /x"),
        Instruction::Run(Command::Shell("echo $HOME > /x".into()))
    );
    assert_eq!(
        only(r#"RUN ["/bin/echo", "$HOME", "a b"]"#),
        Instruction::Run(Command::Exec(strings(&["/bin/echo", "$HOME", "a b"])))
    );
}

#[test]
fn run_text_that_is_not_json_is_the_shell_form() {
    assert_eq!(
        only("RUN [ -f /etc/passwd ] && echo yes"),
        Instruction::Run(Command::Shell("[ -f /etc/passwd ] && echo yes".into()))
    );
}

#[test]
fn json_arrays_of_non_strings_are_errors() {
    let e = err("FROM a\nCMD [\"a\", 1]");
    assert_eq!(e.line, 2);
    assert_eq!(
        e.kind,
        ParseErrorKind::NotStringArray { instruction: "CMD" }
    );
}

#[test]
fn run_without_a_command_or_with_flags_is_an_error() {
    let e = err("FROM a\nRUN\n");
    assert!(e.to_string().contains("RUN requires a command"), "{e}");
    let e = err("FROM a\nRUN --mount=type=cache,target=/root/.cache pip install x\n");
    assert!(
        e.to_string()
            .contains("RUN does not support the flag `--mount`; accepted: none"),
        "{e}"
    );
}

#[test]
fn heredocs_are_rejected_in_run_and_copy() {
    for body in [
        "RUN <<EOF",
        "RUN cat <<-EOT > /x",
        "RUN python3 <<'PY'",
        "COPY <<EOF /x",
    ] {
        let e = err(&format!("FROM a\n{body}\necho\nEOF\n"));
        assert_eq!(e.line, 2, "{body}");
        assert!(e.to_string().contains("heredocs"), "{e}");
    }
    // Here-strings and redirections are not heredocs.
    assert_eq!(
        only("RUN cat <<< hi && a << b"),
        Instruction::Run(Command::Shell("cat <<< hi && a << b".into()))
    );
}

#[test]
fn cmd_and_entrypoint_forms_become_argv() {
    let df = ok("FROM a\nENTRYPOINT [\"/app\", \"--serve\"]\nCMD run fast\n");
    assert_eq!(df.config.entrypoint, Some(strings(&["/app", "--serve"])));
    assert_eq!(df.config.cmd, Some(strings(&["/bin/sh", "-c", "run fast"])));
    assert_eq!(
        Command::Exec(strings(&["a"])).argv(),
        strings(&["a"]),
        "exec form is used as is"
    );
}

#[test]
fn entrypoint_clears_an_inherited_cmd_but_not_one_set_before() {
    let base = RunConfig {
        cmd: Some(strings(&["bash"])),
        ..RunConfig::default()
    };
    let df = parse_with_base("FROM a\nENTRYPOINT [\"/e\"]\n", &no_args(), &base).unwrap();
    assert_eq!(df.config.cmd, None);
    let df = parse_with_base(
        "FROM a\nCMD [\"x\"]\nENTRYPOINT [\"/e\"]\n",
        &no_args(),
        &base,
    )
    .unwrap();
    assert_eq!(df.config.cmd, Some(strings(&["x"])));
    let df = parse_with_base("FROM a\nUSER me\n", &no_args(), &base).unwrap();
    assert_eq!(df.config.cmd, Some(strings(&["bash"])), "inherited");
}

// --- COPY and ADD ---------------------------------------------------------------------------

#[test]
fn copy_resolves_destination_against_workdir() {
    let df =
        ok("FROM a\nWORKDIR /app\nCOPY src ./src/\nCOPY a.txt b.txt ./\nCOPY f out\nCOPY . .\n");
    let copies: Vec<CopyInstruction> = df
        .steps
        .iter()
        .filter_map(|s| match &s.instruction {
            Instruction::Copy(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(copies[0].sources, strings(&["src"]));
    assert_eq!(copies[0].dest, "/app/src");
    assert!(copies[0].dest_is_dir);
    assert_eq!(copies[1].sources, strings(&["a.txt", "b.txt"]));
    assert_eq!(copies[1].dest, "/app");
    assert!(copies[1].dest_is_dir);
    assert_eq!(copies[2].dest, "/app/out");
    assert!(
        !copies[2].dest_is_dir,
        "single source, no slash: a file name"
    );
    assert_eq!(copies[3].sources, strings(&["."]));
    assert_eq!(copies[3].dest, "/app");
    assert!(copies[3].dest_is_dir);
}

#[test]
fn several_sources_make_the_destination_a_directory() {
    let c = copy("COPY a b /dst");
    assert!(c.dest_is_dir);
    assert_eq!(c.dest, "/dst");
    assert_eq!(copy("COPY a /").dest, "/");
    assert!(copy("COPY a /dst/.").dest_is_dir);
}

#[test]
fn copy_json_form_allows_spaces_and_keeps_quotes() {
    let c = copy(r#"COPY ["my file's.txt", "dir with space/", "/opt/x y/"]"#);
    assert_eq!(c.sources, strings(&["my file's.txt", "dir with space/"]));
    assert_eq!(c.dest, "/opt/x y");
    assert!(c.dest_is_dir);
}

#[test]
fn copy_flags_chown_and_chmod() {
    let c = copy("COPY --chown=app:app --chmod=0755 run.sh /usr/local/bin/");
    assert_eq!(c.chown.as_deref(), Some("app:app"));
    assert_eq!(c.chmod, Some(0o755));
    assert_eq!(c.kind, CopyKind::Copy);
    let c = copy("ADD --chmod=644 -- a /b");
    assert_eq!(c.chmod, Some(0o644));
    assert_eq!(c.sources, strings(&["a"]));
    assert_eq!(c.kind, CopyKind::Add);
}

#[test]
fn copy_chown_is_substituted() {
    let df = ok("FROM a\nARG UID=1000\nCOPY --chown=${UID}:${UID} a /a\n");
    match &df.steps[1].instruction {
        Instruction::Copy(c) => assert_eq!(c.chown.as_deref(), Some("1000:1000")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_copy_flags_are_errors_naming_the_flag() {
    let e = err("FROM a\nCOPY --chmod=u+x a /a\n");
    assert_eq!(e.line, 2);
    assert!(
        e.to_string()
            .contains("invalid COPY flag `--chmod`: `u+x`; expected octal"),
        "{e}"
    );
    let e = err("FROM a\nCOPY --chmod=17777 a /a\n");
    assert!(matches!(
        e.kind,
        ParseErrorKind::FlagValue { flag: "chmod", .. }
    ));
    let e = err("FROM a\nCOPY --chown a /a\n");
    assert!(matches!(
        e.kind,
        ParseErrorKind::FlagValue { flag: "chown", .. }
    ));
    let e = err("FROM a\nADD --link a /a\n");
    assert_eq!(
        e.to_string(),
        "Dockerfile line 2: ADD does not support the flag `--link`; accepted: --chown, --chmod"
    );
}

#[test]
fn chmod_must_be_plain_octal() {
    for value in ["+755", "", "8", "0o755"] {
        let e = err(&format!("FROM a\nCOPY --chmod={value} a /a\n"));
        assert!(
            matches!(e.kind, ParseErrorKind::FlagValue { flag: "chmod", .. }),
            "{value}: {e}"
        );
    }
    assert_eq!(copy("COPY --chmod=4755 a /a").chmod, Some(0o4755));
}

#[test]
fn add_json_form() {
    let c = copy(r#"ADD --chown=1:2 ["app.tar.gz", "/opt/"]"#);
    assert_eq!(c.kind, CopyKind::Add);
    assert_eq!(c.sources, strings(&["app.tar.gz"]));
    assert_eq!(c.dest, "/opt");
    assert!(c.dest_is_dir);
    assert_eq!(c.chown.as_deref(), Some("1:2"));
    let e = err("FROM a\nADD [\"only\"]\n");
    assert!(matches!(
        e.kind,
        ParseErrorKind::Arguments {
            instruction: "ADD",
            ..
        }
    ));
}

#[test]
fn errors_in_continued_instructions_report_the_first_line() {
    let e = err("FROM a\nRUN ok\nENV A=1 \\\n  B\n");
    assert_eq!(e.line, 3);
    assert!(
        e.to_string().starts_with("Dockerfile line 3: `B` in ENV"),
        "{e}"
    );
}

#[test]
fn urls_are_rejected_in_add_and_copy() {
    let e = err("FROM a\nADD https://example.com/x.tar.gz /x/\n");
    assert_eq!(e.line, 2);
    assert_eq!(
        e.kind,
        ParseErrorKind::Url {
            instruction: "ADD",
            path: "https://example.com/x.tar.gz".into()
        }
    );
    assert!(e.to_string().contains("download it with RUN"), "{e}");
    let e = err("FROM a\nADD git@github.com:o/r.git /r\n");
    assert!(matches!(e.kind, ParseErrorKind::Url { .. }));
    let e = err("FROM a\nCOPY HTTP://x/y /y\n");
    assert!(matches!(
        e.kind,
        ParseErrorKind::Url {
            instruction: "COPY",
            ..
        }
    ));
}

#[test]
fn copy_needs_a_source_and_a_destination() {
    let e = err("FROM a\nCOPY onlyone\n");
    assert_eq!(
        e.to_string(),
        "Dockerfile line 2: COPY requires at least one source and a destination"
    );
}

#[test]
fn copy_arguments_are_substituted() {
    let df = ok("FROM a\nARG SRC=build/out\nENV DEST=/srv\nCOPY $SRC/*.js ${DEST}/\n");
    match &df.steps[2].instruction {
        Instruction::Copy(c) => {
            assert_eq!(c.sources, strings(&["build/out/*.js"]));
            assert_eq!(c.dest, "/srv");
            assert!(c.dest_is_dir);
        }
        other => panic!("{other:?}"),
    }
}

// --- ENV, ARG, LABEL and substitution ------------------------------------------------------

#[test]
fn env_forms() {
    let df = ok(concat!(
        "FROM a\n",
        "ENV A=1 B=\"two words\" C='single $A' D=x\\ y\n",
        "ENV LEGACY value with spaces\n",
        "ENV E=\n",
    ));
    assert_eq!(
        env_of(&df),
        pairs(&[
            ("A", "1"),
            ("B", "two words"),
            ("C", "single $A"),
            ("D", "x y"),
            ("LEGACY", "value with spaces"),
            ("E", ""),
        ])
    );
}

#[test]
fn env_values_in_one_instruction_see_the_previous_values() {
    let df = ok("FROM a\nENV A=old\nENV A=new B=$A\n");
    assert_eq!(df.config.env_value("A"), Some("new"));
    assert_eq!(df.config.env_value("B"), Some("old"));
}

#[test]
fn env_reset_keeps_its_position() {
    let df = ok("FROM a\nENV A=1 B=2\nENV A=3\n");
    assert_eq!(env_of(&df), pairs(&[("A", "3"), ("B", "2")]));
}

#[test]
fn env_syntax_errors_name_the_word() {
    let e = err("FROM a\nENV A=1 B\n");
    assert_eq!(e.line, 2);
    assert_eq!(
        e.to_string(),
        "Dockerfile line 2: `B` in ENV is not of the form `name=value`"
    );
    let e = err("FROM a\nENV ONLYNAME\n");
    assert!(e.to_string().contains("ENV requires"), "{e}");
    let e = err("FROM a\nENV =x\n");
    assert!(e.to_string().contains("ENV has an empty name"), "{e}");
    let e = err("FROM a\nENV A=\"unterminated\n");
    assert!(e.to_string().contains("unterminated double quote"), "{e}");
}

#[test]
fn substitution_forms() {
    let df = ok(concat!(
        "FROM a\n",
        "ENV SET=v EMPTY=\n",
        "ENV A=$SET B=${SET} C=${UNSET:-def} D=${EMPTY:-def} E=${EMPTY-def}\n",
        "ENV F=${SET:+alt} G=${UNSET:+alt} H=${EMPTY+alt} I=\\$SET J=\"\\$SET\" K='$SET'\n",
        "ENV L=${UNSET:-${SET}x} M=pre${SET}post N=$SET/x O=\"$SET a\" P=$ Q=$UNSET\n",
    ));
    let expected = [
        ("A", "v"),
        ("B", "v"),
        ("C", "def"),
        ("D", "def"),
        ("E", ""),
        ("F", "alt"),
        ("G", ""),
        ("H", "alt"),
        ("I", "$SET"),
        ("J", "$SET"),
        ("K", "$SET"),
        ("L", "vx"),
        ("M", "prevpost"),
        ("N", "v/x"),
        ("O", "v a"),
        ("P", "$"),
        ("Q", ""),
    ];
    for (key, value) in expected {
        assert_eq!(df.config.env_value(key), Some(value), "{key}");
    }
}

#[test]
fn required_and_unsupported_substitutions_are_errors() {
    let e = err("FROM a\nENV A=\"${NOPE:?must be set}\"\n");
    assert_eq!(e.line, 2);
    assert!(e.to_string().contains("NOPE: must be set"), "{e}");
    let e = err("FROM a\nENV A=${NOPE?}\n");
    assert!(
        e.to_string().contains("NOPE: is not allowed to be unset"),
        "{e}"
    );
    let e = err("FROM a\nENV A=${X#prefix}\n");
    assert!(e.to_string().contains("unsupported modifier `#`"), "{e}");
    let e = err("FROM a\nENV A=${X\n");
    assert!(e.to_string().contains("missing `}`"), "{e}");
    let e = err("FROM a\nWORKDIR ${}\n");
    assert!(e.to_string().contains("bad substitution"), "{e}");
}

#[test]
fn run_is_not_substituted_but_records_its_environment() {
    let df = ok("FROM a\nARG VERSION=1.2\nENV PATH=/opt/bin:/usr/bin\nRUN echo $VERSION\n");
    let run = &df.steps[2];
    assert_eq!(
        run.instruction,
        Instruction::Run(Command::Shell("echo $VERSION".into()))
    );
    assert_eq!(
        run.config.run_env(),
        pairs(&[("VERSION", "1.2"), ("PATH", "/opt/bin:/usr/bin")])
    );
    // ARGs are not in the image config.
    let config = df.config.to_run_config();
    assert_eq!(config.env, Some(strings(&["PATH=/opt/bin:/usr/bin"])));
}

#[test]
fn each_run_sees_the_environment_of_its_time() {
    let df = ok("FROM a\nENV A=1\nRUN one\nENV A=2\nRUN two\n");
    assert_eq!(df.steps[1].config.run_env(), pairs(&[("A", "1")]));
    assert_eq!(df.steps[3].config.run_env(), pairs(&[("A", "2")]));
}

#[test]
fn env_overrides_arg_of_the_same_name() {
    let df = ok("FROM a\nARG V=arg\nENV V=env\nARG V\nWORKDIR /$V\nRUN x\n");
    assert_eq!(df.config.workdir, "/env");
    assert_eq!(df.steps[4].config.run_env(), pairs(&[("V", "env")]));
}

#[test]
fn build_args_override_defaults_and_unused_ones_are_reported() {
    let build = args(&[
        ("VERSION", "2.0"),
        ("TYPO", "x"),
        ("HTTP_PROXY", "http://p:3128"),
    ]);
    let df = parse("FROM a\nARG VERSION=1.0\nARG OTHER=o\nRUN x\n", &build).unwrap();
    assert_eq!(
        df.steps[2].config.run_env(),
        pairs(&[
            ("HTTP_PROXY", "http://p:3128"),
            ("VERSION", "2.0"),
            ("OTHER", "o")
        ])
    );
    assert_eq!(df.unused_args, strings(&["TYPO"]));
    match &df.steps[0].instruction {
        Instruction::Arg(declared) => {
            assert_eq!(
                declared,
                &vec![("VERSION".to_owned(), Some("2.0".to_owned()))]
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn arg_without_value_is_unset() {
    let df = ok("FROM a\nARG NOVALUE\nENV A=${NOVALUE-unset} B=${NOVALUE:-empty}\nRUN x\n");
    assert_eq!(df.config.env_value("A"), Some("unset"));
    assert!(df.steps[2]
        .config
        .run_env()
        .iter()
        .all(|(k, _)| k != "NOVALUE"));
}

#[test]
fn several_args_in_one_instruction() {
    let df = ok("FROM a\nARG A=1 B C=\"x y\"\nRUN x\n");
    assert_eq!(
        df.steps[0].instruction,
        Instruction::Arg(vec![
            ("A".to_owned(), Some("1".to_owned())),
            ("B".to_owned(), None),
            ("C".to_owned(), Some("x y".to_owned())),
        ])
    );
}

#[test]
fn args_before_from_only_reach_from_unless_redeclared() {
    let text = "ARG IMAGE=alpine\nARG TAG=3\nFROM ${IMAGE}:${TAG}\nENV SEEN=${TAG:-no}\nARG TAG\nENV AFTER=$TAG\n";
    let df = ok(text);
    assert_eq!(df.from.reference, "alpine:3");
    assert_eq!(df.config.env_value("SEEN"), Some("no"));
    assert_eq!(
        df.config.env_value("AFTER"),
        Some("3"),
        "redeclared ARG inherits"
    );
    let df = parse(text, &args(&[("TAG", "edge")])).unwrap();
    assert_eq!(df.from.reference, "alpine:edge");
    assert_eq!(df.config.env_value("AFTER"), Some("edge"));
    assert!(df.unused_args.is_empty());
}

#[test]
fn from_cannot_see_stage_variables_and_must_not_be_empty() {
    let e = err("ARG IMAGE\nFROM $IMAGE\n");
    assert_eq!(e.line, 2);
    assert_eq!(
        e.to_string(),
        "Dockerfile line 2: FROM has an empty image reference"
    );
}

#[test]
fn predefined_platform_args() {
    let df = ok("FROM --platform=$BUILDPLATFORM img-$TARGETARCH\nARG TARGETOS\nENV OS=$TARGETOS ARCH=${TARGETARCH:-none}\n");
    assert_eq!(df.from.reference, "img-amd64");
    assert_eq!(df.config.env_value("OS"), Some("linux"));
    assert_eq!(
        df.config.env_value("ARCH"),
        Some("none"),
        "not declared in the stage"
    );
    let e = err("FROM --platform=linux/arm64 a\n");
    assert!(e.to_string().contains("linux/amd64 only"), "{e}");
    let e = err("FROM --pull a\n");
    assert!(e.to_string().contains("accepted: --platform"), "{e}");
}

#[test]
fn labels() {
    let df = ok("FROM a\nENV V=1.0\nLABEL version=$V \"com.example.name\"=\"my app\" empty=\nLABEL legacy some text\n");
    assert_eq!(
        df.config.labels,
        [
            ("version", "1.0"),
            ("com.example.name", "my app"),
            ("empty", ""),
            ("legacy", "some text")
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect::<BTreeMap<_, _>>()
    );
}

// --- WORKDIR, USER, EXPOSE, VOLUME, STOPSIGNAL ---------------------------------------------

#[test]
fn workdir_resolves_relative_to_the_previous_one() {
    let df = ok("FROM a\nWORKDIR app\nWORKDIR sub/./dir/\nWORKDIR ..\nWORKDIR /abs//x/../y\nENV D=data\nWORKDIR $D\n");
    let dirs: Vec<&str> = df.steps.iter().map(|s| s.config.workdir.as_str()).collect();
    assert_eq!(
        dirs,
        [
            "/app",
            "/app/sub/dir",
            "/app/sub",
            "/abs/y",
            "/abs/y",
            "/abs/y/data"
        ]
    );
    assert_eq!(resolve_path("/", "../../.."), "/");
}

#[test]
fn workdir_starts_from_the_base_images() {
    let base = RunConfig {
        working_dir: Some("/srv".into()),
        env: Some(strings(&["PATH=/usr/bin", "HOME=/root"])),
        ..RunConfig::default()
    };
    let df = parse_with_base(
        "FROM a\nWORKDIR app\nENV PATH=/opt/bin:$PATH\n",
        &no_args(),
        &base,
    )
    .unwrap();
    assert_eq!(df.config.workdir, "/srv/app");
    assert_eq!(
        env_of(&df),
        pairs(&[("PATH", "/opt/bin:/usr/bin"), ("HOME", "/root")])
    );
}

#[test]
fn workdir_and_user_need_an_argument() {
    let e = err("FROM a\nWORKDIR\n");
    assert!(
        e.to_string().contains("WORKDIR requires an argument"),
        "{e}"
    );
    let e = err("FROM a\nUSER $NOBODY\n");
    assert_eq!(e.to_string(), "Dockerfile line 2: USER has an empty user");
}

#[test]
fn user_is_substituted() {
    let df = ok("FROM a\nARG U=app\nUSER ${U}:staff\n");
    assert_eq!(df.config.user.as_deref(), Some("app:staff"));
}

#[test]
fn expose_forms() {
    let df = ok("FROM a\nARG P=8080\nEXPOSE 80 443/tcp 53/UDP $P 9000-9002/sctp\n");
    assert_eq!(
        df.steps[1].instruction,
        Instruction::Expose(strings(&[
            "80/tcp",
            "443/tcp",
            "53/udp",
            "8080/tcp",
            "9000/sctp",
            "9001/sctp",
            "9002/sctp"
        ]))
    );
    assert_eq!(df.config.exposed_ports.len(), 7);
    let config = df.config.to_run_config();
    assert!(config.exposed_ports.unwrap().contains_key("53/udp"));
}

#[test]
fn bad_ports_are_errors_naming_the_value() {
    for (port, reason) in [
        ("http", "numbers from 1 to 65535"),
        ("0", "numbers from 1 to 65535"),
        ("70000", "numbers from 1 to 65535"),
        ("80/icmp", "unknown protocol"),
        ("8080:80", "host mappings"),
        ("90-80", "starts after it ends"),
    ] {
        let e = err(&format!("FROM a\nEXPOSE 22 {port}\n"));
        assert_eq!(e.line, 2);
        let message = e.to_string();
        assert!(message.contains(&format!("`{port}`")), "{message}");
        assert!(message.contains(reason), "{message}");
    }
    assert!(err("FROM a\nEXPOSE\n")
        .to_string()
        .contains("at least one port"));
}

#[test]
fn volume_and_stopsignal_are_metadata() {
    let df =
        ok("FROM a\nVOLUME /data [\"x\"]\nVOLUME [\"/cache\", \"/logs\"]\nSTOPSIGNAL SIGINT\n");
    assert_eq!(
        df.config.volumes.iter().cloned().collect::<Vec<_>>(),
        strings(&["/cache", "/data", "/logs", "[x]"])
    );
    assert_eq!(df.config.stop_signal.as_deref(), Some("SIGINT"));
    let e = err("FROM a\nSTOPSIGNAL SIG INT\n");
    assert!(e.to_string().contains("one signal"), "{e}");
}

// --- the config as a whole -----------------------------------------------------------------

#[test]
fn each_step_carries_the_config_after_it() {
    let df = ok("FROM a\nUSER one\nRUN x\nUSER two\nCOPY a /a\n");
    let users: Vec<Option<&str>> = df.steps.iter().map(|s| s.config.user.as_deref()).collect();
    assert_eq!(users, [Some("one"), Some("one"), Some("two"), Some("two")]);
}

#[test]
fn base_config_round_trips_through_the_state() {
    let base = RunConfig {
        entrypoint: Some(strings(&["/init"])),
        cmd: Some(strings(&["serve"])),
        env: Some(strings(&["A=1", "NOEQ"])),
        working_dir: Some("/w".into()),
        user: Some("nobody".into()),
        exposed_ports: Some(
            [("80/tcp".to_owned(), serde_json::json!({}))]
                .into_iter()
                .collect(),
        ),
        labels: Some([("k".to_owned(), "v".to_owned())].into_iter().collect()),
    };
    let df = parse_with_base("FROM a\n", &no_args(), &base).unwrap();
    let mut expected = base.clone();
    expected.env = Some(strings(&["A=1", "NOEQ="]));
    assert_eq!(df.config.to_run_config(), expected);
}

#[test]
fn a_realistic_dockerfile() {
    let text = r#"# syntax=docker/dockerfile:1
ARG PY=3.12
FROM python:${PY}-slim AS app

LABEL org.opencontainers.image.title="demo"
ENV PYTHONDONTWRITEBYTECODE=1 \
    APP_HOME=/srv/app
WORKDIR $APP_HOME
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
 && rm -rf /root/.cache
COPY --chown=1000:1000 . .
USER 1000
EXPOSE 8000
ENTRYPOINT ["python", "-m", "app"]
CMD ["--port", "8000"]
"#;
    let df = parse(text, &args(&[("PY", "3.11")])).unwrap();
    assert_eq!(df.from.reference, "python:3.11-slim");
    assert_eq!(df.from.line, 3);
    let lines: Vec<usize> = df.steps.iter().map(|s| s.line).collect();
    assert_eq!(lines, [5, 6, 8, 9, 10, 12, 13, 14, 15, 16]);
    match &df.steps[3].instruction {
        Instruction::Copy(c) => {
            assert_eq!(c.dest, "/srv/app");
            assert!(c.dest_is_dir);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        df.steps[4].config.run_env(),
        pairs(&[("PYTHONDONTWRITEBYTECODE", "1"), ("APP_HOME", "/srv/app")])
    );
    let config = df.config.to_run_config();
    assert_eq!(config.working_dir.as_deref(), Some("/srv/app"));
    assert_eq!(config.user.as_deref(), Some("1000"));
    assert_eq!(config.entrypoint, Some(strings(&["python", "-m", "app"])));
    assert_eq!(config.cmd, Some(strings(&["--port", "8000"])));
    assert!(df.unused_args.is_empty());
}

// --- the lexer pieces -----------------------------------------------------------------------

#[test]
fn quoted_words_keep_quotes_for_the_expander() {
    assert_eq!(
        lines::quoted_words(r#"a="x y" b='c d' e=f\ g "" h"#, '\\'),
        strings(&[r#"a="x y""#, "b='c d'", r"e=f\ g", "\"\"", "h"])
    );
}

#[test]
fn flags_stop_at_the_first_argument_or_double_dash() {
    let (flags, rest) = lines::take_flags("--a=1 --b   x --c");
    assert_eq!(flags.len(), 2);
    assert_eq!(flags[1].value, None);
    assert_eq!(rest, "x --c");
    let (flags, rest) = lines::take_flags("-- --not-a-flag y");
    assert!(flags.is_empty());
    assert_eq!(rest, "--not-a-flag y");
}
