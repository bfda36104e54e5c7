//! Digest-verified copies of an image's kernel and initrd.
//!
//! The bytes QEMU boots are the bytes we hashed: each file is copied into the
//! instance's `run/` while it is hashed, and the copy is deleted when the
//! digest does not match. Checking the source and then letting QEMU open it
//! would leave a window in which the source could change.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("reading image file {path}")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    WriteCopy {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has SHA-256 {actual}, the image pins {expected}")]
    DigestMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// Copies `source` to `dest` while hashing it, and keeps the copy only if its
/// SHA-256 (lower-case hex) is `expected`. The copy is created fresh (never
/// through an existing file or symlink at `dest`: `run/` belongs to the
/// instance's uid), read-only and owned by `owner`, so the jailed QEMU can read
/// it. Returns the number of bytes copied.
pub fn copy_verified(
    source: &Path,
    dest: &Path,
    expected: &str,
    owner: (Uid, Gid),
) -> Result<u64, ImageError> {
    let write_err = |source| ImageError::WriteCopy {
        path: dest.to_path_buf(),
        source,
    };
    let mut input = File::open(source).map_err(|e| ImageError::ReadSource {
        path: source.to_path_buf(),
        source: e,
    })?;

    remove_if_present(dest).map_err(write_err)?;
    let mut output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dest)
        .map_err(write_err)?;

    let copied = copy_hashing(&mut input, &mut output, source, dest);
    let (len, actual) = match copied {
        Ok(done) => done,
        Err(e) => {
            let _ = remove_if_present(dest);
            return Err(e);
        }
    };
    if actual != expected {
        let _ = remove_if_present(dest);
        return Err(ImageError::DigestMismatch {
            path: source.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }

    nix::unistd::fchown(&output, Some(owner.0), Some(owner.1))
        .map_err(|e| write_err(io::Error::from(e)))?;
    Ok(len)
}

fn copy_hashing(
    input: &mut File,
    output: &mut File,
    source: &Path,
    dest: &Path,
) -> Result<(u64, String), ImageError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(ImageError::ReadSource {
                    path: source.to_path_buf(),
                    source: e,
                })
            }
        };
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(|e| ImageError::WriteCopy {
                path: dest.to_path_buf(),
                source: e,
            })?;
        len += n as u64;
    }
    Ok((len, hex::encode(hasher.finalize())))
}

/// Unlinks `path` (a symlink itself, never its target) if it exists.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> (Uid, Gid) {
        (Uid::current(), Gid::current())
    }

    fn sha256_hex(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    #[test]
    fn copies_when_the_digest_matches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("kernel");
        std::fs::write(&src, b"kernel bytes").expect("write");
        let dest = dir.path().join("copy");

        let len = copy_verified(&src, &dest, &sha256_hex(b"kernel bytes"), me()).expect("copy");
        assert_eq!(len, 12);
        assert_eq!(std::fs::read(&dest).expect("read"), b"kernel bytes");
    }

    #[test]
    fn a_mismatch_leaves_no_copy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("kernel");
        std::fs::write(&src, b"tampered").expect("write");
        let dest = dir.path().join("copy");

        let err = copy_verified(&src, &dest, &sha256_hex(b"original"), me()).err();
        assert!(matches!(err, Some(ImageError::DigestMismatch { .. })));
        assert!(!dest.exists());
    }

    #[test]
    fn a_symlink_planted_at_the_destination_is_replaced_not_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("kernel");
        std::fs::write(&src, b"kernel").expect("write");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").expect("write");
        let dest = dir.path().join("copy");
        std::os::unix::fs::symlink(&victim, &dest).expect("symlink");

        copy_verified(&src, &dest, &sha256_hex(b"kernel"), me()).expect("copy");
        assert_eq!(std::fs::read(&victim).expect("read"), b"precious");
        assert!(!std::fs::symlink_metadata(&dest).expect("stat").is_symlink());
    }
}
