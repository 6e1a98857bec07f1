//! The process's open-files limit (`RLIMIT_NOFILE`), raised to the hard limit at start-up.
//!
//! Every HTTP connection and WebSocket session holds a file descriptor (WebTransport sessions
//! share the one UDP socket), and many systems start processes with a soft limit of 1,024: at
//! that limit new browsers could not even fetch `/certificate.sha256`. The soft limit may be
//! raised up to the hard limit without privileges.

use tracing::{info, warn};

/// An open-files limit; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit, which `open`, `socket` and `accept` obey.
    pub soft: Option<u64>,
    /// The hard limit, the most the soft limit may be raised to.
    pub hard: Option<u64>,
}

impl std::fmt::Display for OpenFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |n: Option<u64>| n.map_or("unlimited".to_string(), |n| n.to_string());
        write!(f, "soft {}, hard {}", show(self.soft), show(self.hard))
    }
}

/// The current limit.
#[cfg(unix)]
pub fn current() -> OpenFiles {
    let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    OpenFiles {
        soft: now.current,
        hard: now.maximum,
    }
}

/// Sets the soft limit to `soft`, keeping the hard limit; returns the limit now in force.
#[cfg(unix)]
fn set_soft(soft: Option<u64>) -> std::io::Result<OpenFiles> {
    let hard = current().hard;
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: soft,
            maximum: hard,
        },
    )?;
    Ok(current())
}

/// At start-up: raises the soft limit to the hard limit, or, with `danger_soft` (a test
/// option), sets it to that; logs what was granted. Failing to raise is a warning (the server
/// still runs, with fewer connections); failing to set `danger_soft` is an error.
#[cfg(unix)]
pub fn apply_at_start(danger_soft: Option<u64>) -> anyhow::Result<OpenFiles> {
    let before = current();
    if let Some(n) = danger_soft {
        let now = set_soft(Some(n)).map_err(|e| {
            anyhow::anyhow!("--danger-max-open-files {n}: cannot set the limit ({before}): {e}")
        })?;
        warn!("open files: {now}, lowered by --danger-max-open-files");
        return Ok(now);
    }
    if before.soft == before.hard {
        info!("open files: {before}");
        return Ok(before);
    }
    match set_soft(before.hard) {
        Ok(now) => {
            info!("open files: {now} (raised from soft {:?})", before.soft);
            Ok(now)
        }
        Err(e) => {
            warn!("open files: {before}; cannot raise the soft limit to the hard limit: {e}");
            Ok(before)
        }
    }
}

/// Elsewhere the limit is left as it is.
#[cfg(not(unix))]
pub fn apply_at_start(_danger_soft: Option<u64>) -> anyhow::Result<OpenFiles> {
    Ok(OpenFiles {
        soft: None,
        hard: None,
    })
}
