//! The HTTP shell of publishing: one NDJSON request to `/v1/positions` and what its answer means.
//!
//! Waiting, retrying and counting are the caller's (see `deliver` in [`crate::publish`]); this
//! layer only owns the HTTP client, the URL and the token.

use std::time::Duration;

use reqwest::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use super::plan::{classify, Reply};
use crate::server::config::PublishToken;

/// Path of the ingest endpoint on the server's HTTP port.
pub const POSITIONS_PATH: &str = "/v1/positions";
/// Path of the fleet listing (and, with `/{id}`, of one car).
pub const CARS_PATH: &str = "/v1/cars";

/// Why a sender cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// The URL does not parse or is not plain HTTP.
    #[error("--url {url:?}: {why}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// The HTTP client could not be built.
    #[error("building the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// Posts batches of fixes to one server with one token.
pub struct Sender {
    client: reqwest::Client,
    base: Url,
    positions: Url,
    token: PublishToken,
}

impl Sender {
    /// A sender for the server at `url` (`http://HOST:PORT`, or `https://` for a server with a
    /// CA certificate, verified against the system roots; optionally ending in
    /// `/v1/positions`), each request answered within `timeout`.
    pub fn new(url: &str, token: PublishToken, timeout: Duration) -> Result<Sender, SenderError> {
        let bad = |why: String| SenderError::Url {
            url: url.to_string(),
            why,
        };
        let trimmed = url.trim().trim_end_matches('/');
        let trimmed = trimmed.strip_suffix(POSITIONS_PATH).unwrap_or(trimmed);
        let base = Url::parse(&format!("{trimmed}/")).map_err(|e| bad(e.to_string()))?;
        if base.scheme() != "http" && base.scheme() != "https" {
            return Err(bad(format!(
                "{}:// is not supported: use the server's HTTP port, http://HOST:8080 (or \
                 https:// for a server with a CA certificate)",
                base.scheme()
            )));
        }
        let positions = base
            .join(POSITIONS_PATH.trim_start_matches('/'))
            .map_err(|e| bad(e.to_string()))?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A redirected POST would silently become a GET: report redirects instead.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fleetcast-publish/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender {
            client,
            base,
            positions,
            token,
        })
    }

    /// The ingest endpoint this sender posts to.
    pub fn positions_url(&self) -> &Url {
        &self.positions
    }

    /// Posts one NDJSON body whose fixes came from input `lines`; `Err` is a transport failure
    /// (no answer), with its causes.
    pub async fn post(&self, body: bytes::Bytes, lines: &[Option<usize>]) -> Result<Reply, String> {
        let response = self
            .client
            .post(self.positions.clone())
            .bearer_auth(self.token.expose())
            .header(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            )
            .body(body)
            .send()
            .await
            .map_err(|e| chain(&e))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.bytes().await.map_err(|e| chain(&e))?;
        Ok(classify(
            status.as_u16(),
            retry_after.as_deref(),
            &body,
            lines,
        ))
    }

    /// Removes a car from the fleet (`DELETE /v1/cars/{id}`); one attempt.
    pub async fn delete_car(&self, id: &str) -> Result<(), String> {
        let mut url = self
            .base
            .join(CARS_PATH.trim_start_matches('/'))
            .map_err(|e| e.to_string())?;
        url.path_segments_mut()
            .map_err(|()| "the URL cannot take a path".to_string())?
            .push(id);
        let response = self
            .client
            .delete(url)
            .bearer_auth(self.token.expose())
            .send()
            .await
            .map_err(|e| chain(&e))?;
        match response.status() {
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            status => Err(format!("HTTP {status}")),
        }
    }
}

/// An error with its causes, `a: b: c` (reqwest's own message names only the URL).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> PublishToken {
        PublishToken::new("0123456789abcdef")
    }

    #[test]
    fn sender_url_takes_a_base_or_the_endpoint_and_only_http() {
        let t = Duration::from_secs(1);
        for url in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.0.0.1:8080/v1/positions",
        ] {
            let s = Sender::new(url, token(), t).unwrap();
            assert_eq!(
                s.positions_url().as_str(),
                "http://127.0.0.1:8080/v1/positions"
            );
        }
        let s = Sender::new("https://fleet.example/", token(), t).unwrap();
        assert_eq!(
            s.positions_url().as_str(),
            "https://fleet.example/v1/positions"
        );
        let e = Sender::new("ftp://example.com", token(), t).err().unwrap();
        assert!(e.to_string().contains("is not supported"), "{e}");
        assert!(Sender::new("not a url", token(), t).is_err());
    }

    #[tokio::test]
    async fn sender_reports_a_refused_connection_with_its_cause() {
        // Bind then drop a listener: its port is (almost certainly) closed now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let s = Sender::new(
            &format!("http://127.0.0.1:{port}"),
            token(),
            Duration::from_secs(2),
        )
        .unwrap();
        let e = s
            .post(bytes::Bytes::from_static(b"{}\n"), &[Some(1)])
            .await
            .unwrap_err();
        assert!(e.to_lowercase().contains("refused"), "{e}");
    }
}
