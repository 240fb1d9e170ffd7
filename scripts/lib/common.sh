# shellcheck shell=bash
# Helpers shared by the scripts in scripts/. Sourced, never executed.
#
# The sourcing script sets PROG (its short name) first, and LOGFILE before
# using run_logged. Provides REPO_ROOT, ARRAKIS_HOME and small functions for
# logging, hashing, locking and atomic symlinks.

# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ARRAKIS_HOME="${ARRAKIS_HOME:-${HOME:?HOME is not set and ARRAKIS_HOME is not either}/.cache/arrakis}"
SECONDS=0

log() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# Seconds since the script started, for progress lines.
elapsed() { printf '%ds' "$SECONDS"; }

# Read stdin, print the first 12 hex digits of its sha256.
short_hash() { sha256sum | cut -c1-12; }

# need CMD... : fail naming every missing command.
need() {
    local missing=() cmd
    for cmd in "$@"; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) || die "missing command(s): ${missing[*]} (run scripts/setup)"
}

# lock_dir DIR: serialise builds writing into DIR (held until the script exits).
lock_dir() {
    mkdir -p "$1"
    exec 9>"$1/.lock"
    if ! flock -n 9; then
        log "waiting for another build holding $1/.lock"
        flock 9
    fi
}

# atomic_symlink TARGET LINK: point LINK at TARGET, replacing it in one rename.
atomic_symlink() {
    local tmp
    tmp="$(dirname "$2")/.$(basename "$2").tmp.$$"
    ln -sfn "$1" "$tmp"
    mv -T "$tmp" "$2"
}

# run_logged DESCRIPTION CMD...: append CMD's output to $LOGFILE; on failure show its tail.
run_logged() {
    local what="$1"
    shift
    if ! "$@" >>"$LOGFILE" 2>&1; then
        printf '%s: error: %s failed; last lines of %s:\n' "$PROG" "$what" "$LOGFILE" >&2
        tail -n 40 "$LOGFILE" >&2
        die "$what failed (full log: $LOGFILE)"
    fi
}
