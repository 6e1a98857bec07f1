//! Server certificates: a short-lived self-signed ECDSA P-256 certificate kept in `certs/`, or a
//! CA-issued one loaded from files.
//!
//! Browsers accept a self-signed certificate through `serverCertificateHashes` only if it is
//! ECDSA P-256 and valid for at most 14 days, so fleetcast issues 13-day certificates, reuses one
//! across restarts while more than a quarter of its validity is left, and replaces it otherwise;
//! a running server renews it with an overlap ([`Rotation`], `server::rotation`).
//!
//! Every certificate and key is checked to be a pair before the server starts (wtransport
//! panics on a mismatched pair). The self-signed pair is written through temporary files and
//! renames, so neither file is ever half-written; a crash between the two renames leaves a
//! mismatched pair, which the next start detects and replaces.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use wtransport::Identity;

/// Default total validity of a generated certificate (browsers refuse more than 14 days).
pub const VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);
/// Longest validity browsers accept for a certificate trusted by its hash.
pub const MAX_VALIDITY: Duration = Duration::from_secs(14 * 24 * 3600);

/// When a running server renews its self-signed certificate, as fractions of its validity.
///
/// With half of its validity left, the next certificate is made and its hash published beside
/// the current one (`/certificate.sha256` lists both), so pages that fetch the hashes then trust
/// either. With a quarter left, the endpoint switches to the next certificate for new
/// connections; open sessions keep theirs. A stored certificate is reused at start-up only
/// while more than a quarter of its validity is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Total validity of each certificate.
    pub validity: Duration,
}

impl Rotation {
    /// Remaining validity at which the next certificate is made and published.
    pub fn publish_next_at(&self) -> Duration {
        self.validity / 2
    }

    /// Remaining validity at which new connections get the next certificate.
    pub fn switch_at(&self) -> Duration {
        self.validity / 4
    }
}

impl Default for Rotation {
    fn default() -> Self {
        Self { validity: VALIDITY }
    }
}
/// Backdating of `not_before`, for clients whose clocks run a little behind.
const BACKDATE: Duration = Duration::from_secs(3600);

const CERT_FILE: &str = "fleetcast-cert.pem";
const KEY_FILE: &str = "fleetcast-key.pem";

/// The server's TLS identity and what clients need to trust it.
pub struct ServerIdentity {
    /// Certificate chain and key for wtransport.
    pub identity: Identity,
    /// SHA-256 of the leaf certificate's DER, lowercase hex; `None` for a CA-issued certificate
    /// (which clients trust through their root store).
    pub hash_hex: Option<String>,
    /// When the leaf certificate expires.
    pub not_after: SystemTime,
    /// Where the certificate came from, for the start-up log.
    pub source: String,
    /// The DNS names a CA-issued certificate covers (empty for the self-signed one).
    pub dns_names: Vec<String>,
}

/// Loads the self-signed certificate from `dir` if it is still good for `names`, else makes and
/// stores a new one.
pub async fn self_signed(
    dir: &Path,
    names: &[String],
    now: SystemTime,
    rotation: Rotation,
) -> Result<ServerIdentity> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    match reusable(&cert_path, &key_path, names, now, rotation.switch_at()) {
        Ok(Some(not_after)) => match load_pair(&cert_path, &key_path).await {
            Ok(identity) => {
                return Ok(finish(
                    identity,
                    not_after,
                    format!("reused {}", cert_path.display()),
                ))
            }
            Err(e) => tracing::warn!("stored certificate unusable, making a new one: {e:#}"),
        },
        Ok(None) => {}
        Err(e) => tracing::warn!("stored certificate unusable, making a new one: {e:#}"),
    }
    let (cert_pem, key_pem, not_after) = generate(names, now, rotation.validity)?;
    store(dir, &cert_pem, &key_pem)?;
    let identity = load_pair(&cert_path, &key_path).await?;
    Ok(finish(
        identity,
        not_after,
        format!("generated {}", cert_path.display()),
    ))
}

/// A new self-signed certificate, made in memory: the next one a running server switches to.
/// Returns it with its PEM certificate and key, for [`store`] once it is in use.
pub async fn next_self_signed(
    dir: &Path,
    names: &[String],
    now: SystemTime,
    rotation: Rotation,
) -> Result<(ServerIdentity, String, String)> {
    let (cert_pem, key_pem, not_after) = generate(names, now, rotation.validity)?;
    // Through files, so the same loading and pair check as at start-up apply.
    let tmp = tempfile_dir(dir)?;
    let (cert_path, key_path) = (tmp.join(CERT_FILE), tmp.join(KEY_FILE));
    write_pair(
        (&cert_path, cert_pem.as_bytes()),
        (&key_path, key_pem.as_bytes()),
    )?;
    let identity = load_pair(&cert_path, &key_path).await;
    let _ = fs::remove_dir_all(&tmp);
    let id = finish(
        identity?,
        not_after,
        "generated the next certificate".into(),
    );
    Ok((id, cert_pem, key_pem))
}

/// A private directory beside `dir` for a certificate not in use yet.
fn tempfile_dir(dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".next.{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o700))?;
    }
    Ok(tmp)
}

/// Stores a self-signed pair in `dir` as the one to reuse at the next start.
pub fn store(dir: &Path, cert_pem: &str, key_pem: &str) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_pair(
        (&dir.join(CERT_FILE), cert_pem.as_bytes()),
        (&dir.join(KEY_FILE), key_pem.as_bytes()),
    )
}

/// Loads a CA-issued certificate chain and key.
pub async fn from_files(cert: &Path, key: &Path) -> Result<ServerIdentity> {
    let pem = fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let (not_after, names) = inspect(&pem)?;
    let identity = load_pair(cert, key).await?;
    Ok(ServerIdentity {
        identity,
        hash_hex: None,
        not_after,
        source: format!("loaded {}", cert.display()),
        // IP addresses are names too in `inspect`; keep the DNS names.
        dns_names: names
            .into_iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_err())
            .collect(),
    })
}

/// Loads a certificate chain and its key, and checks that they are a pair.
async fn load_pair(cert: &Path, key: &Path) -> Result<Identity> {
    let identity = Identity::load_pemfiles(cert, key)
        .await
        .with_context(|| format!("loading {} and {}", cert.display(), key.display()))?;
    check_pair(&identity).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                "the key is not the certificate's (their public keys differ)".to_string()
            }
            other => other.to_string(),
        };
        anyhow!(
            "the certificate {} and the key {} cannot serve together: {why}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(identity)
}

/// Whether wtransport will accept this certificate chain and key: the same rustls check it
/// runs when the endpoint starts, where a failure is a panic (`expect`) instead of an error.
pub fn check_pair(identity: &Identity) -> std::result::Result<(), rustls::Error> {
    tls_config(identity, &[&rustls::version::TLS13]).map(|_| ())
}

/// A TLS server configuration for `identity` (HTTPS on the HTTP port: TLS 1.2 and 1.3,
/// HTTP/1.1).
pub fn https_config(
    identity: &Identity,
) -> std::result::Result<rustls::ServerConfig, rustls::Error> {
    let mut config = tls_config(identity, rustls::DEFAULT_VERSIONS)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// TLS for the fan-out engine's QUIC endpoint: TLS 1.3 (QUIC needs it), ALPN `h3`.
pub fn quic_config(
    identity: &Identity,
) -> std::result::Result<rustls::ServerConfig, rustls::Error> {
    let mut config = tls_config(identity, &[&rustls::version::TLS13])?;
    config.alpn_protocols = vec![b"h3".to_vec()];
    Ok(config)
}

fn tls_config(
    identity: &Identity,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::result::Result<rustls::ServerConfig, rustls::Error> {
    let chain = identity
        .certificate_chain()
        .as_slice()
        .iter()
        .map(|c| rustls::pki_types::CertificateDer::from(c.der().to_vec()))
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::try_from(identity.private_key().secret_der())
        .map_err(|e| rustls::Error::General(format!("unreadable private key: {e}")))?
        .clone_key();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
}

fn finish(identity: Identity, not_after: SystemTime, source: String) -> ServerIdentity {
    let dns_names = Vec::new();
    let der = identity.certificate_chain().as_slice()[0].der().to_vec();
    ServerIdentity {
        identity,
        hash_hex: Some(sha256_hex(&der)),
        not_after,
        source,
        dns_names,
    }
}

/// Lowercase hex SHA-256 of `der`.
pub fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// `Some(not_after)` if the stored pair exists, covers `names` and stays valid long enough.
fn reusable(
    cert_path: &Path,
    key_path: &Path,
    names: &[String],
    now: SystemTime,
    min_remaining: Duration,
) -> Result<Option<SystemTime>> {
    if !cert_path.exists() || !key_path.exists() {
        return Ok(None);
    }
    let pem = fs::read(cert_path)?;
    let (not_after, sans) = inspect(&pem)?;
    if not_after < now + min_remaining {
        tracing::info!(
            "stored certificate expires within {}; replacing it",
            humantime(min_remaining)
        );
        return Ok(None);
    }
    if let Some(missing) = names.iter().find(|n| !sans.contains(n)) {
        tracing::info!("stored certificate lacks the name {missing}; replacing it");
        return Ok(None);
    }
    Ok(Some(not_after))
}

/// Expiry and subject alternative names (DNS names and IP addresses as text) of a PEM leaf.
fn inspect(pem: &[u8]) -> Result<(SystemTime, Vec<String>)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).context("certificate is not PEM")?;
    let cert = pem.parse_x509().context("certificate is not X.509")?;
    let not_after = cert.validity().not_after.timestamp();
    if not_after < 0 {
        bail!("certificate expiry before 1970");
    }
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => sans.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let ip = match ip.len() {
                        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(*ip)?),
                        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(*ip)?),
                        _ => continue,
                    };
                    sans.push(ip.to_string());
                }
                _ => {}
            }
        }
    }
    Ok((UNIX_EPOCH + Duration::from_secs(not_after as u64), sans))
}

/// `3d 6h`, `12s`: a duration for logs.
fn humantime(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A new ECDSA P-256 certificate for `names`, valid from an hour ago for `validity` (at most
/// [`MAX_VALIDITY`] in all, the browsers' rule).
fn generate(
    names: &[String],
    now: SystemTime,
    validity: Duration,
) -> Result<(String, String, SystemTime)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fleetcast self-signed");
    // Backdated for clients whose clocks run behind, within the total the browsers allow.
    let validity = validity.min(MAX_VALIDITY - Duration::from_secs(60));
    let backdate = BACKDATE.min(MAX_VALIDITY - Duration::from_secs(60) - validity);
    let not_before = now - backdate;
    let not_after = now + validity;
    params.not_before = time::OffsetDateTime::from(not_before);
    params.not_after = time::OffsetDateTime::from(not_after);
    let cert = params.self_signed(&key)?;
    // X.509 stores whole seconds: report what the certificate says.
    let secs = not_after.duration_since(UNIX_EPOCH)?.as_secs();
    Ok((
        cert.pem(),
        key.serialize_pem(),
        UNIX_EPOCH + Duration::from_secs(secs),
    ))
}

/// Replaces a certificate and its key, each through a temporary file and a rename, so neither
/// is ever seen half-written. The key is readable by its owner only (mode 0600 from creation
/// on Unix, kept by the rename).
fn write_pair(cert: (&Path, &[u8]), key: (&Path, &[u8])) -> Result<()> {
    let key_tmp = write_temp(key.0, key.1, 0o600)?;
    let cert_tmp = match write_temp(cert.0, cert.1, 0o644) {
        Ok(tmp) => tmp,
        Err(e) => {
            let _ = fs::remove_file(&key_tmp);
            return Err(e);
        }
    };
    // A crash between these renames leaves the new key with the old certificate: the next
    // start finds them mismatched (`load_pair`) and makes a new pair.
    for (tmp, path) in [(&key_tmp, key.0), (&cert_tmp, cert.0)] {
        fs::rename(tmp, path)
            .with_context(|| format!("replacing {} with {}", path.display(), tmp.display()))?;
    }
    // Make the renames themselves durable.
    if let Some(dir) = cert.0.parent() {
        if let Ok(dir) = fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Writes `bytes` to a new temporary file beside `path` with `mode` (on Unix), flushed to
/// disk; returns its path.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    // A temporary file a crash left behind may have any mode: never write into it.
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", tmp.display()));
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    }

    #[tokio::test]
    async fn self_signed_is_reused_while_valid_and_replaced_near_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let a = self_signed(dir.path(), &names(), now, Rotation::default())
            .await
            .unwrap();
        assert!(a.source.starts_with("generated"));
        let b = self_signed(dir.path(), &names(), now, Rotation::default())
            .await
            .unwrap();
        assert!(b.source.starts_with("reused"), "{}", b.source);
        assert_eq!(a.hash_hex, b.hash_hex);
        // Ten days later less than a quarter of 13 days remains: a new certificate.
        let later = now + Duration::from_secs(10 * 24 * 3600);
        let c = self_signed(dir.path(), &names(), later, Rotation::default())
            .await
            .unwrap();
        assert!(c.source.starts_with("generated"));
        assert_ne!(a.hash_hex, c.hash_hex);
        // A new name forces a new certificate too.
        let mut more = names();
        more.push("fleet.example".into());
        let d = self_signed(dir.path(), &more, later, Rotation::default())
            .await
            .unwrap();
        assert!(d.source.starts_with("generated"));
    }

    #[tokio::test]
    async fn a_leftover_mismatched_pair_is_detected_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let first = self_signed(dir.path(), &names(), now, Rotation::default())
            .await
            .unwrap();
        // What a crash between the two renames leaves: a new key beside the old certificate.
        let (_, other_key, _) = generate(&names(), now, VALIDITY).unwrap();
        fs::write(dir.path().join(KEY_FILE), other_key).unwrap();
        let second = self_signed(dir.path(), &names(), now, Rotation::default())
            .await
            .unwrap();
        assert!(second.source.starts_with("generated"), "{}", second.source);
        assert_ne!(first.hash_hex, second.hash_hex);
        assert!(check_pair(&second.identity).is_ok());
        // The new pair is reused as it is, and no temporary file is left.
        let third = self_signed(dir.path(), &names(), now, Rotation::default())
            .await
            .unwrap();
        assert!(third.source.starts_with("reused"), "{}", third.source);
        let mut files: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, [CERT_FILE, KEY_FILE]);
    }

    #[tokio::test]
    async fn a_mismatched_pair_of_files_is_an_error_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _, _) = generate(&names(), SystemTime::now(), VALIDITY).unwrap();
        let (_, key, _) = generate(&names(), SystemTime::now(), VALIDITY).unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        fs::write(&cert_path, cert).unwrap();
        fs::write(&key_path, key).unwrap();
        let e = match from_files(&cert_path, &key_path).await {
            Ok(_) => panic!("a mismatched pair loaded"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains(&*cert_path.to_string_lossy()), "{e}");
        assert!(e.contains(&*key_path.to_string_lossy()), "{e}");
    }

    #[tokio::test]
    async fn ca_issued_files_load_without_a_published_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, not_after) = generate(&names(), SystemTime::now(), VALIDITY).unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        fs::write(&cert_path, cert).unwrap();
        fs::write(&key_path, key).unwrap();
        let id = from_files(&cert_path, &key_path).await.unwrap();
        assert_eq!(
            id.hash_hex, None,
            "clients verify a CA certificate by its chain"
        );
        assert_eq!(id.not_after, not_after);
        assert!(from_files(&key_path, &cert_path).await.is_err());
        assert!(from_files(&dir.path().join("missing.pem"), &key_path)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn self_signed_validity_and_key_mode_follow_browser_rules() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let id = self_signed(dir.path(), &names(), now, Rotation::default())
            .await
            .unwrap();
        let pem = fs::read(dir.path().join(CERT_FILE)).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let v = cert.validity();
        let span = v.not_after.timestamp() - v.not_before.timestamp();
        assert!(span < 14 * 24 * 3600, "validity {span}s");
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        assert_eq!(id.hash_hex.unwrap().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
