//! The jailer: turns itself into one instance's sandboxed QEMU process.
//!
//! The agent runs `<jailer> jail <JailArgs>` for each boot. [`run`] is a short,
//! linear sequence, run single-threaded before any async runtime exists; each
//! step depends on the ones before it, so the order matters and is commented.
//! The process ends with `execve` of QEMU: the jailer's pid is QEMU's pid.
//!
//! What the agent prepared beforehand (see `instance.rs`): the instance root
//! (root-owned), its `run/` (owned by the instance uid, holding the disk, the
//! verified kernel and initrd), empty mount-point files in `dev/`, an empty
//! `usr/`, and the `bin`, `lib`, `lib64`, `sbin` symlinks into `usr/`.

// The three calls nix does not wrap (capability bounding set, ambient set,
// close_range) are here; each unsafe block says why it is sound.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::convert::Infallible;
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::stat::{umask, Mode};
use nix::unistd::{chdir, chroot, getpid, setgroups, setresgid, setresuid, setsid, Gid, Uid};

/// Device nodes bound into the root, and whether they can be read-only. QEMU
/// needs little: the null and zero devices, and randomness.
const DEVICES: [(&str, bool); 4] = [
    ("null", false),
    ("zero", false),
    ("urandom", true),
    ("random", true),
];

/// The descriptor number of the instance's tap in QEMU (`-netdev tap,fd=3`).
pub const TAP_FD: i32 = 3;

/// Arguments of `palisade jail`. Built by the agent with [`JailArgs::to_args`].
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct JailArgs {
    /// Instance id (only used in error messages).
    #[arg(long)]
    pub id: String,
    /// The instance root; it becomes `/` of the QEMU process.
    #[arg(long)]
    pub root: PathBuf,
    /// Unprivileged uid QEMU runs as.
    #[arg(long)]
    pub uid: u32,
    /// Unprivileged gid QEMU runs as.
    #[arg(long)]
    pub gid: u32,
    /// A cgroup directory to join; repeated once per hierarchy on cgroup v1.
    #[arg(long = "cgroup")]
    pub cgroups: Vec<PathBuf>,
    /// Bind `/dev/kvm` into the root (accelerator kvm).
    #[arg(long)]
    pub kvm: bool,
    /// The network namespace holding the instance's tap (`/run/netns/<name>`); with `--tap`.
    #[arg(long, requires = "tap")]
    pub netns: Option<PathBuf>,
    /// The instance's tap device in `--netns`: opened here and handed to QEMU as descriptor
    /// [`TAP_FD`]; QEMU itself runs in a network namespace of its own with nothing in it.
    #[arg(long, requires = "netns")]
    pub tap: Option<String>,
    /// QEMU's argv after `--`; argv[0] is the binary as seen inside the root.
    #[arg(last = true, required = true)]
    pub qemu: Vec<OsString>,
}

impl JailArgs {
    /// The command line that parses back into `self` (after the `jail` word).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            self.id.clone().into(),
            "--root".into(),
            self.root.clone().into(),
            "--uid".into(),
            self.uid.to_string().into(),
            "--gid".into(),
            self.gid.to_string().into(),
        ];
        for dir in &self.cgroups {
            args.push("--cgroup".into());
            args.push(dir.clone().into());
        }
        if self.kvm {
            args.push("--kvm".into());
        }
        if let (Some(netns), Some(tap)) = (&self.netns, &self.tap) {
            args.push("--netns".into());
            args.push(netns.clone().into());
            args.push("--tap".into());
            args.push(tap.clone().into());
        }
        args.push("--".into());
        args.extend(self.qemu.iter().cloned());
        args
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("invalid jail arguments: {0}")]
    Invalid(&'static str),
    #[error("{step}")]
    Os {
        step: String,
        #[source]
        source: nix::Error,
    },
    #[error("{step}")]
    Io {
        step: String,
        #[source]
        source: std::io::Error,
    },
    #[error("privileges were not dropped: {0}")]
    StillPrivileged(&'static str),
}

fn os(step: impl Into<String>) -> impl FnOnce(nix::Error) -> JailError {
    let step = step.into();
    move |source| JailError::Os { step, source }
}

/// Sets up the sandbox and execs QEMU. Returns only on failure.
pub fn run(args: &JailArgs) -> Result<Infallible, JailError> {
    if args.uid == 0 || args.gid == 0 {
        return Err(JailError::Invalid("uid and gid must not be 0"));
    }
    if !args.root.is_absolute() {
        return Err(JailError::Invalid("--root must be absolute"));
    }
    let (uid, gid) = (Uid::from_raw(args.uid), Gid::from_raw(args.gid));
    let argv = c_strings(&args.qemu)?;
    let root = args.root.as_path();

    // 1. Join the instance's cgroups first, so that every byte and thread QEMU
    //    ever uses is counted against its limits.
    let pid = getpid().to_string();
    for dir in &args.cgroups {
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, &pid).map_err(|source| JailError::Io {
            step: format!("joining cgroup {}", dir.display()),
            source,
        })?;
    }

    // 2. A session of our own: no controlling terminal, and signals sent to the
    //    agent's process group do not reach QEMU, which outlives the agent.
    setsid().map_err(os("setsid"))?;

    // 2b. The network: the tap is opened inside the namespace that holds the VPC bridges
    //     (only root may attach to it there), kept as descriptor TAP_FD, and then QEMU gets
    //     a network namespace of its own with nothing in it but a down loopback. A QEMU
    //     taken over by its guest reaches no network but its tap.
    let keep_fds = match (&args.netns, &args.tap) {
        (Some(netns), Some(tap)) => {
            open_tap(netns, tap)?;
            TAP_FD + 1
        }
        _ => 3,
    };
    unshare(CloneFlags::CLONE_NEWNET).map_err(os("unshare(CLONE_NEWNET)"))?;

    // 3. A private mount namespace, with every mount made private, so that the
    //    mounts below are seen by this process only and never propagate back
    //    to the host (where they would, e.g., pin the instance directory).
    unshare(CloneFlags::CLONE_NEWNS).map_err(os("unshare(CLONE_NEWNS)"))?;
    mount_flags(None, Path::new("/"), MsFlags::MS_REC | MsFlags::MS_PRIVATE)?;

    // 4. The root's contents: read-only /usr (merged-usr, so the symlinks the
    //    agent made cover /bin, /lib, /lib64) and a handful of device nodes,
    //    each bound onto an empty file. The root is bound onto itself first,
    //    so that it becomes a mount of its own that can be nosuid,nodev,noexec.
    bind(root, root)?;
    bind(Path::new("/usr"), &root.join("usr"))?;
    remount(
        &root.join("usr"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
    )?;
    let mut devices: Vec<(&str, bool)> = DEVICES.to_vec();
    if args.kvm {
        // Written to by QEMU's ioctls: cannot be read-only.
        devices.push(("kvm", false));
    }
    for (name, read_only) in devices {
        let target = root.join("dev").join(name);
        bind(&Path::new("/dev").join(name), &target)?;
        let ro = if read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        remount(&target, ro | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC)?;
    }
    remount(
        root,
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )?;

    // /dev/kvm is root:kvm 0660 on the host; the instance keeps the kvm group
    // as its one supplementary group, which opens that node and nothing else.
    let groups = if args.kvm {
        vec![kvm_group()?]
    } else {
        Vec::new()
    };

    // 5. Enter the root. From here on, host paths are out of reach.
    chroot(root).map_err(os(format!("chroot {}", root.display())))?;
    chdir("/").map_err(os("chdir /"))?;

    // 6. Drop privileges for good: empty the capability bounding set (this
    //    needs CAP_SETPCAP, so it comes first), then groups, gid, uid. With
    //    all of real, effective and saved uid non-zero, the kernel clears the
    //    permitted and effective capabilities. Then prove it: going back to
    //    root must fail.
    drop_capability_bounding_set()?;
    setgroups(&groups).map_err(os("setgroups"))?;
    setresgid(gid, gid, gid).map_err(os("setresgid"))?;
    setresuid(uid, uid, uid).map_err(os("setresuid"))?;
    verify_unprivileged(uid, gid)?;

    // 7. No new privileges: no setuid bit or file capability can raise them
    //    again across execve (QEMU's seccomp filter also relies on this).
    nix::sys::prctl::set_no_new_privs().map_err(os("PR_SET_NO_NEW_PRIVS"))?;

    // 8. Only stdin, stdout, stderr (and the tap) cross into QEMU: every other inherited
    //    descriptor is marked close-on-exec. No core dumps of guest memory, and
    //    QEMU's sockets and files are private to the instance uid.
    close_inherited_fds(keep_fds)?;
    setrlimit(Resource::RLIMIT_CORE, 0, 0).map_err(os("setrlimit(RLIMIT_CORE)"))?;
    umask(Mode::from_bits_truncate(0o077));

    // 9. Become QEMU, with an empty environment.
    let env: [CString; 0] = [];
    let err = nix::unistd::execve(&argv[0], &argv, &env);
    err.map_err(os(format!("execve {}", args.qemu[0].to_string_lossy())))
}

fn c_strings(words: &[OsString]) -> Result<Vec<CString>, JailError> {
    if words.is_empty() {
        return Err(JailError::Invalid("no QEMU command line after --"));
    }
    words
        .iter()
        .map(|w| CString::new(w.as_bytes()).map_err(|_| JailError::Invalid("NUL in QEMU argv")))
        .collect()
}

fn mount_flags(source: Option<&Path>, target: &Path, flags: MsFlags) -> Result<(), JailError> {
    mount(source, target, None::<&str>, flags, None::<&str>)
        .map_err(os(format!("mount {flags:?} on {}", target.display())))
}

fn bind(source: &Path, target: &Path) -> Result<(), JailError> {
    // Not recursive: nothing mounted below the source comes along unchecked.
    mount_flags(Some(source), target, MsFlags::MS_BIND)
}

fn remount(target: &Path, flags: MsFlags) -> Result<(), JailError> {
    mount_flags(None, target, MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags)
}

fn kvm_group() -> Result<Gid, JailError> {
    let meta = std::fs::metadata("/dev/kvm").map_err(|source| JailError::Io {
        step: "stat /dev/kvm".into(),
        source,
    })?;
    Ok(Gid::from_raw(meta.gid()))
}

fn drop_capability_bounding_set() -> Result<(), JailError> {
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and touches no
        // memory of ours; it fails with EINVAL past the last capability.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 {
            let errno = nix::errno::Errno::last();
            if errno == nix::errno::Errno::EINVAL && cap > 0 {
                break;
            }
            return Err(JailError::Os {
                step: format!("PR_CAPBSET_DROP {cap}"),
                source: errno,
            });
        }
    }
    // SAFETY: clears the ambient capability set; no pointers are passed.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(JailError::Os {
            step: "PR_CAP_AMBIENT_CLEAR_ALL".into(),
            source: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

fn verify_unprivileged(uid: Uid, gid: Gid) -> Result<(), JailError> {
    let ids = nix::unistd::getresuid().map_err(os("getresuid"))?;
    if [ids.real, ids.effective, ids.saved] != [uid; 3] {
        return Err(JailError::StillPrivileged("uid"));
    }
    let ids = nix::unistd::getresgid().map_err(os("getresgid"))?;
    if [ids.real, ids.effective, ids.saved] != [gid; 3] {
        return Err(JailError::StillPrivileged("gid"));
    }
    let root = Uid::from_raw(0);
    if setresuid(root, root, root).is_ok() {
        return Err(JailError::StillPrivileged("setresuid(0) succeeded"));
    }
    if setgroups(&[Gid::from_raw(0)]).is_ok() {
        return Err(JailError::StillPrivileged("setgroups succeeded"));
    }
    Ok(())
}

/// `TUNSETIFF`, `_IOW('T', 202, int)`: not in the libc crate.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// Enters `netns`, attaches to the existing tap `name` there, and leaves it as `TAP_FD`.
fn open_tap(netns: &Path, name: &str) -> Result<(), JailError> {
    use std::os::fd::{AsRawFd, IntoRawFd};
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || !name.is_ascii() {
        return Err(JailError::Invalid("--tap must be an interface name"));
    }
    let ns = std::fs::File::open(netns).map_err(|source| JailError::Io {
        step: format!("opening {}", netns.display()),
        source,
    })?;
    nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
        .map_err(os(format!("setns {}", netns.display())))?;
    // Closed now, so that its descriptor number cannot be the one dup2 replaces below.
    drop(ns);
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| JailError::Io {
            step: "opening /dev/net/tun".into(),
            source,
        })?;
    // struct ifreq: the name (16 bytes, NUL-terminated), then the flags (a short).
    let mut ifreq = [0u8; 40];
    ifreq[..name.len()].copy_from_slice(name.as_bytes());
    ifreq[16..18].copy_from_slice(&(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; the buffer is 40 bytes, the size of
    // ifreq on Linux, and lives across the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) };
    if rc != 0 {
        return Err(JailError::Os {
            step: format!("attaching to tap {name}"),
            source: nix::errno::Errno::last(),
        });
    }
    let fd = tun.into_raw_fd();
    if fd != TAP_FD {
        // SAFETY: dup2 onto TAP_FD (closing whatever was there: nothing of ours) and closing
        // the original; both descriptors are ours.
        let rc = unsafe { libc::dup2(fd, TAP_FD) };
        if rc != TAP_FD {
            return Err(JailError::Os {
                step: "dup2 of the tap".into(),
                source: nix::errno::Errno::last(),
            });
        }
        // SAFETY: `fd` is ours and no longer used.
        unsafe { libc::close(fd) };
    }
    // Rust opens every file close-on-exec (dup2 clears the flag, but the tap may already
    // be TAP_FD): QEMU must inherit it.
    // SAFETY: F_SETFD on our own descriptor; no memory is passed.
    if unsafe { libc::fcntl(TAP_FD, libc::F_SETFD, 0) } != 0 {
        return Err(JailError::Os {
            step: "clearing close-on-exec on the tap".into(),
            source: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

/// Marks every descriptor from `first` on close-on-exec.
fn close_inherited_fds(first: i32) -> Result<(), JailError> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on our own
    // descriptors; no memory is passed. Rust holds none of them open beyond
    // this point that it would use again before execve.
    let rc = unsafe {
        libc::close_range(
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as i32,
        )
    };
    if rc != 0 {
        return Err(JailError::Os {
            step: "close_range(CLOEXEC)".into(),
            source: nix::errno::Errno::last(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        jail: JailArgs,
    }

    fn sample(kvm: bool, cgroups: Vec<PathBuf>) -> JailArgs {
        JailArgs {
            id: "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b".into(),
            root: "/var/lib/palisade/instances/x/root".into(),
            uid: 200_001,
            gid: 200_001,
            cgroups,
            kvm,
            netns: None,
            tap: None,
            qemu: [
                "/usr/bin/qemu-system-x86_64",
                "-name",
                "guest=x",
                "--",
                "-m",
            ]
            .iter()
            .map(OsString::from)
            .collect(),
        }
    }

    #[test]
    fn to_args_round_trips_through_clap() {
        for args in [
            sample(false, vec![]),
            sample(
                true,
                vec![
                    "/sys/fs/cgroup/cpu/palisade/x".into(),
                    "/sys/fs/cgroup/pids/palisade/x".into(),
                ],
            ),
            JailArgs {
                netns: Some("/run/netns/pal-x".into()),
                tap: Some("pt0f8e2a4c1b2d".into()),
                ..sample(false, vec![])
            },
        ] {
            let mut argv: Vec<OsString> = vec!["jail".into()];
            argv.extend(args.to_args());
            let parsed = Cli::try_parse_from(argv).expect("parses").jail;
            assert_eq!(parsed, args);
        }
    }

    #[test]
    fn refuses_root_ids_before_touching_anything() {
        let mut args = sample(false, vec!["/nonexistent/cgroup".into()]);
        args.uid = 0;
        assert!(matches!(run(&args), Err(JailError::Invalid(_))));
    }
}
