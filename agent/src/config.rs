//! `palisade agent` arguments, and the configuration resolved from them.
//!
//! | flag | default | meaning |
//! |---|---|---|
//! | `--data-dir` | (required) | made 0700, one agent at a time (`agent.lock`); instances in `instances/` |
//! | `--listen` | `127.0.0.1:8444` | HTTPS address (port 0: any free port, see `--addr-file`) |
//! | `--ca`, `--cert`, `--key` | (required) | PEM files: clients must chain to `--ca`; the key must be 0600 |
//! | `--accelerator` | `auto` | `auto`, `kvm` or `tcg` (see `qemu::choose_accelerator`) |
//! | `--qemu` | `/usr/bin/qemu-system-x86_64` | must be below `/usr`, the only host tree in the chroot |
//! | `--qemu-img` | `/usr/bin/qemu-img` | |
//! | `--jailer` | this executable | run as `<jailer> jail …` |
//! | `--console-cap-bytes` | 1 MiB | console log cap per instance (4 KiB to 64 MiB) |
//! | `--cgroup-root` | `/sys/fs/cgroup` | cgroup v1 hierarchies or the v2 mount |
//! | `--addr-file` | none | file the bound address is written to once listening |

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::cgroup::Cgroups;
use crate::console;
use crate::data_dir;
use crate::host_cmd::QemuImg;
use crate::qemu::{self, Accelerator, AcceleratorChoice, HostFacts};

/// Arguments of `palisade agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Directory holding the instances' state, disks and console logs.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Address of the HTTPS API.
    #[arg(long, default_value = "127.0.0.1:8444")]
    pub listen: SocketAddr,
    /// CA certificate (PEM); client certificates must chain to it.
    #[arg(long)]
    pub ca: PathBuf,
    /// The agent's server certificate chain (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// The agent's private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Hardware acceleration: auto uses KVM only where it really works.
    #[arg(long, value_enum, default_value_t = AcceleratorChoice::Auto)]
    pub accelerator: AcceleratorChoice,
    /// QEMU binary; must live below /usr.
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// qemu-img binary.
    #[arg(long, default_value = "/usr/bin/qemu-img")]
    pub qemu_img: PathBuf,
    /// The jailer executable, run as `<jailer> jail ...` [default: this executable].
    #[arg(long)]
    pub jailer: Option<PathBuf>,
    /// Console log cap per instance, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub console_cap_bytes: u64,
    /// Root of the cgroup filesystem(s).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Write the bound address here once listening (useful with port 0).
    #[arg(long)]
    pub addr_file: Option<PathBuf>,
}

/// The agent's configuration once checked against this host.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub accelerator: Accelerator,
    pub qemu: PathBuf,
    pub qemu_img: QemuImg,
    pub jailer: PathBuf,
    pub console_cap: u64,
    pub cgroups: Cgroups,
}

impl Config {
    pub fn resolve(args: &AgentArgs, facts: HostFacts) -> anyhow::Result<Config> {
        let accelerator = qemu::choose_accelerator(args.accelerator, facts)?;

        data_dir::create(&args.data_dir)?;
        let data_dir = args
            .data_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", args.data_dir.display()))?;

        if !args.qemu.is_absolute() || !args.qemu.starts_with("/usr/") {
            bail!("--qemu must be an absolute path below /usr (the only host tree in the sandbox)");
        }
        require_file(&args.qemu, "--qemu")?;
        require_file(&args.qemu_img, "--qemu-img")?;
        let jailer = match &args.jailer {
            Some(path) => path.clone(),
            None => std::env::current_exe().context("finding this executable for --jailer")?,
        };
        require_file(&jailer, "--jailer")?;

        if !(console::MIN_CAP..=console::MAX_CAP).contains(&args.console_cap_bytes) {
            bail!(
                "--console-cap-bytes must be between {} and {}",
                console::MIN_CAP,
                console::MAX_CAP
            );
        }
        let cgroups = Cgroups::detect(&args.cgroup_root)?;
        require_private(&args.key, "--key")?;

        Ok(Config {
            data_dir,
            accelerator,
            qemu: args.qemu.clone(),
            qemu_img: QemuImg {
                program: args.qemu_img.clone(),
            },
            jailer,
            console_cap: args.console_cap_bytes,
            cgroups,
        })
    }
}

/// A secret must not be readable by anyone but its owner (TESTING.md G3).
fn require_private(path: &Path, flag: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("{flag} {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "{flag} {} is readable by others (mode {:o}); make it 0600",
            path.display(),
            mode & 0o777
        );
    }
    Ok(())
}

fn require_file(path: &Path, flag: &str) -> anyhow::Result<()> {
    if !path.is_absolute() {
        bail!("{flag} must be an absolute path");
    }
    if !path.is_file() {
        bail!("{flag} {} does not exist", path.display());
    }
    Ok(())
}
