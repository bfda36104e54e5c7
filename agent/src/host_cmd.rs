//! The one runner for host tools (`qemu-img`, `ip`, `bridge`, `nft`, `tc`, `conntrack`).
//!
//! Every call goes through [`run`], whose error keeps the argv, the exit status
//! and the tool's stderr, so a failure can be diagnosed from the log alone. The
//! environment is cleared: a tool sees only what we pass it.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

/// Longest stderr kept in an error; tools can be chatty.
const STDERR_KEPT: usize = 4096;

/// A command line, printed shell-like in errors and logs.
#[derive(Debug, Clone)]
pub struct Argv(Vec<OsString>);

impl fmt::Display for Argv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let words: Vec<_> = self.0.iter().map(|w| w.to_string_lossy()).collect();
        f.write_str(&words.join(" "))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostCmdError {
    #[error("could not start `{argv}`")]
    Spawn {
        argv: Argv,
        #[source]
        source: std::io::Error,
    },
    #[error("`{argv}` exited with {status}: {stderr}")]
    Failed {
        argv: Argv,
        status: ExitStatus,
        stderr: String,
    },
    #[error("`{argv}` did not finish within {timeout:?}")]
    TimedOut { argv: Argv, timeout: Duration },
}

/// Runs `program args…` to completion and returns its output when it exits 0.
/// The child is killed if it outlives `timeout`.
pub async fn run(
    program: &Path,
    args: &[OsString],
    timeout: Duration,
) -> Result<Output, HostCmdError> {
    run_with_input(program, args, None, timeout).await
}

/// As [`run`], with `input` written to the tool's standard input (then closed).
pub async fn run_with_input(
    program: &Path,
    args: &[OsString],
    input: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, HostCmdError> {
    let mut words = vec![program.as_os_str().to_owned()];
    words.extend(args.iter().cloned());
    let argv = Argv(words);

    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("LC_ALL", "C")
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| HostCmdError::Spawn {
            argv: argv.clone(),
            source,
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        let written = tokio::time::timeout(timeout, async {
            stdin.write_all(input).await?;
            stdin.shutdown().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            // The tool stopped reading: its exit status and stderr below say why.
            tracing::debug!(%argv, "standard input not taken whole");
        }
    }

    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(result) => result.map_err(|source| HostCmdError::Spawn {
            argv: argv.clone(),
            source,
        })?,
        Err(_) => return Err(HostCmdError::TimedOut { argv, timeout }),
    };

    if !output.status.success() {
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if stderr.len() > STDERR_KEPT {
            let mut cut = STDERR_KEPT;
            while !stderr.is_char_boundary(cut) {
                cut -= 1;
            }
            stderr.truncate(cut);
        }
        return Err(HostCmdError::Failed {
            argv,
            status: output.status,
            stderr,
        });
    }
    Ok(output)
}

/// `qemu-img`, with the image format always pinned.
#[derive(Debug, Clone)]
pub struct QemuImg {
    pub program: PathBuf,
}

impl QemuImg {
    /// Creates an empty qcow2 image of `size_gib` GiB at `path` (no backing file).
    pub async fn create_qcow2(&self, path: &Path, size_gib: u32) -> Result<(), HostCmdError> {
        let args = [
            OsString::from("create"),
            OsString::from("-q"),
            OsString::from("-f"),
            OsString::from("qcow2"),
            path.as_os_str().to_owned(),
            OsString::from(format!("{size_gib}G")),
        ];
        run(&self.program, &args, Duration::from_secs(60)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn failure_keeps_argv_status_and_stderr() {
        let args = [
            OsString::from("-c"),
            OsString::from("echo broken >&2; exit 3"),
        ];
        let err = run(Path::new("/bin/sh"), &args, Duration::from_secs(10))
            .await
            .err();
        match err {
            Some(HostCmdError::Failed {
                argv,
                status,
                stderr,
            }) => {
                assert_eq!(argv.to_string(), "/bin/sh -c echo broken >&2; exit 3");
                assert_eq!(status.code(), Some(3));
                assert_eq!(stderr, "broken");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let err = run(Path::new("/nonexistent/tool"), &[], Duration::from_secs(10))
            .await
            .err();
        assert!(matches!(err, Some(HostCmdError::Spawn { .. })));
    }
}
