//! The controller's side of the host agent API: HTTPS with mutual TLS, both ends certified by
//! the platform CA.

use std::time::Duration;

use anyhow::Context;
use palisade_common::agent_api::{
    ConsoleChunk, EraseReport, HostNetwork, HostTraffic, InstanceSpec, InstanceStatus,
};
use palisade_common::error::ErrorBody;
use serde::de::DeserializeOwned;

use crate::pki::Pki;

#[derive(Clone)]
pub struct AgentClient {
    base: String,
    http: reqwest::Client,
}

/// A failed agent call. `code` is the agent's stable error code when it answered with one.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("host agent unreachable")]
    Unreachable(#[source] reqwest::Error),
    #[error("host agent refused: {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
}

impl AgentClient {
    pub fn new(base: &str, pki: &Pki) -> anyhow::Result<AgentClient> {
        let tls = palisade_common::tls::client_config(
            &pki.ca_cert,
            Some((&pki.client_cert, &pki.client_key)),
        )?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the agent client")?;
        Ok(AgentClient {
            base: base.trim_end_matches('/').to_string(),
            http,
        })
    }

    pub async fn list(&self) -> Result<Vec<InstanceStatus>, AgentError> {
        self.call(self.http.get(self.url("/v1/instances"))).await
    }

    pub async fn start(&self, spec: &InstanceSpec) -> Result<InstanceStatus, AgentError> {
        let url = self.url(&format!("/v1/instances/{}/start", spec.id));
        self.call(self.http.post(url).json(spec)).await
    }

    pub async fn stop(&self, id: &str) -> Result<InstanceStatus, AgentError> {
        let url = self.url(&format!("/v1/instances/{id}/stop"));
        self.call(self.http.post(url)).await
    }

    pub async fn delete(&self, id: &str) -> Result<EraseReport, AgentError> {
        let url = self.url(&format!("/v1/instances/{id}"));
        self.call(self.http.delete(url)).await
    }

    pub async fn console(&self, id: &str, offset: u64) -> Result<ConsoleChunk, AgentError> {
        let url = self.url(&format!("/v1/instances/{id}/console?offset={offset}"));
        self.call(self.http.get(url)).await
    }

    /// The host's spoof counters and flows, per port.
    pub async fn traffic(&self) -> Result<HostTraffic, AgentError> {
        let url = self.url("/v1/network/traffic");
        self.call(self.http.get(url)).await
    }

    /// Hands the host its whole tenant network (the agent applies it atomically).
    pub async fn put_network(&self, network: &HostNetwork) -> Result<(), AgentError> {
        let url = self.url("/v1/network");
        let response = self
            .http
            .put(url)
            .json(network)
            .send()
            .await
            .map_err(AgentError::Unreachable)?;
        if response.status().is_success() {
            return Ok(());
        }
        Self::refused(response).await
    }

    /// Types `data` on the instance's serial console.
    pub async fn console_input(&self, id: &str, data: Vec<u8>) -> Result<(), AgentError> {
        let url = self.url(&format!("/v1/instances/{id}/console"));
        let response = self
            .http
            .post(url)
            .body(data)
            .send()
            .await
            .map_err(AgentError::Unreachable)?;
        if response.status().is_success() {
            return Ok(());
        }
        Self::refused(response).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, AgentError> {
        let response = request.send().await.map_err(AgentError::Unreachable)?;
        let status = response.status();
        if status.is_success() {
            return response.json().await.map_err(AgentError::Unreachable);
        }
        Self::refused(response).await
    }

    async fn refused<T>(response: reqwest::Response) -> Result<T, AgentError> {
        let status = response.status();
        let body: Option<ErrorBody> = response.json().await.ok();
        let (code, message) = body
            .map(|b| (b.error.code, b.error.message))
            .unwrap_or_else(|| ("unknown".into(), format!("HTTP {status}")));
        Err(AgentError::Refused {
            status: status.as_u16(),
            code,
            message,
        })
    }
}
