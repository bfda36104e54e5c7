//! File operations the agent needs to be durable or to stay inside an
//! instance directory.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Replaces `path` with `contents` through a temporary file, fsyncs it and its
/// directory: after a crash, `path` holds the old or the new contents.
pub fn write_durably(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_parent(path)
}

/// Opens (creating, mode 0600, never through a symlink) a file used only for its lock.
pub fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// `std::fs::read_to_string`, with a missing file as `None`.
pub fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes the tree at `dir` without following symlinks and without ever
/// crossing into another filesystem: a mount point below `dir` (which would
/// mean host files such as `/usr` are visible there) is an error, never a
/// recursion.
pub fn remove_tree_on_one_device(dir: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_below(dir, meta.dev())?;
    std::fs::remove_dir(dir)
}

fn remove_below(dir: &Path, dev: u64) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.dev() != dev {
            return Err(io::Error::other(format!(
                "{} is on another filesystem (a mount?); not removing it",
                path.display()
            )));
        }
        if meta.is_dir() {
            remove_below(&path, dev)?;
            std::fs::remove_dir(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_durably_replaces_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uid");
        write_durably(&path, b"1").expect("write");
        write_durably(&path, b"2").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"2");
        assert!(!dir.path().join("uid.tmp").exists());
    }

    #[test]
    fn remove_tree_does_not_follow_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("keep"), b"x").expect("write");

        let tree = dir.path().join("tree");
        std::fs::create_dir_all(tree.join("a/b")).expect("mkdir");
        std::fs::write(tree.join("a/b/file"), b"x").expect("write");
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).expect("symlink");

        remove_tree_on_one_device(&tree).expect("remove");
        assert!(!tree.exists());
        assert!(outside.join("keep").exists());
        remove_tree_on_one_device(&tree).expect("a missing tree is fine");
    }
}
