//! The agent's data directory: private to root, and used by one agent at a
//! time.
//!
//! Two agents on one directory would each adopt, stop and clean up the other's
//! QEMU processes and rewrite the same state files. So the agent holds an
//! exclusive `flock` on `<data-dir>/agent.lock` for as long as it runs; the
//! kernel releases it when the process ends, however it ends. The descriptor
//! is close-on-exec: the QEMU processes, which outlive the agent, never hold it.

use std::fs::{File, TryLockError};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error(
        "another agent is using the data directory {} (it holds {}); stop it, or give this \
         agent another --data-dir",
        dir.display(),
        dir.join(LOCK_FILE).display()
    )]
    InUse { dir: PathBuf },
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DataDirError {
    let path = path.to_path_buf();
    move |source| DataDirError::Io { what, path, source }
}

/// Creates `dir` (and missing parents) readable by root only.
pub fn create(dir: &Path) -> Result<(), DataDirError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("creating", dir))
}

/// The agent's hold on its data directory; released when dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// Takes the data directory's lock, or fails at once if another agent holds
/// it; then makes the directory 0700, so that no other local user reads the
/// instances' state, logs and consoles below it. (The jailer chroots as root
/// before it drops to the instance uid, so that uid needs no way in.)
pub fn claim(dir: &Path) -> Result<DataDirLock, DataDirError> {
    let path = dir.join(LOCK_FILE);
    let file = crate::fsutil::open_lock_file(&path).map_err(io_err("opening", &path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(DataDirError::InUse {
                dir: dir.to_path_buf(),
            })
        }
        Err(TryLockError::Error(e)) => return Err(io_err("locking", &path)(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("making private", dir))?;
    Ok(DataDirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn a_second_claim_is_refused_until_the_first_is_dropped() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("data");
        create(&dir).expect("create");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");

        let first = claim(&dir).expect("first claim");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);

        let refused = claim(&dir).expect_err("second claim");
        assert!(matches!(refused, DataDirError::InUse { .. }), "{refused:?}");
        let message = refused.to_string();
        assert!(
            message.contains(&format!("data directory {}", dir.display())),
            "{message}"
        );

        drop(first);
        claim(&dir).expect("claim after release");
    }
}
