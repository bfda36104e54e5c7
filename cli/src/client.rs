//! The API client: HTTPS pinned to the platform CA, every request signed with the profile's
//! Ed25519 key (see `palisade_common::signing`).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use ed25519_dalek::SigningKey;
use palisade_common::error::ErrorBody;
use palisade_common::signing;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub struct Client {
    http: reqwest::Client,
    endpoint: String,
    signer: Option<(String, SigningKey)>,
}

/// An error the API answered with: its status and stable code, for scripts and tests.
#[derive(Debug, thiserror::Error)]
#[error("{message} (HTTP {status}, {code})")]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Client {
    pub fn new(
        endpoint: &str,
        ca: &Path,
        signer: Option<(String, SigningKey)>,
    ) -> anyhow::Result<Client> {
        let tls = palisade_common::tls::client_config(ca, None)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Client {
            http,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            signer,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.json(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> anyhow::Result<T> {
        self.json(Method::POST, path, Some(body)).await
    }

    pub async fn json<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let body = match body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        let bytes = self.send(method, path, body).await?;
        if bytes.is_empty() {
            return serde_json::from_slice(b"null").context("empty answer");
        }
        serde_json::from_slice(&bytes).context("parsing the API's answer")
    }

    /// Sends one signed request; returns the body of a 2xx answer, or an [`ApiError`].
    pub async fn send(&self, method: Method, path: &str, body: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        let url = reqwest::Url::parse(&format!("{}{path}", self.endpoint))
            .with_context(|| format!("bad URL {}{path}", self.endpoint))?;
        let mut request = self.http.request(method.clone(), url.clone());
        if !body.is_empty() {
            request = request.header("content-type", "application/json");
        }
        if let Some((key_id, key)) = &self.signer {
            let params = signing::SignatureParams {
                created: time::OffsetDateTime::now_utc().unix_timestamp(),
                nonce: signing::new_nonce(),
                keyid: key_id.clone(),
            };
            let message = signing::Message {
                method: method.as_str(),
                path: url.path(),
                query: url.query().unwrap_or(""),
                body: &body,
            };
            let headers = signing::sign(key, &params, &message);
            request = request
                .header(signing::HEADER_CONTENT_DIGEST, headers.content_digest)
                .header(signing::HEADER_SIGNATURE_INPUT, headers.signature_input)
                .header(signing::HEADER_SIGNATURE, headers.signature);
        }
        let response = request
            .body(body)
            .send()
            .await
            .with_context(|| format!("connecting to {}", self.endpoint))?;
        let status = response.status();
        let bytes = response.bytes().await?.to_vec();
        if status.is_success() {
            return Ok(bytes);
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.error.code, b.error.message),
            Err(_) => (
                "unknown".into(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ),
        };
        Err(ApiError {
            status: status.as_u16(),
            code,
            message,
        }
        .into())
    }
}
