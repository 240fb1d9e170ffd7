//! Logging to the serial console (stderr of PID 1 is `/dev/console`, which
//! the host captures to a file), stamped with the time since boot like the
//! kernel's own lines (the wall clock may be wrong until the host sets it),
//! and a rate limiter for every log line a guest process can trigger.
//!
//! Never log file contents or environment values: they may hold secrets.

use std::sync::atomic::{AtomicU64, Ordering};

/// Installs the global subscriber: INFO, or DEBUG when `debug`.
pub fn init(debug: bool) {
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_target(false)
        .with_timer(SinceBoot)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Seconds since boot (`CLOCK_MONOTONIC`), as `[   1.234567]`.
struct SinceBoot;

impl tracing_subscriber::fmt::time::FormatTime for SinceBoot {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
        write!(w, "[{:>5}.{:06}]", now.tv_sec(), now.tv_nsec() / 1000)
    }
}

/// Allows at most `per_second` events per second (for logs a guest process
/// can cause, e.g. by sending bad requests in a loop).
#[derive(Debug)]
pub struct RateLimit {
    per_second: u64,
    /// Monotonic second (high 32 bits) and events counted in it (low 32 bits).
    state: AtomicU64,
}

impl RateLimit {
    pub const fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second: per_second as u64,
            state: AtomicU64::new(0),
        }
    }

    /// True when one more event fits in the current second.
    pub fn allow(&self) -> bool {
        self.allow_at(monotonic_secs())
    }

    fn allow_at(&self, now: u64) -> bool {
        let now = now & 0xffff_ffff;
        let mut current = self.state.load(Ordering::Relaxed);
        loop {
            let (second, count) = (current >> 32, current & 0xffff_ffff);
            let next = if second != now {
                (now << 32) | 1
            } else if count < self.per_second {
                current + 1
            } else {
                return false;
            };
            match self.state.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

fn monotonic_secs() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| u64::try_from(t.tv_sec()).unwrap_or(0))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_second_and_resets() {
        let limit = RateLimit::new(3);
        let allowed = (0..10).filter(|_| limit.allow_at(100)).count();
        assert_eq!(allowed, 3);
        assert!(limit.allow_at(101));
        assert!(limit.allow());
    }
}
