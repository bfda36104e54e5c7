//! Boot latency: from the API's create call to the guest's boot marker on the console, next to
//! a direct `qemu-system-x86_64` boot of the same image with the same flags (taken from the
//! platform's own QEMU process), and their ratio. Run as root:
//! `cargo bench -p palisade --bench boot`. Prints numbers; asserts nothing about speed.

#![allow(clippy::unwrap_used)]

#[path = "../tests/it/support.rs"]
mod support;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

const ROUNDS: usize = 3;

fn main() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "bench", None);

    let mut platform_times = Vec::new();
    let mut argv: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let started = Instant::now();
        let id = p
            .create_instance(&alice, &format!("bench-{round}"))
            .unwrap()
            .id;
        p.wait_console(&alice, &id, BOOT_MARKER);
        platform_times.push(started.elapsed());
        if argv.is_empty() {
            let pid = qemu_pids(&id)[0];
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            argv = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
        }
        let path = format!("/v1/instances/{id}");
        let _: serde_json::Value = p
            .block_on(
                alice
                    .client
                    .json(reqwest::Method::DELETE, &path, None::<&()>),
            )
            .unwrap();
        p.wait_state(&alice, &id, "deleted");
    }

    let mut direct_times = Vec::new();
    for _ in 0..ROUNDS {
        direct_times.push(direct_boot(&argv, &p.image));
    }

    let platform = median(&mut platform_times);
    let direct = median(&mut direct_times);
    println!("boot to marker, median of {ROUNDS}:");
    println!(
        "  platform (create call -> marker via API): {:>8.3} s",
        platform.as_secs_f64()
    );
    println!(
        "  direct qemu-system, same flags:            {:>8.3} s",
        direct.as_secs_f64()
    );
    println!(
        "  ratio platform / direct:                   {:>8.2}",
        platform.as_secs_f64() / direct.as_secs_f64()
    );
    println!("  flags: {}", argv[1..].join(" "));
}

/// Boots the image with `argv`, its in-chroot `/run/` paths moved to a temp dir, and returns
/// the time from spawn to the marker on the serial console socket.
fn direct_boot(argv: &[String], image: &std::path::Path) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().display().to_string();
    std::fs::copy(image.join("vmlinuz"), dir.path().join("vmlinuz")).unwrap();
    std::fs::copy(image.join("initramfs.cpio.gz"), dir.path().join("initrd")).unwrap();
    let argv: Vec<String> = argv
        .iter()
        .map(|a| a.replace("/run/", &format!("{run}/")))
        .collect();
    // Whatever the disk and kernel file names are in the argv, make them exist.
    for a in &argv {
        for part in a.split(',') {
            let path = part.trim_start_matches("file=");
            if path.starts_with(&run) && path.ends_with(".qcow2") {
                let ok = Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", path, "1G"])
                    .status()
                    .unwrap();
                assert!(ok.success());
            }
        }
    }
    for (flag, source) in [("-kernel", "vmlinuz"), ("-initrd", "initrd")] {
        let i = argv.iter().position(|a| a == flag).unwrap();
        let target = &argv[i + 1];
        if !std::path::Path::new(target).exists() {
            std::fs::copy(dir.path().join(source), target).unwrap();
        }
    }
    let socket = argv
        .iter()
        .find_map(|a| {
            a.split(',')
                .find_map(|p| p.strip_prefix("path="))
                .filter(|p| p.contains("console"))
        })
        .unwrap()
        .to_string();

    let started = Instant::now();
    let mut child = Command::new(&argv[0]).args(&argv[1..]).spawn().unwrap();
    let mut stream = poll(Duration::from_secs(30), "the console socket", || {
        UnixStream::connect(&socket).ok()
    });
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(BOOT_MARKER) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "console closed before the marker");
        seen.extend_from_slice(&buf[..n]);
    }
    let elapsed = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    elapsed
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}
