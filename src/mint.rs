//! `fleetcast token`: prints one subscriber token for a server started with --subscribe-secret.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::server::config::{parse_duration, read_secret_file, QuietParser};
use crate::token::{self, Claims, Secret};

/// `fleetcast token` options.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The server's --subscribe-secret (at least 32 bytes).
    #[arg(long, env = "FLEETCAST_SUBSCRIBE_SECRET", hide_env_values = true,
          value_parser = QuietParser::<Secret>::new())]
    pub secret: Option<Secret>,

    /// Read the secret from the first line of this file instead (wins over --secret).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,

    /// How long the token stays valid (e.g. 90s, 30m, 1h); rounded up to whole seconds.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,

    /// Who the token is for: the `sub` claim, shown in the server's debug log.
    #[arg(long)]
    pub sub: Option<String>,
}

/// Mints the token `args` describe, valid from `now` (unix seconds) for `--ttl`.
pub fn run(args: &TokenArgs, now: u64) -> Result<String> {
    let secret = match (&args.secret_file, &args.secret) {
        (Some(path), _) => read_secret_file(path)?,
        (None, Some(secret)) => secret.clone(),
        (None, None) => {
            bail!("no secret: give --secret, --secret-file or FLEETCAST_SUBSCRIBE_SECRET")
        }
    };
    let ttl = args.ttl.as_secs() + u64::from(args.ttl.subsec_nanos() > 0);
    if ttl == 0 {
        bail!("--ttl must be longer than 0 s");
    }
    let exp = now
        .checked_add(ttl)
        .and_then(|exp| i64::try_from(exp).ok())
        .ok_or_else(|| anyhow::anyhow!("--ttl is too long"))?;
    let claims = Claims {
        exp,
        nbf: None,
        sub: args.sub.clone(),
    };
    Ok(token::mint(&secret, &claims))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "a-secret-of-at-least-thirty-two-bytes";

    fn args(ttl: Duration) -> TokenArgs {
        TokenArgs {
            secret: Some(Secret::parse(SECRET).unwrap()),
            secret_file: None,
            ttl,
            sub: Some("desk".into()),
        }
    }

    #[test]
    fn run_mints_a_token_expiring_after_ttl() {
        let t = run(&args(Duration::from_secs(3600)), 1_000).unwrap();
        let secret = Secret::parse(SECRET).unwrap();
        let claims = token::verify(&secret, &t, 1_000).unwrap();
        assert_eq!(claims.exp, 4_600);
        assert_eq!(claims.sub.as_deref(), Some("desk"));
        assert!(token::verify(&secret, &t, 4_600).is_err());
    }

    #[test]
    fn run_rounds_ttl_up_and_refuses_zero() {
        let t = run(&args(Duration::from_millis(1500)), 10).unwrap();
        let secret = Secret::parse(SECRET).unwrap();
        assert_eq!(token::verify(&secret, &t, 10).unwrap().exp, 12);
        assert!(run(&args(Duration::ZERO), 10).is_err());
    }

    #[test]
    fn run_without_a_secret_fails() {
        let mut a = args(Duration::from_secs(1));
        a.secret = None;
        assert!(run(&a, 0).unwrap_err().to_string().contains("no secret"));
    }

    #[test]
    fn run_reads_the_secret_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, format!("{SECRET}\n")).unwrap();
        let mut a = args(Duration::from_secs(60));
        a.secret = None;
        a.secret_file = Some(path.clone());
        let t = run(&a, 0).unwrap();
        assert!(token::verify(&Secret::parse(SECRET).unwrap(), &t, 0).is_ok());
        std::fs::write(&path, "short\n").unwrap();
        let err = format!("{:#}", run(&a, 0).unwrap_err());
        assert!(err.contains("at least 32"), "{err}");
    }
}
