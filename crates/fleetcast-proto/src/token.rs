//! Subscriber tokens: standard JWTs signed with HMAC-SHA256 (HS256), minted and checked here.
//!
//! Browsers cannot set headers on a WebTransport CONNECT, so a subscriber proves it may watch the
//! fleet with `?token=JWT` in the session URL (the same on the WebSocket fallback). A token is
//! `base64url(header) "." base64url(claims) "." base64url(HMAC-SHA256(secret, first two parts))`,
//! base64url without padding, header `{"alg":"HS256","typ":"JWT"}`. Claims: `exp` (required, unix
//! seconds), `nbf` (optional), `sub` (optional name); others are ignored. Any JWT library can
//! mint one. PROTOCOL.md §2.1 has a worked example.
//!
//! Pure: no clock and no I/O. Callers pass `now` (unix seconds) in.

use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Longest token accepted, bytes; longer ones are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Shortest secret accepted, bytes (the HMAC-SHA256 output size; RFC 7518 §3.2 requires it).
pub const MIN_SECRET_LEN: usize = 32;

/// Name of the query parameter that carries the token.
pub const QUERY_PARAM: &str = "token";

/// `base64url({"alg":"HS256","typ":"JWT"})`, the header of every token this module mints.
const HEADER_B64: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// A shared signing secret. Its `Debug` never shows the bytes, so it can sit in options that
/// are logged.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl Secret {
    /// A secret of at least [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: impl AsRef<[u8]>) -> Result<Self, SecretError> {
        let bytes = bytes.as_ref();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(SecretError::TooShort(bytes.len()));
        }
        Ok(Self(bytes.into()))
    }

    /// The secret given on a command line or in the environment (its UTF-8 bytes, as given).
    pub fn parse(s: &str) -> Result<Self, SecretError> {
        Self::new(s.as_bytes())
    }

    /// The secret in a file's contents: its first line, without surrounding whitespace.
    pub fn from_file_contents(contents: &str) -> Result<Self, SecretError> {
        Self::new(
            contents
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .as_bytes(),
        )
    }

    fn mac(&self) -> HmacSha256 {
        // Invariant: HMAC takes keys of any length; `new_from_slice` never fails for it.
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }
}

impl std::str::FromStr for Secret {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, SecretError> {
        Self::parse(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// Why a secret is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Shorter than [`MIN_SECRET_LEN`].
    #[error("the secret is {0} bytes; at least {MIN_SECRET_LEN} are required")]
    TooShort(usize),
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claims {
    /// Expiry, unix seconds: the token is refused from this second on.
    pub exp: i64,
    /// Not before, unix seconds: the token is refused before this second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Who the token is for (a name for logs, never checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
}

impl Claims {
    /// Claims that expire at `exp` (unix seconds), with no `nbf` and no `sub`.
    pub fn expiring_at(exp: i64) -> Self {
        Self {
            exp,
            nbf: None,
            sub: None,
        }
    }
}

/// Why a token was refused. Messages never contain the token or the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token was given where one is required.
    #[error("no token")]
    Missing,
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is {0} bytes; at most {MAX_TOKEN_LEN} are accepted")]
    TooLong(usize),
    /// Not three dot-separated parts.
    #[error("token has {0} dot-separated parts; a JWT has 3")]
    Parts(usize),
    /// A part is not base64url without padding.
    #[error("token {0} is not base64url without padding")]
    Base64(&'static str),
    /// The header is not a JSON object with a string `alg`, or names what we do not support.
    #[error("token header is invalid: {0}")]
    Header(String),
    /// The header names another algorithm than HS256 (`none` included).
    #[error("token algorithm {0:?} is not HS256")]
    Algorithm(String),
    /// The signature does not match the header and claims under our secret.
    #[error("token signature does not match")]
    Signature,
    /// The claims are not a JSON object, or `exp`/`nbf`/`sub` have the wrong type.
    #[error("token claims are invalid: {0}")]
    Claims(String),
    /// `exp <= now`; holds how many seconds ago.
    #[error("token expired {0} s ago")]
    Expired(u64),
    /// `nbf > now`; holds in how many seconds it becomes valid.
    #[error("token not valid for another {0} s")]
    NotYetValid(u64),
}

/// Signs `claims` with `secret` into a compact JWT.
pub fn mint(secret: &Secret, claims: &Claims) -> String {
    // Invariant: two integers and a string always serialise to JSON.
    let payload = serde_json::to_vec(claims).expect("claims serialise");
    let mut token = format!("{HEADER_B64}.{}", URL_SAFE_NO_PAD.encode(payload));
    let mut mac = secret.mac();
    mac.update(token.as_bytes());
    let signature = mac.finalize().into_bytes();
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature));
    token
}

/// The JOSE header fields we look at; any other field is ignored.
#[derive(Deserialize)]
struct Header {
    alg: String,
    /// RFC 7515 §4.1.11: a recipient must refuse extensions it does not understand.
    crit: Option<serde_json::Value>,
}

/// The claims as they arrive; their types are checked one by one for clear errors.
#[derive(Deserialize)]
struct RawClaims {
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
    sub: Option<serde_json::Value>,
}

/// Checks `token` against `secret` at `now` (unix seconds) and returns its claims.
///
/// The signature is checked (in constant time) before the claims are read.
pub fn verify(secret: &Secret, token: &str, now: u64) -> Result<Claims, TokenError> {
    if token.is_empty() {
        return Err(TokenError::Missing);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong(token.len()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, claims_b64, signature_b64] = parts[..] else {
        return Err(TokenError::Parts(parts.len()));
    };
    let header = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| TokenError::Base64("header"))?;
    let header: Header =
        serde_json::from_slice(&header).map_err(|e| TokenError::Header(e.to_string()))?;
    if header.alg != "HS256" {
        // Attacker-chosen text: keep it short in the error (it may reach a debug log).
        return Err(TokenError::Algorithm(header.alg.chars().take(16).collect()));
    }
    if header.crit.is_some() {
        return Err(TokenError::Header(
            "critical extensions (crit) are not supported".into(),
        ));
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| TokenError::Base64("signature"))?;
    let mut mac = secret.mac();
    mac.update(header_b64.as_bytes());
    mac.update(b".");
    mac.update(claims_b64.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| TokenError::Signature)?;

    let claims = URL_SAFE_NO_PAD
        .decode(claims_b64)
        .map_err(|_| TokenError::Base64("claims"))?;
    let raw: RawClaims =
        serde_json::from_slice(&claims).map_err(|e| TokenError::Claims(e.to_string()))?;
    let exp = match raw.exp {
        None => return Err(TokenError::Claims("exp is missing".into())),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| TokenError::Claims("exp is not an integer".into()))?,
    };
    let nbf = match raw.nbf {
        None => None,
        Some(v) => Some(
            v.as_i64()
                .ok_or_else(|| TokenError::Claims("nbf is not an integer".into()))?,
        ),
    };
    let sub = match raw.sub {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return Err(TokenError::Claims("sub is not a string".into())),
    };
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    if exp <= now {
        return Err(TokenError::Expired(now.abs_diff(exp)));
    }
    if let Some(nbf) = nbf {
        if nbf > now {
            return Err(TokenError::NotYetValid(nbf.abs_diff(now)));
        }
    }
    Ok(Claims { exp, nbf, sub })
}

/// The `token` parameter of a URL query string (`a=1&token=...`), percent-decoded; the first
/// one if several are given.
pub fn from_query(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(name, _)| name == QUERY_PARAM)
        .map(|(_, value)| value.into_owned())
}

/// Checks the token in a request's query string (the part after `?`, if any):
/// [`TokenError::Missing`] when it has none.
pub fn verify_query(secret: &Secret, query: Option<&str>, now: u64) -> Result<Claims, TokenError> {
    let token = query.and_then(from_query).ok_or(TokenError::Missing)?;
    verify(secret, &token, now)
}

/// `url` with `?token=TOKEN` (or `&token=TOKEN` when it has a query already) appended,
/// percent-encoded.
pub fn add_to_url(url: &str, token: &str) -> String {
    let encoded: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{QUERY_PARAM}={encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of PROTOCOL.md §2.1, computed independently with Python's `hmac`, `hashlib`
    /// and `base64` modules.
    const EXAMPLE_SECRET: &str = "fleetcast-example-secret-32-bytes!";
    const EXAMPLE_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
        eyJleHAiOjE3NjcyMjU2MDAsInN1YiI6IndhbGwtc2NyZWVuLTEifQ.\
        ZBDbT_IKQIprUgj5omFWaRwYHP3JbSRTzYu0wx02-Ws";
    /// `{"exp":2000000000,"nbf":1900000000}`, same secret, also from Python.
    const NBF_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
        eyJleHAiOjIwMDAwMDAwMDAsIm5iZiI6MTkwMDAwMDAwMH0.\
        RyBOWlSlcgpgl4O0vPjdxCfXXw4Mm5MaVNTu0q11V_c";
    const EXAMPLE_EXP: i64 = 1_767_225_600;

    fn secret() -> Secret {
        Secret::parse(EXAMPLE_SECRET).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A token with any header and claims JSON, correctly signed with `secret()`.
    fn signed(header: &str, claims: &str) -> String {
        let input = format!("{}.{}", b64(header.as_bytes()), b64(claims.as_bytes()));
        let mut mac = secret().mac();
        mac.update(input.as_bytes());
        format!("{input}.{}", b64(&mac.finalize().into_bytes()))
    }

    const HS256: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

    #[test]
    fn mint_matches_an_independently_computed_jwt() {
        let claims = Claims {
            exp: EXAMPLE_EXP,
            nbf: None,
            sub: Some("wall-screen-1".into()),
        };
        assert_eq!(mint(&secret(), &claims), EXAMPLE_TOKEN);
        assert_eq!(b64(br#"{"alg":"HS256","typ":"JWT"}"#), HEADER_B64);
    }

    #[test]
    fn verify_accepts_the_independent_jwt_before_exp() {
        let claims = verify(&secret(), EXAMPLE_TOKEN, EXAMPLE_EXP as u64 - 1).unwrap();
        assert_eq!(claims.exp, EXAMPLE_EXP);
        assert_eq!(claims.sub.as_deref(), Some("wall-screen-1"));
        assert_eq!(claims.nbf, None);
    }

    #[test]
    fn verify_expired_at_exp_and_after() {
        let exp = EXAMPLE_EXP as u64;
        assert_eq!(
            verify(&secret(), EXAMPLE_TOKEN, exp),
            Err(TokenError::Expired(0))
        );
        let err = verify(&secret(), EXAMPLE_TOKEN, exp + 12).unwrap_err();
        assert_eq!(err, TokenError::Expired(12));
        assert_eq!(err.to_string(), "token expired 12 s ago");
    }

    #[test]
    fn verify_nbf_in_the_future_is_not_yet_valid() {
        assert_eq!(
            verify(&secret(), NBF_TOKEN, 1_899_999_990),
            Err(TokenError::NotYetValid(10))
        );
        let ok = verify(&secret(), NBF_TOKEN, 1_900_000_000).unwrap();
        assert_eq!(ok.nbf, Some(1_900_000_000));
    }

    #[test]
    fn mint_then_verify_round_trips_every_claim() {
        let claims = Claims {
            exp: 2_000,
            nbf: Some(1_000),
            sub: Some("ops \"desk\" ✓".into()),
        };
        let token = mint(&secret(), &claims);
        assert_eq!(verify(&secret(), &token, 1_500), Ok(claims));
    }

    #[test]
    fn verify_another_secret_fails_the_signature() {
        let other = Secret::parse("another-secret-that-is-long-enough-32").unwrap();
        assert_eq!(verify(&other, EXAMPLE_TOKEN, 0), Err(TokenError::Signature));
    }

    #[test]
    fn verify_tampered_claims_or_signature_fail() {
        // Claims changed to a later expiry, old signature kept.
        let forged_claims = b64(br#"{"exp":9999999999,"sub":"wall-screen-1"}"#);
        let parts: Vec<&str> = EXAMPLE_TOKEN.split('.').collect();
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert_eq!(verify(&secret(), &forged, 0), Err(TokenError::Signature));
        // One signature character changed.
        let mut sig = parts[2].to_string();
        let first = if sig.starts_with('A') { "Q" } else { "A" };
        sig.replace_range(0..1, first);
        let flipped = format!("{}.{}.{sig}", parts[0], parts[1]);
        assert_eq!(verify(&secret(), &flipped, 0), Err(TokenError::Signature));
        // Signature cut short (its first 16 bytes, well encoded).
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let short = format!("{}.{}.{}", parts[0], parts[1], b64(&sig[..16]));
        assert_eq!(verify(&secret(), &short, 0), Err(TokenError::Signature));
    }

    #[test]
    fn verify_wrong_part_count_is_refused() {
        assert_eq!(verify(&secret(), "a.b", 0), Err(TokenError::Parts(2)));
        assert_eq!(
            verify(&secret(), &format!("{EXAMPLE_TOKEN}.x"), 0),
            Err(TokenError::Parts(4))
        );
        assert_eq!(verify(&secret(), "abc", 0), Err(TokenError::Parts(1)));
        assert_eq!(verify(&secret(), "", 0), Err(TokenError::Missing));
    }

    #[test]
    fn verify_bad_base64_is_refused() {
        let parts: Vec<&str> = EXAMPLE_TOKEN.split('.').collect();
        let padded = format!("{}=.{}.{}", parts[0], parts[1], parts[2]);
        assert_eq!(
            verify(&secret(), &padded, 0),
            Err(TokenError::Base64("header"))
        );
        let plus = format!("{}.{}.+{}", parts[0], parts[1], &parts[2][1..]);
        assert_eq!(
            verify(&secret(), &plus, 0),
            Err(TokenError::Base64("signature"))
        );
        // Correctly signed, but the claims part is not base64url.
        let input = format!("{HEADER_B64}.e30*");
        let mut mac = secret().mac();
        mac.update(input.as_bytes());
        let token = format!("{input}.{}", b64(&mac.finalize().into_bytes()));
        assert_eq!(
            verify(&secret(), &token, 0),
            Err(TokenError::Base64("claims"))
        );
    }

    #[test]
    fn verify_alg_none_and_others_are_refused_even_without_a_signature() {
        let claims = b64(br#"{"exp":9999999999}"#);
        let none = format!("{}.{claims}.", b64(br#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(
            verify(&secret(), &none, 0),
            Err(TokenError::Algorithm("none".into()))
        );
        let hs512 = signed(r#"{"alg":"HS512"}"#, r#"{"exp":9999999999}"#);
        assert_eq!(
            verify(&secret(), &hs512, 0),
            Err(TokenError::Algorithm("HS512".into()))
        );
        let lower = signed(r#"{"alg":"hs256"}"#, r#"{"exp":9999999999}"#);
        assert!(matches!(
            verify(&secret(), &lower, 0),
            Err(TokenError::Algorithm(_))
        ));
    }

    #[test]
    fn verify_bad_headers_are_refused() {
        for header in [
            "[]",
            "{}",
            r#"{"alg":256}"#,
            "not json",
            r#"{"alg":"HS256""#,
        ] {
            let token = signed(header, r#"{"exp":9999999999}"#);
            assert!(
                matches!(verify(&secret(), &token, 0), Err(TokenError::Header(_))),
                "{header}"
            );
        }
        let crit = signed(
            r#"{"alg":"HS256","crit":["x"],"x":1}"#,
            r#"{"exp":9999999999}"#,
        );
        assert!(matches!(
            verify(&secret(), &crit, 0),
            Err(TokenError::Header(_))
        ));
        // No typ, and unknown header fields, are fine.
        let minimal = signed(r#"{"alg":"HS256","kid":"k1"}"#, r#"{"exp":9999999999}"#);
        assert!(verify(&secret(), &minimal, 0).is_ok());
    }

    #[test]
    fn verify_missing_or_non_integer_exp_is_refused() {
        let cases = [
            (r#"{}"#, "exp is missing"),
            (r#"{"sub":"x"}"#, "exp is missing"),
            (r#"{"exp":"9999999999"}"#, "exp is not an integer"),
            (r#"{"exp":9999999999.5}"#, "exp is not an integer"),
            (r#"{"exp":null}"#, "exp is missing"),
            (r#"{"exp":1e30}"#, "exp is not an integer"),
            (
                r#"{"exp":99999999999999999999999}"#,
                "exp is not an integer",
            ),
            (r#"{"exp":9999999999,"nbf":"1"}"#, "nbf is not an integer"),
            (r#"{"exp":9999999999,"sub":7}"#, "sub is not a string"),
        ];
        for (claims, why) in cases {
            let token = signed(HS256, claims);
            assert_eq!(
                verify(&secret(), &token, 0),
                Err(TokenError::Claims(why.into())),
                "{claims}"
            );
        }
        for claims in ["[]", "7", "garbage", r#"{"exp":1,"exp":9999999999}"#] {
            let token = signed(HS256, claims);
            assert!(
                matches!(verify(&secret(), &token, 0), Err(TokenError::Claims(_))),
                "{claims}"
            );
        }
    }

    #[test]
    fn verify_ignores_unknown_claims() {
        let token = signed(HS256, r#"{"exp":9999999999,"aud":"x","iat":5,"roles":[1]}"#);
        assert_eq!(
            verify(&secret(), &token, 0),
            Ok(Claims::expiring_at(9_999_999_999))
        );
    }

    #[test]
    fn verify_negative_exp_is_expired_and_huge_now_does_not_overflow() {
        let token = signed(HS256, r#"{"exp":-5}"#);
        assert_eq!(verify(&secret(), &token, 0), Err(TokenError::Expired(5)));
        assert!(matches!(
            verify(&secret(), EXAMPLE_TOKEN, u64::MAX),
            Err(TokenError::Expired(_))
        ));
    }

    #[test]
    fn verify_too_long_is_refused_before_decoding() {
        let long = "a".repeat(MAX_TOKEN_LEN + 1);
        assert_eq!(
            verify(&secret(), &long, 0),
            Err(TokenError::TooLong(MAX_TOKEN_LEN + 1))
        );
        // Exactly the limit is still decoded (and here fails on its parts).
        let limit = "a".repeat(MAX_TOKEN_LEN);
        assert_eq!(verify(&secret(), &limit, 0), Err(TokenError::Parts(1)));
    }

    #[test]
    fn secret_shorter_than_32_bytes_is_refused() {
        assert_eq!(
            Secret::parse("short").unwrap_err(),
            SecretError::TooShort(5)
        );
        assert!(Secret::parse(&"x".repeat(31)).is_err());
        assert!(Secret::parse(&"x".repeat(32)).is_ok());
        assert_eq!(
            SecretError::TooShort(5).to_string(),
            "the secret is 5 bytes; at least 32 are required"
        );
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = secret();
        let shown = format!("{s:?} {:?}", Some(s.clone()));
        assert!(!shown.contains("fleetcast-example"), "{shown}");
        assert_eq!(format!("{s:?}"), "\"<redacted>\"");
    }

    #[test]
    fn secret_from_file_contents_takes_the_trimmed_first_line() {
        let s = Secret::from_file_contents(&format!("  {EXAMPLE_SECRET} \nsecond line\n")).unwrap();
        assert_eq!(s, secret());
        assert_eq!(
            Secret::from_file_contents("\n").unwrap_err(),
            SecretError::TooShort(0)
        );
    }

    #[test]
    fn from_query_finds_token_among_other_params() {
        assert_eq!(from_query("token=abc"), Some("abc".into()));
        assert_eq!(from_query("v=1&token=a.b_c-d&x"), Some("a.b_c-d".into()));
        assert_eq!(from_query("token=a%2Eb&token=second"), Some("a.b".into()));
        assert_eq!(from_query("tokens=abc&xtoken=1"), None);
        assert_eq!(from_query(""), None);
    }

    #[test]
    fn verify_query_without_token_is_missing() {
        assert_eq!(verify_query(&secret(), None, 0), Err(TokenError::Missing));
        assert_eq!(
            verify_query(&secret(), Some("v=1"), 0),
            Err(TokenError::Missing)
        );
        assert_eq!(
            verify_query(&secret(), Some("token="), 0),
            Err(TokenError::Missing)
        );
        let query = format!("v=1&token={EXAMPLE_TOKEN}");
        assert!(verify_query(&secret(), Some(&query), 0).is_ok());
    }

    #[test]
    fn add_to_url_appends_with_the_right_separator() {
        assert_eq!(
            add_to_url("https://h:1/p", "a.b"),
            "https://h:1/p?token=a.b"
        );
        assert_eq!(
            add_to_url("https://h:1/p?v=1", "a.b"),
            "https://h:1/p?v=1&token=a.b"
        );
        assert_eq!(add_to_url("ws://h/p", "a b+/"), "ws://h/p?token=a+b%2B%2F");
        let url = add_to_url("https://h/p?v=1", EXAMPLE_TOKEN);
        let query = url.split_once('?').unwrap().1;
        assert_eq!(from_query(query).as_deref(), Some(EXAMPLE_TOKEN));
    }
}
