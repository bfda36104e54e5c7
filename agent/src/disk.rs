//! An instance's writable disk: created once with `qemu-img`, erased on delete.

use std::fs::OpenOptions;
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::unistd::{Gid, Uid};

use crate::fsutil;
use crate::host_cmd::{HostCmdError, QemuImg};

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("creating the disk image")]
    Create(#[source] HostCmdError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a regular file; refusing to use it as a disk")]
    NotAFile { path: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DiskError + 'a {
    move |source| DiskError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// Makes sure the qcow2 disk exists at `disk`, owned by `owner`, mode 0600.
/// An existing disk is reused as is; a new one is built at `scratch` (outside
/// the instance's reach) and renamed into place. Returns whether it was created.
pub async fn ensure(
    qemu_img: &QemuImg,
    disk: &Path,
    scratch: &Path,
    size_gib: u32,
    owner: (Uid, Gid),
) -> Result<bool, DiskError> {
    match std::fs::symlink_metadata(disk) {
        Ok(meta) if meta.is_file() => {
            set_owner(disk, owner)?;
            return Ok(false);
        }
        Ok(_) => {
            return Err(DiskError::NotAFile {
                path: disk.display().to_string(),
            })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspecting", disk)(e)),
    }

    crate::image::remove_if_present(scratch).map_err(io_err("removing", scratch))?;
    qemu_img
        .create_qcow2(scratch, size_gib)
        .await
        .map_err(DiskError::Create)?;
    set_owner(scratch, owner)?;
    std::fs::rename(scratch, disk).map_err(io_err("moving the new disk to", disk))?;
    fsutil::sync_parent(disk).map_err(io_err("syncing the directory of", disk))?;
    Ok(true)
}

/// Gives the disk to the instance uid without following a symlink.
fn set_owner(path: &Path, owner: (Uid, Gid)) -> Result<(), DiskError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("opening", path))?;
    nix::unistd::fchown(&file, Some(owner.0), Some(owner.1))
        .map_err(|e| io_err("chown", path)(e.into()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("chmod", path))
}

/// Erases everything in the instance's `run/`: each regular file (the disk,
/// and anything the instance uid may have moved it to) is overwritten with
/// zeros over its whole length, synced and unlinked; sockets and symlinks are
/// unlinked (never followed); then the directory is synced. Returns the size of
/// the disk file, or `None` when there was no disk.
///
/// TODO(security): on copy-on-write or flash storage, overwriting a file does
/// not guarantee the old blocks are gone; a per-disk encryption key destroyed
/// on delete would.
pub fn erase_run_dir(run: &Path, disk_name: &str) -> Result<Option<u64>, DiskError> {
    let entries = match std::fs::read_dir(run) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("listing", run)(e)),
    };
    let mut disk_len = None;
    for entry in entries {
        let path = entry.map_err(io_err("listing", run))?.path();
        let meta = std::fs::symlink_metadata(&path).map_err(io_err("inspecting", &path))?;
        if meta.is_file() {
            let len = erase_file(&path)?;
            if path.file_name().is_some_and(|n| n == disk_name) {
                disk_len = Some(len);
            }
        } else if meta.is_dir() {
            // Only the instance uid makes directories here: what it put in
            // them is erased just the same (a disk name there is no disk).
            erase_run_dir(&path, "")?;
            std::fs::remove_dir(&path).map_err(io_err("removing", &path))?;
        } else {
            std::fs::remove_file(&path).map_err(io_err("unlinking", &path))?;
        }
    }
    fsutil::sync_dir(run).map_err(io_err("syncing", run))?;
    Ok(disk_len)
}

/// Overwrites one regular file with zeros, syncs and unlinks it.
fn erase_file(path: &Path) -> Result<u64, DiskError> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("opening", path))?;
    let meta = file.metadata().map_err(io_err("inspecting", path))?;
    if !meta.is_file() {
        return Err(DiskError::NotAFile {
            path: path.display().to_string(),
        });
    }

    let len = meta.len();
    let zeros = vec![0u8; 1 << 20];
    let mut left = len;
    let mut writer = &file;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        writer
            .write_all(&zeros[..n])
            .map_err(io_err("overwriting", path))?;
        left -= n as u64;
    }
    file.sync_all().map_err(io_err("syncing", path))?;
    drop(file);
    std::fs::remove_file(path).map_err(io_err("unlinking", path))?;
    Ok(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erase_zeroes_every_file_then_unlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run = dir.path().join("run");
        std::fs::create_dir(&run).expect("mkdir");
        std::fs::write(run.join("disk.qcow2"), vec![0xAB; 3 << 20]).expect("write");
        std::fs::create_dir(run.join("sub")).expect("mkdir");
        std::fs::write(run.join("sub/moved-away"), vec![0xCD; 1000]).expect("write");
        // Second links let the test read the blocks after the unlinks.
        std::fs::hard_link(run.join("disk.qcow2"), dir.path().join("w1")).expect("link");
        std::fs::hard_link(run.join("sub/moved-away"), dir.path().join("w2")).expect("link");

        assert_eq!(
            erase_run_dir(&run, "disk.qcow2").expect("erase"),
            Some(3 << 20)
        );
        assert_eq!(std::fs::read_dir(&run).expect("list").count(), 0);
        for (witness, len) in [("w1", 3 << 20), ("w2", 1000)] {
            let left = std::fs::read(dir.path().join(witness)).expect("read");
            assert_eq!(left.len(), len);
            assert!(left.iter().all(|b| *b == 0), "{witness} not zeroed");
        }
    }

    #[test]
    fn erase_of_nothing_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            erase_run_dir(&dir.path().join("run"), "disk.qcow2").expect("erase"),
            None
        );
        assert_eq!(
            erase_run_dir(dir.path(), "disk.qcow2").expect("erase"),
            None
        );
    }

    #[test]
    fn erase_unlinks_a_planted_symlink_without_following_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"host data").expect("write");
        let run = dir.path().join("run");
        std::fs::create_dir(&run).expect("mkdir");
        std::os::unix::fs::symlink(&victim, run.join("disk.qcow2")).expect("symlink");

        assert_eq!(erase_run_dir(&run, "disk.qcow2").expect("erase"), None);
        assert_eq!(std::fs::read(&victim).expect("read"), b"host data");
        assert!(std::fs::symlink_metadata(run.join("disk.qcow2")).is_err());
    }
}
