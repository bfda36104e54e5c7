//! Audit export to a syslog collector: RFC 5424 messages, octet-counted over TCP and TLS
//! (RFC 5425), delivered at least once.
//!
//! The forwarder reads the log after its cursor (`<data>/audit/syslog.cursor`) and sends a
//! batch at a time. TCP says nothing of what the collector received, so the cursor kept on
//! disk stays at the start of the last batch sent: after a failed connection or a restart that
//! batch is sent again (a collector may see a record twice, identified by its `seq`, but never
//! misses one). When idle it sends a MARK message every few seconds, so a collector that went
//! away is noticed and the batch before is sent again. The backlog is the log itself: records
//! written while the collector is away, or the controller stopped, go out when it is back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use palisade_common::audit::{ascii_json, AuditRecord};
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt;

use crate::service::audit::{AuditLog, Filter, Scope};

/// Where and how to send.
#[derive(Debug, Clone)]
pub struct SyslogTarget {
    /// `host:port` of the collector.
    pub address: String,
    /// The CA the collector's certificate must chain to.
    pub ca: PathBuf,
    /// The name its certificate must carry (default: the host part of `address`).
    pub server_name: Option<String>,
}

const BATCH: usize = 500;
const IDLE_MARK: Duration = Duration::from_secs(5);
const CURSOR_FILE: &str = "syslog.cursor";
/// RFC 5612's documentation enterprise number, for the structured data of our messages.
const SD_ID: &str = "palisade@32473";

/// Starts the forwarder: it runs until the process ends.
pub fn spawn(audit: AuditLog, target: SyslogTarget) -> anyhow::Result<()> {
    let config = Arc::new(
        palisade_common::tls::client_config(&target.ca, None)
            .with_context(|| format!("the syslog CA {}", target.ca.display()))?,
    );
    let host = target
        .server_name
        .clone()
        .or_else(|| {
            target
                .address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
        })
        .context("the syslog address must be host:port")?;
    let name = ServerName::try_from(host.clone())
        .with_context(|| format!("{host} is not a server name"))?;
    let cursor_path = audit
        .path()
        .parent()
        .map(|d| d.join(CURSOR_FILE))
        .context("the audit log has no directory")?;
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            match run(&audit, &target, &config, name.clone(), &cursor_path).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), collector = %target.address,
                        "syslog export interrupted; the unconfirmed batch is sent again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
    Ok(())
}

fn read_cursor(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

async fn write_cursor(path: &Path, seq: u64) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = tokio::fs::File::create(&tmp).await?;
    file.write_all(seq.to_string().as_bytes()).await?;
    file.sync_all().await?;
    tokio::fs::rename(&tmp, path).await?;
    Ok(())
}

async fn run(
    audit: &AuditLog,
    target: &SyslogTarget,
    config: &Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    cursor_path: &Path,
) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(&target.address)
        .await
        .with_context(|| format!("connecting to {}", target.address))?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let mut stream = connector.connect(name, tcp).await.context("TLS")?;
    tracing::info!(collector = %target.address, "syslog export connected");
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "-".into());
    // Everything before `confirmed` is taken as received; the batch after it is resent after
    // any failure.
    let mut confirmed = read_cursor(cursor_path);
    let mut sent = confirmed;
    let mut idle = tokio::time::Instant::now();
    loop {
        let (records, _) = {
            let audit = audit.clone();
            tokio::task::spawn_blocking(move || {
                audit.records(&Scope::All, &Filter::default(), sent, BATCH)
            })
            .await??
        };
        if records.is_empty() {
            if idle.elapsed() >= IDLE_MARK {
                stream.write_all(&frame(&mark(&host))).await?;
                stream.flush().await?;
                idle = tokio::time::Instant::now();
                // The collector took a write after the last batch: that batch is in.
                if confirmed != sent {
                    confirmed = sent;
                    write_cursor(cursor_path, confirmed).await?;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let mut bytes = Vec::new();
        for record in &records {
            bytes.extend(frame(&message(record, &host)));
        }
        stream.write_all(&bytes).await?;
        stream.flush().await?;
        idle = tokio::time::Instant::now();
        // The batch before this one is now followed by a write that succeeded.
        if confirmed != sent {
            confirmed = sent;
            write_cursor(cursor_path, confirmed).await?;
        }
        sent = records.last().map_or(sent, |r| r.seq);
    }
}

fn frame(message: &str) -> Vec<u8> {
    format!("{} {message}", message.len()).into_bytes()
}

/// RFC 5424 structured-data value: `"`, `\` and `]` escaped.
fn sd_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One record as an RFC 5424 message: facility 13 (log audit), severity notice for what
/// succeeded and warning for refusals and failures; the record's own line as MSG.
fn message(record: &AuditRecord, host: &str) -> String {
    let ok = matches!(
        record.result.as_str(),
        "allowed" | "succeeded" | "observed" | "requested"
    );
    let pri = 13 * 8 + if ok { 5 } else { 4 };
    let line = String::from_utf8_lossy(&ascii_json(record)).into_owned();
    format!(
        "<{pri}>1 {} {host} palisade {} audit [{SD_ID} seq=\"{}\" type=\"{}\" action=\"{}\" result=\"{}\"] {line}",
        record.time,
        std::process::id(),
        record.seq,
        sd_value(&record.kind),
        sd_value(&record.action),
        sd_value(&record.result),
    )
}

fn mark(host: &str) -> String {
    let time = crate::service::audit::now_millis();
    format!(
        "<110>1 {time} {host} palisade {} MARK - -- MARK --",
        std::process::id()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_rfc5424_and_octet_counted() {
        let record = AuditRecord {
            seq: 9,
            time: "2026-12-04T10:00:00.250Z".into(),
            kind: "read".into(),
            request_id: "r".into(),
            source: "127.0.0.1:1".into(),
            subject: "user:u".into(),
            role: None,
            key_id: None,
            tenant_id: None,
            provider: false,
            action: "instance.list\"]x".into(),
            object: "o\u{2028}".into(),
            result: "denied".into(),
            code: None,
            hash: String::new(),
        };
        let m = message(&record, "h1");
        assert!(
            m.starts_with("<108>1 2026-12-04T10:00:00.250Z h1 palisade "),
            "{m}"
        );
        assert!(m.contains(r#"action="instance.list\"\]x""#), "{m}");
        assert!(m.is_ascii(), "{m}");
        let framed = frame(&m);
        let (len, rest) = std::str::from_utf8(&framed)
            .unwrap()
            .split_once(' ')
            .unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), rest.len());
    }
}
