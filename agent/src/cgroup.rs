//! cgroups for the QEMU processes: cpu, memory and pids, on v1 or v2.
//!
//! Each instance gets `palisade/<instance-id>` below the root of every
//! hierarchy we use: three directories on v1 (`cpu/`, `memory/`, `pids/` are
//! separate hierarchies), one on v2 (unified). The agent creates the groups and
//! writes the limits; the jailer joins them (writes its pid to `cgroup.procs`)
//! before it execs QEMU, so QEMU and all its threads are limited from the start.

use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::id::InstanceId;

/// The group every instance group lives in.
const PARENT: &str = "palisade";

/// Memory on top of the guest's RAM: QEMU's code and libraries (~40 MiB), the
/// TCG translation cache (64 MiB, see `qemu.rs`), the qcow2 L2 cache, block and
/// chardev buffers, and per-vCPU thread stacks. 192 MiB leaves headroom above
/// what a small guest was seen to use; too little and the kernel OOM-kills QEMU.
pub const MEMORY_OVERHEAD_MIB: u64 = 192;

/// CFS period (µs); the quota is `vcpus` whole periods.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Tasks of a QEMU process apart from its vCPU threads: the main and RCU
/// threads, the block I/O thread pool (up to 64) and headroom. `spawn=deny` in
/// its seccomp filter forbids new processes, so these are all threads.
pub const PIDS_BASE: u64 = 120;

/// Tasks per vCPU of the flavor (the vCPU thread and its helpers).
pub const PIDS_PER_VCPU: u64 = 8;

/// The v1 hierarchies we use.
const V1_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub pids_max: u64,
}

impl Limits {
    pub fn for_instance(vcpus: u32, memory_mib: u32) -> Self {
        Limits {
            memory_bytes: (u64::from(memory_mib) + MEMORY_OVERHEAD_MIB) << 20,
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US,
            cpu_period_us: CPU_PERIOD_US,
            pids_max: PIDS_BASE + u64::from(vcpus) * PIDS_PER_VCPU,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 (cgroup.controllers) nor v1 cpu, memory and pids hierarchies under {root}"
    )]
    NotFound { root: PathBuf },
    #[error("cgroup v2 at {root} lacks the {controller} controller")]
    MissingController { root: PathBuf, controller: String },
    #[error("creating cgroup {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing cgroup {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A cgroup filesystem root, usually `/sys/fs/cgroup`.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    version: CgroupVersion,
}

impl Cgroups {
    /// v2 when `root/cgroup.controllers` exists (the unified hierarchy is
    /// mounted at the root), else v1 when `cpu`, `memory` and `pids` exist.
    pub fn detect(root: &Path) -> Result<Self, CgroupError> {
        let version = if root.join("cgroup.controllers").is_file() {
            CgroupVersion::V2
        } else if V1_CONTROLLERS.iter().all(|c| root.join(c).is_dir()) {
            CgroupVersion::V1
        } else {
            return Err(CgroupError::NotFound {
                root: root.to_path_buf(),
            });
        };
        Ok(Cgroups {
            root: root.to_path_buf(),
            version,
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The instance's group directories (one per hierarchy), whether or not
    /// they exist.
    pub fn dirs(&self, id: &InstanceId) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V1 => V1_CONTROLLERS
                .iter()
                .map(|c| self.root.join(c).join(PARENT).join(id.as_str()))
                .collect(),
            CgroupVersion::V2 => vec![self.root.join(PARENT).join(id.as_str())],
        }
    }

    /// Creates the instance's groups with `limits` and returns their directories
    /// (what the jailer joins). Idempotent: existing groups get the limits again.
    pub fn create(&self, id: &InstanceId, limits: &Limits) -> Result<Vec<PathBuf>, CgroupError> {
        match self.version {
            CgroupVersion::V1 => self.create_v1(id, limits),
            CgroupVersion::V2 => self.create_v2(id, limits),
        }
    }

    fn create_v1(&self, id: &InstanceId, limits: &Limits) -> Result<Vec<PathBuf>, CgroupError> {
        let dirs = self.dirs(id);
        for dir in &dirs {
            if let Some(parent) = dir.parent() {
                make_dir(parent)?;
            }
            make_dir(dir)?;
        }
        let [cpu, memory, pids] = [&dirs[0], &dirs[1], &dirs[2]];

        // The period first: the kernel checks the quota against it.
        write(
            &cpu.join("cpu.cfs_period_us"),
            &limits.cpu_period_us.to_string(),
        )?;
        write(
            &cpu.join("cpu.cfs_quota_us"),
            &limits.cpu_quota_us.to_string(),
        )?;
        write(
            &memory.join("memory.limit_in_bytes"),
            &limits.memory_bytes.to_string(),
        )?;
        let memsw = memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            // Memory plus swap capped at the memory limit: no guest memory goes to
            // swap, where it would outlive the VM (v1's memory.swap.max = 0).
            write(&memsw, &limits.memory_bytes.to_string())?;
        }
        write(&pids.join("pids.max"), &limits.pids_max.to_string())?;
        Ok(dirs)
    }

    fn create_v2(&self, id: &InstanceId, limits: &Limits) -> Result<Vec<PathBuf>, CgroupError> {
        let available =
            std::fs::read_to_string(self.root.join("cgroup.controllers")).map_err(|source| {
                CgroupError::Create {
                    path: self.root.clone(),
                    source,
                }
            })?;
        for controller in ["cpu", "memory", "pids"] {
            if !available.split_whitespace().any(|c| c == controller) {
                return Err(CgroupError::MissingController {
                    root: self.root.clone(),
                    controller: controller.into(),
                });
            }
        }

        // A controller reaches a group only when every ancestor enables it for
        // its children: the root for `palisade`, `palisade` for the instance.
        let parent = self.root.join(PARENT);
        write(
            &self.root.join("cgroup.subtree_control"),
            "+cpu +memory +pids",
        )?;
        make_dir(&parent)?;
        write(&parent.join("cgroup.subtree_control"), "+cpu +memory +pids")?;

        let dir = parent.join(id.as_str());
        make_dir(&dir)?;
        write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
        if dir.join("memory.swap.max").exists() {
            // Guest memory must not leak to swap, where it would outlive the VM.
            write(&dir.join("memory.swap.max"), "0")?;
        }
        let cpu_max = format!("{} {}", limits.cpu_quota_us, limits.cpu_period_us);
        write(&dir.join("cpu.max"), &cpu_max)?;
        write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
        Ok(vec![dir])
    }

    /// Pids of the processes in the instance's groups (none when the groups
    /// do not exist). The jailer joins them before anything else, so every
    /// QEMU ever started for the instance is here, recorded or not.
    pub fn members(&self, id: &InstanceId) -> Result<Vec<u32>, CgroupError> {
        let mut pids = Vec::new();
        for dir in self.dirs(id) {
            let procs = dir.join("cgroup.procs");
            let text = match std::fs::read_to_string(&procs) {
                Ok(text) => text,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(CgroupError::Read {
                        path: procs,
                        source,
                    })
                }
            };
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Removes the instance's groups. Call after its processes have exited; a
    /// group that is still busy (a dying task not yet gone) is retried for a
    /// moment. Missing groups are fine.
    pub fn remove(&self, id: &InstanceId) -> Result<(), CgroupError> {
        for dir in self.dirs(id) {
            remove_dir_retrying(&dir)?;
        }
        Ok(())
    }
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

fn remove_dir_retrying(dir: &Path) -> Result<(), CgroupError> {
    const ATTEMPTS: u32 = 20;
    for attempt in 1..=ATTEMPTS {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < ATTEMPTS => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
    unreachable!("the last attempt returns")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> InstanceId {
        InstanceId::parse("0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b").expect("valid id")
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    #[test]
    fn limits_cover_guest_memory_plus_overhead() {
        let limits = Limits::for_instance(2, 256);
        assert_eq!(limits.memory_bytes, (256 + 192) << 20);
        assert_eq!(limits.cpu_quota_us, 200_000);
        assert_eq!(limits.cpu_period_us, 100_000);
        assert_eq!(limits.pids_max, 120 + 2 * 8);
    }

    #[test]
    fn detect_refuses_a_directory_without_cgroups() {
        let root = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Cgroups::detect(root.path()),
            Err(CgroupError::NotFound { .. })
        ));
    }

    #[test]
    fn v1_writes_limits_in_three_hierarchies() {
        let root = tempfile::tempdir().expect("tempdir");
        for c in ["cpu", "cpuacct", "memory", "pids"] {
            std::fs::create_dir(root.path().join(c)).expect("mkdir");
        }
        let cgroups = Cgroups::detect(root.path()).expect("detect");
        assert_eq!(cgroups.version(), CgroupVersion::V1);

        let dirs = cgroups
            .create(&id(), &Limits::for_instance(2, 256))
            .expect("create");
        let base = |c: &str| root.path().join(c).join("palisade").join(id().as_str());
        assert_eq!(dirs, vec![base("cpu"), base("memory"), base("pids")]);
        assert_eq!(read(base("cpu").join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(base("cpu").join("cpu.cfs_quota_us")), "200000");
        assert_eq!(
            read(base("memory").join("memory.limit_in_bytes")),
            "469762048"
        );
        assert_eq!(read(base("pids").join("pids.max")), "136");
    }

    #[test]
    fn v2_enables_controllers_down_the_tree_and_writes_limits() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            root.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .expect("write");
        let cgroups = Cgroups::detect(root.path()).expect("detect");
        assert_eq!(cgroups.version(), CgroupVersion::V2);

        let dirs = cgroups
            .create(&id(), &Limits::for_instance(1, 512))
            .expect("create");
        let parent = root.path().join("palisade");
        let dir = parent.join(id().as_str());
        assert_eq!(dirs, vec![dir.clone()]);
        assert_eq!(
            read(root.path().join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(parent.join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(dir.join("memory.max")),
            ((512u64 + 192) << 20).to_string()
        );
        assert_eq!(read(dir.join("cpu.max")), "100000 100000");
        assert_eq!(read(dir.join("pids.max")), "128");
    }

    #[test]
    fn v2_without_a_needed_controller_is_an_error() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").expect("write");
        let cgroups = Cgroups::detect(root.path()).expect("detect");
        let err = cgroups.create(&id(), &Limits::for_instance(1, 128)).err();
        assert!(
            matches!(err, Some(CgroupError::MissingController { controller, .. }) if controller == "pids")
        );
    }

    #[test]
    fn members_are_read_from_every_hierarchy() {
        let root = tempfile::tempdir().expect("tempdir");
        for c in ["cpu", "memory", "pids"] {
            std::fs::create_dir(root.path().join(c)).expect("mkdir");
        }
        let cgroups = Cgroups::detect(root.path()).expect("detect");
        assert_eq!(
            cgroups.members(&id()).expect("no groups yet"),
            Vec::<u32>::new()
        );

        let dirs = cgroups
            .create(&id(), &Limits::for_instance(1, 128))
            .expect("create");
        std::fs::write(dirs[0].join("cgroup.procs"), "42\n7\n").expect("write");
        std::fs::write(dirs[2].join("cgroup.procs"), "42\n").expect("write");
        assert_eq!(cgroups.members(&id()).expect("members"), vec![7, 42]);
    }

    #[test]
    fn remove_tolerates_missing_groups_and_removes_empty_ones() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids\n").expect("write");
        let cgroups = Cgroups::detect(root.path()).expect("detect");
        cgroups.remove(&id()).expect("nothing to remove");

        // A real cgroupfs lets rmdir remove a group with its control files; a
        // tempdir does not, so an empty directory stands in for the group.
        let dir = root.path().join("palisade").join(id().as_str());
        std::fs::create_dir_all(&dir).expect("mkdir");
        cgroups.remove(&id()).expect("remove");
        assert!(!dir.exists());
    }
}
