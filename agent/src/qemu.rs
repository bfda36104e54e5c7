//! The QEMU command line and the choice of accelerator.
//!
//! Both are pure functions over facts gathered elsewhere, so they are unit-tested
//! without QEMU or `/dev/kvm`. Paths in the command line are as seen inside the
//! instance's chroot (see `jail.rs`).

use std::path::Path;

use palisade_common::agent_api::InstanceSpec;

/// Inside the chroot: where the agent puts the verified kernel and initrd, the
/// disk, and where QEMU creates its sockets.
pub const KERNEL: &str = "/run/vmlinuz";
pub const INITRD: &str = "/run/initrd";
pub const DISK: &str = "/run/disk.qcow2";
pub const CONSOLE_SOCKET: &str = "/run/console.sock";
pub const QMP_SOCKET: &str = "/run/qmp.sock";

/// The TCG translation cache, in MiB. QEMU's default is up to 1 GiB, which would
/// not fit the memory cgroup; 64 MiB is plenty for a small guest.
const TCG_TB_SIZE_MIB: u32 = 64;

/// What the operator asked for with `--accelerator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AcceleratorChoice {
    Auto,
    Kvm,
    Tcg,
}

/// What QEMU will use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// Facts about the host that decide the accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` opened read-write.
    pub kvm_usable: bool,
    /// `/proc/cpuinfo` carries the `hypervisor` flag: this host is itself a
    /// guest, and nested KVM is too slow to be worth it.
    pub cpu_is_guest: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--accelerator kvm was requested but /dev/kvm cannot be opened read-write")]
pub struct KvmUnavailable;

/// `auto` picks KVM only where it really works: usable `/dev/kvm` on a host
/// that is not itself a guest. An explicit `kvm` is honoured on a nested host,
/// but refused when `/dev/kvm` is unusable.
pub fn choose_accelerator(
    choice: AcceleratorChoice,
    facts: HostFacts,
) -> Result<Accelerator, KvmUnavailable> {
    match choice {
        AcceleratorChoice::Tcg => Ok(Accelerator::Tcg),
        AcceleratorChoice::Kvm if facts.kvm_usable => Ok(Accelerator::Kvm),
        AcceleratorChoice::Kvm => Err(KvmUnavailable),
        AcceleratorChoice::Auto if facts.kvm_usable && !facts.cpu_is_guest => Ok(Accelerator::Kvm),
        AcceleratorChoice::Auto => Ok(Accelerator::Tcg),
    }
}

/// Reads the facts from this host.
pub fn probe_host_facts() -> HostFacts {
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let cpu_is_guest = std::fs::read_to_string("/proc/cpuinfo")
        .map(|text| cpuinfo_has_hypervisor_flag(&text))
        .unwrap_or(false);
    HostFacts {
        kvm_usable,
        cpu_is_guest,
    }
}

fn cpuinfo_has_hypervisor_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .filter_map(|line| line.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "hypervisor"))
}

/// The full QEMU argv (argv[0] included) for one instance.
///
/// No display, USB, network or default devices; the serial console and QMP
/// are Unix sockets in the instance's `/run`; QEMU's own seccomp filter forbids
/// privilege changes, spawning and resource-control calls. Privileges are
/// dropped by the jailer before exec, so neither `-runas` nor `-chroot` is used.
pub fn command_line(qemu: &Path, spec: &InstanceSpec, accel: Accelerator) -> Vec<String> {
    let mut argv = vec![qemu.display().to_string()];
    let mut add = |words: &[&str]| argv.extend(words.iter().map(|w| w.to_string()));

    add(&["-name", &format!("guest={}", spec.id)]);
    add(&["-M", "pc,usb=off", "-nodefaults", "-no-user-config"]);
    add(&["-display", "none", "-vga", "none"]);
    match accel {
        Accelerator::Kvm => add(&["-accel", "kvm", "-cpu", "host"]),
        Accelerator::Tcg => add(&["-accel", &format!("tcg,tb-size={TCG_TB_SIZE_MIB}")]),
    }
    add(&[
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &spec.memory_mib.to_string(),
    ]);

    let cmdline = if spec.image.cmdline.is_empty() {
        "console=ttyS0 panic=-1".to_string()
    } else {
        format!("console=ttyS0 panic=-1 {}", spec.image.cmdline)
    };
    add(&["-kernel", KERNEL, "-initrd", INITRD, "-append", &cmdline]);

    add(&[
        "-drive",
        &format!("file={DISK},format=qcow2,if=none,id=disk0,discard=unmap"),
        "-device",
        "virtio-blk-pci,drive=disk0",
    ]);
    add(&[
        "-chardev",
        &format!("socket,id=con0,path={CONSOLE_SOCKET},server=on,wait=off"),
        "-serial",
        "chardev:con0",
    ]);
    add(&["-qmp", &format!("unix:{QMP_SOCKET},server=on,wait=off")]);
    match spec.nics.first() {
        // The tap arrives already open as descriptor TAP_FD (see `jail.rs`); QEMU can
        // neither create nor pick another, and no vhost thread runs outside its sandbox.
        Some(nic) => add(&[
            "-netdev",
            &format!("tap,id=net0,fd={},vhost=off", crate::jail::TAP_FD),
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", nic.mac),
        ]),
        None => add(&["-nic", "none"]),
    }
    add(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    argv
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::agent_api::ImageSpec;

    fn facts(kvm_usable: bool, cpu_is_guest: bool) -> HostFacts {
        HostFacts {
            kvm_usable,
            cpu_is_guest,
        }
    }

    #[test]
    fn auto_uses_kvm_only_on_bare_metal_with_usable_kvm() {
        use AcceleratorChoice::Auto;
        assert_eq!(
            choose_accelerator(Auto, facts(true, false)),
            Ok(Accelerator::Kvm)
        );
        assert_eq!(
            choose_accelerator(Auto, facts(true, true)),
            Ok(Accelerator::Tcg)
        );
        assert_eq!(
            choose_accelerator(Auto, facts(false, false)),
            Ok(Accelerator::Tcg)
        );
        assert_eq!(
            choose_accelerator(Auto, facts(false, true)),
            Ok(Accelerator::Tcg)
        );
    }

    #[test]
    fn explicit_kvm_is_refused_without_kvm_and_honoured_when_nested() {
        use AcceleratorChoice::Kvm;
        assert_eq!(
            choose_accelerator(Kvm, facts(false, false)),
            Err(KvmUnavailable)
        );
        assert_eq!(
            choose_accelerator(Kvm, facts(true, true)),
            Ok(Accelerator::Kvm)
        );
    }

    #[test]
    fn explicit_tcg_is_always_tcg() {
        let tcg = AcceleratorChoice::Tcg;
        assert_eq!(
            choose_accelerator(tcg, facts(true, false)),
            Ok(Accelerator::Tcg)
        );
    }

    #[test]
    fn hypervisor_flag_is_found_only_in_flags_lines() {
        let guest = "processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n";
        let metal = "processor\t: 0\nflags\t\t: fpu vme lahf_lm\nmodel name\t: hypervisor\n";
        assert!(cpuinfo_has_hypervisor_flag(guest));
        assert!(!cpuinfo_has_hypervisor_flag(metal));
    }

    fn spec(cmdline: &str) -> InstanceSpec {
        InstanceSpec {
            id: "0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b".into(),
            vcpus: 2,
            memory_mib: 256,
            disk_gib: 1,
            image: ImageSpec {
                kernel_path: "/images/vmlinuz".into(),
                kernel_sha256: "00".repeat(32),
                initrd_path: "/images/initrd".into(),
                initrd_sha256: "11".repeat(32),
                cmdline: cmdline.into(),
            },
            nics: vec![],
        }
    }

    /// The value that follows `flag` in `argv`.
    fn value_of<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_command_line() {
        let argv = command_line(
            Path::new("/usr/bin/qemu-system-x86_64"),
            &spec("quiet"),
            Accelerator::Tcg,
        );
        assert_eq!(argv[0], "/usr/bin/qemu-system-x86_64");
        assert_eq!(
            value_of(&argv, "-name"),
            ["guest=0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b"]
        );
        assert_eq!(value_of(&argv, "-accel"), ["tcg,tb-size=64"]);
        assert!(value_of(&argv, "-cpu").is_empty());
        assert_eq!(value_of(&argv, "-smp"), ["2"]);
        assert_eq!(value_of(&argv, "-m"), ["256"]);
        assert_eq!(value_of(&argv, "-append"), ["console=ttyS0 panic=-1 quiet"]);
        assert_eq!(value_of(&argv, "-kernel"), ["/run/vmlinuz"]);
        assert_eq!(value_of(&argv, "-initrd"), ["/run/initrd"]);
        assert_eq!(
            value_of(&argv, "-drive"),
            ["file=/run/disk.qcow2,format=qcow2,if=none,id=disk0,discard=unmap"]
        );
        assert_eq!(value_of(&argv, "-nic"), ["none"]);
        assert_eq!(value_of(&argv, "-display"), ["none"]);
        assert_eq!(value_of(&argv, "-vga"), ["none"]);
        assert_eq!(
            value_of(&argv, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );
        assert!(argv.iter().any(|w| w == "-nodefaults"));
        assert!(argv.iter().any(|w| w == "-no-user-config"));
    }

    #[test]
    fn kvm_command_line_uses_host_cpu() {
        let argv = command_line(
            Path::new("/usr/bin/qemu-system-x86_64"),
            &spec(""),
            Accelerator::Kvm,
        );
        assert_eq!(value_of(&argv, "-accel"), ["kvm"]);
        assert_eq!(value_of(&argv, "-cpu"), ["host"]);
        assert_eq!(value_of(&argv, "-append"), ["console=ttyS0 panic=-1"]);
    }

    #[test]
    fn a_nic_is_the_inherited_tap_without_vhost() {
        let mut spec = spec("");
        let mac = palisade_common::net::Mac([2, 1, 2, 3, 4, 5]);
        spec.nics.push(palisade_common::agent_api::NicSpec {
            port_id: "p".into(),
            mac,
        });
        let argv = command_line(Path::new("/usr/bin/qemu"), &spec, Accelerator::Tcg);
        assert_eq!(value_of(&argv, "-netdev"), ["tap,id=net0,fd=3,vhost=off"]);
        assert_eq!(
            value_of(&argv, "-device")[1],
            "virtio-net-pci,netdev=net0,mac=02:01:02:03:04:05"
        );
        assert!(value_of(&argv, "-nic").is_empty());
    }

    #[test]
    fn never_drops_privileges_through_qemu() {
        let argv = command_line(
            Path::new("/usr/bin/qemu-system-x86_64"),
            &spec(""),
            Accelerator::Tcg,
        );
        for banned in ["-runas", "-chroot", "-daemonize", "-usb", "-vnc", "-spice"] {
            assert!(!argv.iter().any(|w| w == banned), "{banned} in argv");
        }
    }
}
