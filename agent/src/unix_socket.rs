//! Connecting to QEMU's Unix sockets by their host path, whatever its length.
//!
//! `sun_path` holds at most 107 bytes, and `<data-dir>/instances/<id>/root/run/
//! console.sock` can be longer. A long path is reached through the directory's
//! descriptor instead: `/proc/self/fd/<n>/<name>` is short.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use tokio::net::UnixStream;

const SUN_PATH_MAX: usize = 107;

/// Connects to the socket at `path` that QEMU process `pid` listens on, and
/// refuses any other listener.
///
/// The socket lives in the VM's own `run/` directory, which the VM's uid owns:
/// a compromised QEMU can put a symlink there to another VM's socket, or a
/// socket of its own. Checking the path first would race; the peer's
/// credentials of the connection made (SO_PEERCRED: who called `listen`) do not.
pub async fn connect_to_process(path: &Path, pid: u32) -> io::Result<UnixStream> {
    let stream = connect(path).await?;
    let peer = stream.peer_cred()?;
    if peer.pid() != i32::try_from(pid).ok() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is served by process {:?}, not by this instance's QEMU ({pid})",
                path.display(),
                peer.pid()
            ),
        ));
    }
    Ok(stream)
}

pub async fn connect(path: &Path) -> io::Result<UnixStream> {
    if path.as_os_str().len() <= SUN_PATH_MAX {
        return UnixStream::connect(path).await;
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path has no parent",
        ));
    };
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    // `dir` stays open until the connection is made.
    let stream = UnixStream::connect(&short).await;
    drop(dir);
    stream
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn connects_through_a_path_longer_than_sun_path() {
        let base = tempfile::tempdir().expect("tempdir");
        let deep = base.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).expect("mkdir");
        let socket = deep.join("qmp.sock");
        assert!(socket.as_os_str().len() > SUN_PATH_MAX);

        // Bind through the same trick: the listener side has the same limit.
        let dir = std::fs::File::open(&deep).expect("open dir");
        let short = format!("/proc/self/fd/{}/qmp.sock", dir.as_raw_fd());
        let listener = UnixListener::bind(&short).expect("bind");

        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        connect(&socket).await.expect("connect");
        accept.await.expect("join").expect("accept");
    }

    #[tokio::test]
    async fn a_socket_served_by_another_process_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        // This process listens: it passes for itself, not for another pid.
        connect_to_process(&socket, std::process::id())
            .await
            .expect("own socket");
        let err = connect_to_process(&socket, 1)
            .await
            .expect_err("pid 1 does not serve it");
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        accept.abort();
    }
}
