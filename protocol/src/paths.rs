//! Validation of guest paths sent over the protocol. Both ends use it: the
//! host to give a clear error before sending, the guest because its input is
//! not trusted.

use crate::messages::{ErrorBody, ErrorCode};

/// Directory under which the agent resolves relative file paths.
pub const DEFAULT_WORKDIR: &str = "/root";

/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;

/// Accepts absolute paths, and relative paths that stay under the directory
/// they are resolved against. Rejects empty paths, NUL bytes, over-long paths
/// and relative paths that climb out with `..`.
pub fn validate(path: &str) -> Result<(), ErrorBody> {
    let invalid = |why: &str| {
        Err(ErrorBody::new(
            ErrorCode::InvalidArgument,
            format!("invalid path {path:?}: {why}"),
        ))
    };
    if path.is_empty() {
        return invalid(
            "the path is empty; give an absolute path or one relative to the working directory",
        );
    }
    if path.contains('\0') {
        return invalid("the path contains a NUL byte");
    }
    if path.len() > MAX_PATH_LEN {
        return invalid("the path is longer than 4096 bytes");
    }
    if !path.starts_with('/') {
        let mut depth: i64 = 0;
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => depth -= 1,
                _ => depth += 1,
            }
            if depth < 0 {
                return invalid(
                    "a relative path may not climb above the working directory with '..'",
                );
            }
        }
    }
    Ok(())
}

/// Validates `path` and makes it absolute against `workdir`.
pub fn resolve(path: &str, workdir: &str) -> Result<String, ErrorBody> {
    validate(path)?;
    if path.starts_with('/') {
        Ok(path.to_string())
    } else {
        Ok(format!("{}/{}", workdir.trim_end_matches('/'), path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_absolute_and_contained_relative_paths() {
        for ok in [
            "/",
            "/etc/passwd",
            "/a/../../b",
            "file.txt",
            "a/b/../c",
            "./x",
        ] {
            assert!(validate(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_bad_paths_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("a\0b", "NUL"),
            ("../etc", "climb"),
            ("a/../../b", "climb"),
        ] {
            let err = validate(bad).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidArgument);
            assert!(err.message.contains(why), "{bad:?}: {}", err.message);
        }
        assert!(validate(&"a".repeat(5000)).is_err());
    }

    #[test]
    fn resolves_relative_paths_under_the_workdir() {
        assert_eq!(resolve("x/y", "/root").unwrap(), "/root/x/y");
        assert_eq!(resolve("/tmp/z", "/root").unwrap(), "/tmp/z");
        assert_eq!(resolve("f", "/").unwrap(), "/f");
    }
}
