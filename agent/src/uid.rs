//! Instance uids, unique on the whole host.
//!
//! Each instance runs as a uid (and gid) of its own, `UID_BASE + n`. Several
//! agents may share a host (one per data directory), and each only records the
//! uids of its own instances, so a uid counts as taken when:
//!
//! - this agent has recorded it for one of its instances;
//! - a live process on the host runs under it, as uid or gid (another agent's
//!   QEMU, or anything else);
//! - it names a host account or group.
//!
//! Two agents could still see the same uid free at the same moment, and a
//! jailer only shows its instance uid in `/proc` once it has dropped root. So
//! the agent holds the host-wide [`HostUidLock`] from choosing a uid (or
//! re-checking a recorded one) until QEMU runs under it.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, ErrorKind};
use std::path::Path;

/// Instance uids (and gids) are `UID_BASE + n`, the lowest free `n` first.
pub const UID_BASE: u32 = 200_000;
pub const UID_COUNT: u32 = 65_536;

/// The lock every agent on the host takes while it allocates a uid and starts
/// QEMU under it. `/run` is a root-only tmpfs: the file never outlives a boot.
pub const HOST_LOCK_PATH: &str = "/run/palisade-uid.lock";

/// The lowest instance uid that is not in `taken` and for which
/// `is_host_account` is false.
pub fn choose(taken: &BTreeSet<u32>, is_host_account: impl Fn(u32) -> bool) -> Option<u32> {
    (UID_BASE..UID_BASE + UID_COUNT)
        .filter(|uid| !taken.contains(uid))
        .find(|uid| !is_host_account(*uid))
}

/// True when `id` names a user or a group in the host's account databases.
pub fn is_host_account(id: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    // An unreadable database counts as "taken": never guess in favour of reuse.
    !matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
        || !matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
}

/// Every uid and gid (real, effective, saved and filesystem) under which a
/// process on the host runs, read from `/proc/<pid>/status`.
pub fn ids_of_live_processes() -> io::Result<BTreeSet<u32>> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let is_pid = entry
            .file_name()
            .to_str()
            .is_some_and(|name| name.bytes().all(|b| b.is_ascii_digit()));
        if !is_pid {
            continue;
        }
        match std::fs::read_to_string(entry.path().join("status")) {
            Ok(status) => ids.extend(ids_in_status(&status)),
            // The process exited since the directory was listed.
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(ids)
}

/// The numbers on the `Uid:` and `Gid:` lines of a `/proc/<pid>/status`;
/// none for a zombie, which runs nothing any more (and whose reaping, by
/// init once its parent agent is gone, may lag behind).
fn ids_in_status(status: &str) -> Vec<u32> {
    let exited = status.lines().any(|line| {
        line.strip_prefix("State:")
            .is_some_and(|state| matches!(state.trim_start().chars().next(), Some('Z' | 'X')))
    });
    if exited {
        return Vec::new();
    }
    status
        .lines()
        .filter_map(|line| {
            line.strip_prefix("Uid:")
                .or_else(|| line.strip_prefix("Gid:"))
        })
        .flat_map(str::split_whitespace)
        .filter_map(|word| word.parse().ok())
        .collect()
}

/// The host-wide uid lock (an `flock` on [`HOST_LOCK_PATH`]), released when
/// dropped. The descriptor is close-on-exec, so no jailer or QEMU keeps it.
#[derive(Debug)]
pub struct HostUidLock {
    _file: File,
}

impl HostUidLock {
    /// Waits until no other agent on the host holds the lock.
    pub async fn acquire(path: &Path) -> io::Result<HostUidLock> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Self::acquire_blocking(&path))
            .await
            .map_err(io::Error::other)?
    }

    fn acquire_blocking(path: &Path) -> io::Result<HostUidLock> {
        let file = crate::fsutil::open_lock_file(path)?;
        file.lock()?;
        Ok(HostUidLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_uid_neither_taken_nor_an_account_is_chosen() {
        let none = |_| false;
        assert_eq!(choose(&BTreeSet::new(), none), Some(UID_BASE));

        let taken = BTreeSet::from([UID_BASE, UID_BASE + 1, UID_BASE + 3]);
        assert_eq!(choose(&taken, none), Some(UID_BASE + 2));
        let accounts = |uid| uid == UID_BASE + 2;
        assert_eq!(choose(&taken, accounts), Some(UID_BASE + 4));

        // Ids outside the instance range (a host's own processes) change nothing.
        let host = BTreeSet::from([0, 1000, 65_534, UID_BASE - 1]);
        assert_eq!(choose(&host, none), Some(UID_BASE));
    }

    #[test]
    fn no_uid_is_chosen_when_all_are_taken() {
        let taken: BTreeSet<u32> = (UID_BASE..UID_BASE + UID_COUNT).collect();
        assert_eq!(choose(&taken, |_| false), None);
        let all_but_one: BTreeSet<u32> = (UID_BASE..UID_BASE + UID_COUNT - 1).collect();
        assert_eq!(
            choose(&all_but_one, |_| false),
            Some(UID_BASE + UID_COUNT - 1)
        );
        assert_eq!(choose(&all_but_one, |_| true), None);
    }

    #[test]
    fn uids_and_gids_are_read_from_a_status_file() {
        let status = "Name:\tqemu-system-x86\nUmask:\t0077\nState:\tS (sleeping)\n\
                      Uid:\t200001\t200001\t200001\t200001\n\
                      Gid:\t200002\t200002\t200002\t200003\n\
                      FDSize:\t64\nGroups:\t105\n";
        let ids: BTreeSet<u32> = ids_in_status(status).into_iter().collect();
        assert_eq!(ids, BTreeSet::from([200_001, 200_002, 200_003]));

        let zombie = status.replace("S (sleeping)", "Z (zombie)");
        assert_eq!(ids_in_status(&zombie), Vec::<u32>::new());
    }

    #[test]
    fn this_process_is_seen_under_its_uid() {
        let me = nix::unistd::Uid::current().as_raw();
        let ids = ids_of_live_processes().expect("scan /proc");
        assert!(ids.contains(&me), "{me} not in {ids:?}");
    }

    #[tokio::test]
    async fn the_host_lock_is_exclusive_between_descriptors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uid.lock");
        let held = HostUidLock::acquire(&path).await.expect("first lock");
        let second = std::fs::File::open(&path).expect("open");
        assert!(second.try_lock().is_err(), "taken twice");
        drop(held);
        second.try_lock().expect("free once the first is dropped");
    }
}
