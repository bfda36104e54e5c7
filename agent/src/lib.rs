//! Palisade host agent.
//!
//! Runs on each host as root. It serves an HTTPS API (mutual TLS: clients must
//! present a certificate chaining to the platform CA) to the controller, and
//! runs one sandboxed QEMU process per instance.
//!
//! The binary calls [`serve`] for `palisade agent <AgentArgs>`, and
//! [`jail_main`] for `palisade jail <JailArgs>` — the latter before any async
//! runtime or thread exists, since it changes the process's namespaces and
//! credentials.
//!
//! Layers: `api` (routes) → `instance` (lifecycle, state on disk, adoption) →
//! `jail` (the sandbox), `cgroup`, `qemu` (command line, accelerator), `qmp`,
//! `console`, `image` (verified copies), `disk`, `host_cmd` (runner for host
//! tools), `uid` (host-wide unique instance uids), `data_dir` (one agent per
//! data directory).

mod api;
mod cgroup;
mod config;
mod console;
mod data_dir;
mod disk;
mod fsutil;
mod host_cmd;
mod id;
mod image;
mod instance;
mod jail;
mod net;
mod process;
mod qemu;
mod qmp;
mod uid;
mod unix_socket;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use axum_server::tls_rustls::RustlsConfig;
use axum_server::Handle;
use tracing::{info, warn};

pub use config::AgentArgs;
pub use jail::JailArgs;
pub use qemu::AcceleratorChoice;

/// Runs the agent until SIGTERM or SIGINT. Instances keep running when the
/// agent stops; the next agent adopts them.
pub async fn serve(args: AgentArgs) -> anyhow::Result<()> {
    let facts = qemu::probe_host_facts();
    let cfg = config::Config::resolve(&args, facts)?;
    info!(
        accelerator = cfg.accelerator.as_str(),
        kvm_usable = facts.kvm_usable,
        cpu_is_guest = facts.cpu_is_guest,
        cgroup_version = cfg.cgroups.version().as_str(),
        data_dir = %cfg.data_dir.display(),
        "agent configured"
    );
    // Held until the agent exits: a second agent on this directory would
    // adopt, stop and clean up this one's instances.
    let _data_dir_lock = data_dir::claim(&cfg.data_dir)?;

    let tls = palisade_common::tls::server_config(&args.cert, &args.key, Some(&args.ca))
        .context("loading the agent's TLS configuration")?;
    // The network first: taps exist only with their rules, before any instance runs.
    let net = net::host::NetHost::open(&cfg.data_dir)
        .await
        .context("setting up the host network")?;
    let manager = instance::Manager::open(cfg, std::sync::Arc::new(net))
        .await
        .context("opening the instances directory")?;

    let handle: Handle<SocketAddr> = Handle::new();
    tokio::spawn(shutdown_on_signal(handle.clone()));
    if let Some(path) = args.addr_file.clone() {
        tokio::spawn(write_addr_file(handle.clone(), path));
    }

    let app = api::router(manager).into_make_service_with_connect_info::<SocketAddr>();
    axum_server::bind_rustls(args.listen, RustlsConfig::from_config(tls))
        .handle(handle)
        .serve(app)
        .await
        .with_context(|| format!("serving on {}", args.listen))?;
    info!("agent stopped");
    Ok(())
}

/// `palisade jail`: sets up the sandbox and execs QEMU. Returns only when
/// that failed, after writing the error to stderr (the instance's qemu.log).
pub fn jail_main(args: JailArgs) -> ExitCode {
    match jail::run(&args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!(
                "palisade jail (instance {}): {}",
                args.id,
                instance::error_chain(&e)
            );
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_on_signal(handle: Handle<SocketAddr>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot listen for SIGTERM/SIGINT");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("shutting down; instances keep running");
    handle.graceful_shutdown(Some(Duration::from_secs(5)));
}

async fn write_addr_file(handle: Handle<SocketAddr>, path: std::path::PathBuf) {
    let Some(addr) = handle.listening().await else {
        return;
    };
    info!(%addr, "listening");
    if let Err(e) = fsutil::write_durably(&path, format!("{addr}\n").as_bytes()) {
        warn!(path = %path.display(), error = %e, "cannot write the address file");
    }
}
