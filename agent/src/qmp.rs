//! A small QMP client: greeting, `qmp_capabilities`, then commands.
//!
//! QMP speaks one JSON object per line. Events may arrive between a command
//! and its answer; they are skipped. Only what the agent needs is here.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line we accept from QEMU; answers we use are tiny. QEMU is not
/// trusted (a guest may own it), so nothing it sends may grow agent memory.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP peer sent an unexpected message: {0}")]
    Protocol(String),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP did not answer within {0:?}")]
    TimedOut(Duration),
}

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connects to the monitor of QEMU process `pid` (no other process's),
    /// reads the greeting and leaves capability negotiation mode.
    pub async fn connect(path: &Path, pid: u32, timeout: Duration) -> Result<Self, QmpError> {
        tokio::time::timeout(timeout, Self::connect_inner(path, pid))
            .await
            .map_err(|_| QmpError::TimedOut(timeout))?
    }

    async fn connect_inner(path: &Path, pid: u32) -> Result<Self, QmpError> {
        let stream = crate::unix_socket::connect_to_process(path, pid).await?;
        let (read, writer) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(read),
            writer,
        };
        let greeting = qmp.next_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(greeting.to_string()));
        }
        qmp.execute_inner("qmp_capabilities").await?;
        Ok(qmp)
    }

    /// Runs `command` (no arguments) and returns its `return` value.
    pub async fn execute(&mut self, command: &str, timeout: Duration) -> Result<Value, QmpError> {
        tokio::time::timeout(timeout, self.execute_inner(command))
            .await
            .map_err(|_| QmpError::TimedOut(timeout))?
    }

    async fn execute_inner(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = json!({ "execute": command }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).await?;
        loop {
            let message = self.next_message().await?;
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |name: &str| {
                    error
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            // An asynchronous event: not the answer we wait for.
        }
    }

    async fn next_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let mut limited = (&mut self.reader).take(MAX_LINE as u64);
        limited.read_until(b'\n', &mut line).await?;
        if line.is_empty() {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(QmpError::Protocol("over-long or unterminated line".into()));
        }
        serde_json::from_slice(&line)
            .map_err(|_| QmpError::Protocol(String::from_utf8_lossy(&line).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU monitor that answers `qmp_capabilities`, sends an event, then
    /// answers `quit`.
    async fn fake_qemu(listener: UnixListener) {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        write
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .expect("greeting");
        let caps = lines.next_line().await.expect("read").expect("line");
        assert!(caps.contains("qmp_capabilities"));
        write.write_all(b"{\"return\": {}}\n").await.expect("write");
        let quit = lines.next_line().await.expect("read").expect("line");
        assert!(quit.contains("\"quit\""));
        write
            .write_all(b"{\"event\": \"SHUTDOWN\", \"data\": {}}\n{\"return\": {}}\n")
            .await
            .expect("write");
    }

    #[tokio::test]
    async fn handshake_then_command_skipping_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let server = tokio::spawn(fake_qemu(UnixListener::bind(&path).expect("bind")));

        let timeout = Duration::from_secs(5);
        let mut qmp = Qmp::connect(&path, std::process::id(), timeout)
            .await
            .expect("connect");
        assert_eq!(qmp.execute("quit", timeout).await.expect("quit"), json!({}));
        server.await.expect("server");
    }

    #[tokio::test]
    async fn a_command_error_carries_class_and_description() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"{\"QMP\": {}}\n").await.expect("write");
            let _ = lines.next_line().await;
            write
                .write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n")
                .await
                .expect("write");
        });

        let err = Qmp::connect(&path, std::process::id(), Duration::from_secs(5))
            .await
            .err();
        assert!(matches!(err, Some(QmpError::Command { class, .. }) if class == "GenericError"));
        server.await.expect("server");
    }
}
