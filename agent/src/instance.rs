//! Instance lifecycle: start, stop, delete, console; state on disk; adoption
//! of running QEMU processes after an agent restart.
//!
//! On disk, per instance, under `<data>/instances/<id>/` (root-owned, 0700):
//!
//! | file | what |
//! |---|---|
//! | `uid` | the instance's uid (= gid), unique on the host (`uid.rs`), kept until delete |
//! | `spec.json` | the last spec it was started with |
//! | `pid` | `<pid> <start time>` of the running QEMU; absent when stopped |
//! | `console.log`, `console.base` | the capped console log (`console.rs`) |
//! | `qemu.log` | stdout and stderr of the jailer and QEMU, for the last boot |
//! | `root/` | the chroot: `run/` (owned by the uid), `dev/`, `usr/`, symlinks |
//!
//! Each instance has a lock; every operation on it holds the lock from start to
//! end, so operations on one instance are serialised. A QEMU exit is noticed by
//! a watcher task (waiting on our child, or polling `/proc` for an adopted
//! process), which signals the exit and then cleans up under the lock.

use std::collections::{BTreeSet, HashMap};
use std::fs::OpenOptions;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid};
use palisade_common::agent_api::{
    ConsoleChunk, EraseReport, HostInfo, InstanceSpec, InstanceStatus, PowerState,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, OwnedMutexGuard};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn, Instrument};

use crate::cgroup::{CgroupError, Limits};
use crate::config::Config;
use crate::console::ConsoleLog;
use crate::disk::{self, DiskError};
use crate::fsutil;
use crate::id::InstanceId;
use crate::image::{self, ImageError};
use crate::jail::JailArgs;
use crate::process;
use crate::qemu::{self, Accelerator};
use crate::qmp::Qmp;
use crate::uid::{self, HostUidLock, UID_BASE, UID_COUNT};

/// How long QEMU gets to exit after QMP `quit` before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(10);
/// How long a start waits for QEMU to answer on QMP.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an adopted process (not our child) is checked for exit.
const ADOPTED_POLL: Duration = Duration::from_millis(200);
/// Bytes of `qemu.log` quoted in the log when a start fails.
const LOG_TAIL: u64 = 2048;

const DISK_FILE: &str = "disk.qcow2";

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("no such instance")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    #[error("image check failed")]
    Image(#[source] ImageError),
    #[error("preparing the disk")]
    Disk(#[source] DiskError),
    #[error("setting up cgroups")]
    Cgroup(#[source] CgroupError),
    #[error("QEMU did not start; qemu.log ends with: {log_tail}")]
    StartFailed { log_tail: String },
    #[error("QEMU did not exit after SIGKILL")]
    StopTimedOut,
    #[error("the instance is not running, or its console is not attached yet")]
    ConsoleDetached,
    #[error("all {UID_COUNT} instance uids are in use")]
    NoFreeUid,
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> InstanceError {
    let what = what.into();
    move |source| InstanceError::Io { what, source }
}

/// Where an instance's files are.
#[derive(Debug, Clone)]
struct Paths {
    dir: PathBuf,
    root: PathBuf,
    run: PathBuf,
    uid: PathBuf,
    spec: PathBuf,
    pid: PathBuf,
    qemu_log: PathBuf,
}

impl Paths {
    fn new(instances: &Path, id: &InstanceId) -> Self {
        let dir = instances.join(id.as_str());
        let root = dir.join("root");
        Paths {
            run: root.join("run"),
            uid: dir.join("uid"),
            spec: dir.join("spec.json"),
            pid: dir.join("pid"),
            qemu_log: dir.join("qemu.log"),
            root,
            dir,
        }
    }

    /// A path in `root/run` from its path inside the chroot (`/run/...`).
    fn in_run(&self, chroot_path: &str) -> PathBuf {
        let name = chroot_path.trim_start_matches("/run/");
        self.run.join(name)
    }
}

/// A QEMU process we started or adopted.
struct Running {
    pid: u32,
    start_time: u64,
    /// Becomes true once the process has exited.
    exited: watch::Receiver<bool>,
    console_reader: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    /// `None` until the instance directory and its uid exist.
    uid: Option<u32>,
    running: Option<Running>,
    /// Set by delete: the slot is gone from the map; look it up again.
    deleted: bool,
}

/// The writing half of the console socket while a reader holds the connection.
type ConsoleInput = Arc<tokio::sync::Mutex<Option<tokio::net::unix::OwnedWriteHalf>>>;

struct Slot {
    id: InstanceId,
    paths: Paths,
    console: Arc<ConsoleLog>,
    console_input: ConsoleInput,
    state: Arc<tokio::sync::Mutex<State>>,
    /// What `GET /v1/instances` shows, updated at the end of each operation,
    /// so listing never waits for a slow stop.
    published: Mutex<Option<InstanceStatus>>,
}

impl Slot {
    /// The span of the instance's background tasks (exit watcher, console
    /// reader): theirs, not the request's that started them.
    fn span(&self) -> tracing::Span {
        tracing::info_span!(parent: None, "instance", instance_id = %self.id)
    }

    fn status(&self, state: &State) -> Option<InstanceStatus> {
        let uid = state.uid?;
        let running = state.running.as_ref().filter(|r| !*r.exited.borrow());
        Some(InstanceStatus {
            id: self.id.to_string(),
            state: if running.is_some() {
                PowerState::Running
            } else {
                PowerState::Stopped
            },
            pid: running.map(|r| r.pid),
            uid,
        })
    }

    fn publish(&self, state: &State) {
        let status = self.status(state);
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }
}

/// All instances of this host.
pub struct Manager {
    cfg: Config,
    net: Arc<crate::net::host::NetHost>,
    instances_dir: PathBuf,
    slots: Mutex<HashMap<InstanceId, Arc<Slot>>>,
    /// Serialises this agent's starts before they queue for the host-wide
    /// uid lock (`uid.rs`), so at most one of them waits on it at a time.
    uid_lock: tokio::sync::Mutex<()>,
    /// `<id>.json` per erased disk: the erase report, kept so that a repeated delete (after a
    /// controller crash between the erase and recording it) still answers when it happened.
    /// TODO(perf): receipts are never pruned; they are a few hundred bytes each.
    receipts_dir: PathBuf,
}

impl Manager {
    /// Opens the data directory and takes over what it finds: running QEMU
    /// processes are adopted, dead ones are cleaned up.
    pub async fn open(
        cfg: Config,
        net: Arc<crate::net::host::NetHost>,
    ) -> Result<Arc<Self>, InstanceError> {
        let instances_dir = cfg.data_dir.join("instances");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&instances_dir)
            .map_err(io_err(format!("creating {}", instances_dir.display())))?;

        let receipts_dir = cfg.data_dir.join("erased");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&receipts_dir)
            .map_err(io_err(format!("creating {}", receipts_dir.display())))?;

        let manager = Arc::new(Manager {
            cfg,
            net,
            instances_dir,
            receipts_dir,
            slots: Mutex::new(HashMap::new()),
            uid_lock: tokio::sync::Mutex::new(()),
        });
        manager.recover().await?;
        Ok(manager)
    }

    pub fn host_info(&self) -> HostInfo {
        HostInfo {
            hostname: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            accelerator: self.cfg.accelerator.as_str().to_string(),
            cgroup_version: self.cfg.cgroups.version().as_str().to_string(),
        }
    }

    pub fn list(&self) -> Vec<InstanceStatus> {
        let slots: Vec<_> = self.lock_slots().values().cloned().collect();
        let mut list: Vec<_> = slots
            .iter()
            .filter_map(|s| {
                s.published
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    pub async fn console(
        &self,
        id: &InstanceId,
        offset: u64,
    ) -> Result<ConsoleChunk, InstanceError> {
        let slot = self.slot(id, false).ok_or(InstanceError::NotFound)?;
        if slot
            .published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Err(InstanceError::NotFound);
        }
        let console = slot.console.clone();
        tokio::task::spawn_blocking(move || console.read(offset))
            .await
            .map_err(|e| io_err("console reader task")(io::Error::other(e)))?
            .map_err(io_err("reading the console log"))
    }

    /// The host's tenant networks.
    pub fn net(&self) -> &crate::net::host::NetHost {
        &self.net
    }

    /// Types `data` on the instance's serial console (what a tenant sends through the
    /// console API). Only while QEMU runs and the console reader is attached.
    pub async fn console_input(&self, id: &InstanceId, data: &[u8]) -> Result<(), InstanceError> {
        let slot = self.slot(id, false).ok_or(InstanceError::NotFound)?;
        let mut input = slot.console_input.lock().await;
        let writer = input.as_mut().ok_or(InstanceError::ConsoleDetached)?;
        match tokio::time::timeout(Duration::from_secs(5), writer.write_all(data)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => {
                // The guest does not read (or QEMU went away): drop the half, the reader
                // reattaches.
                *input = None;
                Err(InstanceError::ConsoleDetached)
            }
        }
    }

    // ---- slots and locks ------------------------------------------------

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, id: &InstanceId, create: bool) -> Option<Arc<Slot>> {
        let mut slots = self.lock_slots();
        if let Some(slot) = slots.get(id) {
            return Some(slot.clone());
        }
        if !create {
            return None;
        }
        let paths = Paths::new(&self.instances_dir, id);
        let slot = Arc::new(Slot {
            id: id.clone(),
            console: Arc::new(ConsoleLog::new(&paths.dir, self.cfg.console_cap)),
            console_input: ConsoleInput::default(),
            paths,
            state: Arc::new(tokio::sync::Mutex::new(State::default())),
            published: Mutex::new(None),
        });
        slots.insert(id.clone(), slot.clone());
        Some(slot)
    }

    /// The instance's slot, locked. A slot deleted while we waited for its
    /// lock is looked up again.
    async fn lock(
        &self,
        id: &InstanceId,
        create: bool,
    ) -> Option<(Arc<Slot>, OwnedMutexGuard<State>)> {
        loop {
            let slot = self.slot(id, create)?;
            let state = slot.state.clone().lock_owned().await;
            if !state.deleted {
                return Some((slot, state));
            }
        }
    }

    fn forget(&self, slot: &Slot, state: &mut State) {
        state.deleted = true;
        self.lock_slots().remove(&slot.id);
    }

    // ---- start --------------------------------------------------------------

    /// Boots the instance, or returns its status if it already runs.
    pub async fn start(
        self: &Arc<Self>,
        id: &InstanceId,
        spec: &InstanceSpec,
    ) -> Result<InstanceStatus, InstanceError> {
        validate_spec(id, spec)?;
        for nic in &spec.nics {
            if !self.net.has_port(&nic.port_id).await {
                return Err(InstanceError::Invalid(format!(
                    "port {} is not in this host's network (PUT /v1/network first)",
                    nic.port_id
                )));
            }
        }
        let Some((slot, mut state)) = self.lock(id, true).await else {
            unreachable!("lock with create always finds a slot");
        };
        let result = self.start_locked(&slot, &mut state, spec).await;
        if result.is_err() && state.uid.is_none() {
            // Nothing was created on disk: leave no trace in memory either.
            self.forget(&slot, &mut state);
        }
        slot.publish(&state);
        result
    }

    async fn start_locked(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        state: &mut State,
        spec: &InstanceSpec,
    ) -> Result<InstanceStatus, InstanceError> {
        self.finish_if_exited(slot, state).await;
        if state.running.is_some() {
            return slot.status(state).ok_or(InstanceError::NotFound);
        }

        // Held until QEMU runs under its uid (or the start failed), so that
        // no agent on this host hands that uid out meanwhile.
        let _in_process = self.uid_lock.lock().await;
        let _host_wide = HostUidLock::acquire(Path::new(uid::HOST_LOCK_PATH))
            .await
            .map_err(io_err(format!(
                "taking the uid lock {}",
                uid::HOST_LOCK_PATH
            )))?;
        let uid = self.ensure_dir_and_uid(slot, state)?;
        slot.publish(state);
        let owner = (Uid::from_raw(uid), Gid::from_raw(uid));
        let paths = &slot.paths;
        let spec_json = serde_json::to_vec_pretty(spec)
            .map_err(|e| io_err("encoding spec.json")(io::Error::other(e)))?;
        fsutil::write_durably(&paths.spec, &spec_json).map_err(io_err("writing spec.json"))?;

        prepare_root(paths, owner, self.cfg.accelerator)
            .map_err(io_err(format!("preparing {}", paths.root.display())))?;
        let created = disk::ensure(
            &self.cfg.qemu_img,
            &paths.in_run(qemu::DISK),
            &paths.dir.join("disk.qcow2.new"),
            spec.disk_gib,
            owner,
        )
        .await
        .map_err(InstanceError::Disk)?;
        if created {
            info!(disk_gib = spec.disk_gib, "disk created");
        }
        self.copy_image(paths, spec, owner).await?;
        for socket in [qemu::CONSOLE_SOCKET, qemu::QMP_SOCKET] {
            image::remove_if_present(&paths.in_run(socket))
                .map_err(io_err("removing a stale socket"))?;
        }

        let limits = Limits::for_instance(spec.vcpus, spec.memory_mib);
        let cgroups = self.cfg.cgroups.create(&slot.id, &limits);
        let cgroups = match cgroups {
            Ok(dirs) => dirs,
            Err(e) => {
                self.remove_cgroups(&slot.id).await;
                return Err(InstanceError::Cgroup(e));
            }
        };
        match self.launch(slot, uid, cgroups, spec).await {
            Ok(running) => {
                state.running = Some(running);
                info!(uid, "instance running");
                slot.status(state).ok_or(InstanceError::NotFound)
            }
            Err(e) => {
                self.remove_cgroups(&slot.id).await;
                let _ = image::remove_if_present(&paths.pid);
                Err(e)
            }
        }
    }

    /// Creates the instance directory and gives it a uid that no process on
    /// the host runs under. A recorded uid is kept, unless something else now
    /// runs under it (another agent's instance took it while this one was
    /// stopped): then the instance gets a new one, and the start gives `run/`
    /// and its files to it. Called with the host-wide uid lock held.
    fn ensure_dir_and_uid(&self, slot: &Slot, state: &mut State) -> Result<u32, InstanceError> {
        let paths = &slot.paths;
        match std::fs::DirBuilder::new().mode(0o700).create(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("creating the instance directory")(e)),
        }
        let recorded = match state.uid {
            Some(uid) => Some(uid),
            None => read_uid(&paths.uid).map_err(io_err("reading the uid file"))?,
        };
        let live = uid::ids_of_live_processes().map_err(io_err("listing the uids of processes"))?;
        if let Some(uid) = recorded {
            if !live.contains(&uid) {
                state.uid = Some(uid);
                return Ok(uid);
            }
            warn!(
                uid,
                "another process on this host runs under the instance's uid; allocating a new one"
            );
        }

        let mut taken = self
            .uids_in_use()
            .map_err(io_err("listing instance uids"))?;
        taken.extend(live);
        let uid = uid::choose(&taken, uid::is_host_account).ok_or(InstanceError::NoFreeUid)?;
        fsutil::write_durably(&paths.uid, format!("{uid}\n").as_bytes())
            .map_err(io_err("writing the uid file"))?;
        fsutil::sync_parent(&paths.dir).map_err(io_err("syncing the instances directory"))?;
        state.uid = Some(uid);
        Ok(uid)
    }

    fn uids_in_use(&self) -> io::Result<BTreeSet<u32>> {
        let mut used = BTreeSet::new();
        for entry in std::fs::read_dir(&self.instances_dir)? {
            if let Some(uid) = read_uid(&entry?.path().join("uid"))? {
                used.insert(uid);
            }
        }
        Ok(used)
    }

    async fn copy_image(
        &self,
        paths: &Paths,
        spec: &InstanceSpec,
        owner: (Uid, Gid),
    ) -> Result<(), InstanceError> {
        let files = [
            (
                &spec.image.kernel_path,
                &spec.image.kernel_sha256,
                qemu::KERNEL,
            ),
            (
                &spec.image.initrd_path,
                &spec.image.initrd_sha256,
                qemu::INITRD,
            ),
        ];
        for (source, digest, dest) in files {
            let (source, digest) = (PathBuf::from(source), digest.clone());
            let dest = paths.in_run(dest);
            tokio::task::spawn_blocking(move || {
                image::copy_verified(&source, &dest, &digest, owner)
            })
            .await
            .map_err(|e| io_err("image copy task")(io::Error::other(e)))?
            .map_err(InstanceError::Image)?;
        }
        Ok(())
    }

    /// Runs the jailer, which becomes QEMU, and waits until QEMU answers on
    /// QMP. On failure the process is gone when this returns.
    async fn launch(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        uid: u32,
        cgroups: Vec<PathBuf>,
        spec: &InstanceSpec,
    ) -> Result<Running, InstanceError> {
        let paths = &slot.paths;
        let accel = self.cfg.accelerator;
        let (netns, tap) = match spec.nics.first() {
            Some(nic) => (
                Some(self.net.netns_path()),
                Some(crate::net::nft::tap_name(&nic.port_id)),
            ),
            None => (None, None),
        };
        let jail = JailArgs {
            id: slot.id.to_string(),
            root: paths.root.clone(),
            uid,
            gid: uid,
            cgroups,
            kvm: accel == Accelerator::Kvm,
            netns,
            tap,
            qemu: qemu::command_line(&self.cfg.qemu, spec, accel)
                .into_iter()
                .map(Into::into)
                .collect(),
        };

        // TODO(security): qemu.log is truncated at each boot but not capped
        // while QEMU runs; QEMU writes little there, the guest nothing.
        let log = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&paths.qemu_log)
            .map_err(io_err("opening qemu.log"))?;
        let log_err = log.try_clone().map_err(io_err("duplicating qemu.log"))?;
        let mut child = tokio::process::Command::new(&self.cfg.jailer)
            .arg("jail")
            .args(jail.to_args())
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .map_err(io_err(format!(
                "running the jailer {}",
                self.cfg.jailer.display()
            )))?;

        let pid = child.id().ok_or_else(|| InstanceError::StartFailed {
            log_tail: "the jailer exited at once".into(),
        })?;
        // The pid stays a zombie until we reap it, so its start time is there.
        let start_time = process::stat(pid).map(|s| s.start_time).unwrap_or(0);
        fsutil::write_durably(&paths.pid, format!("{pid} {start_time}\n").as_bytes())
            .map_err(io_err("writing the pid file"))?;
        info!(pid, "jailer started");

        let (exited_tx, exited) = watch::channel(false);
        let manager = self.clone();
        let watched = slot.clone();
        tokio::spawn(
            async move {
                match child.wait().await {
                    Ok(status) => info!(pid, %status, "QEMU exited"),
                    Err(e) => error!(pid, error = %e, "waiting for QEMU failed"),
                }
                let _ = exited_tx.send(true);
                manager.finish_exit(&watched, pid, start_time).await;
            }
            .instrument(slot.span()),
        );

        if let Err(e) = self.wait_for_qmp(paths, pid, exited.clone()).await {
            if !*exited.borrow() {
                kill_if_same(pid, start_time);
                let mut exited = exited.clone();
                let _ = tokio::time::timeout(QUIT_GRACE, exited.wait_for(|e| *e)).await;
            }
            return Err(e);
        }

        let console_reader = tokio::spawn(
            read_console(
                paths.in_run(qemu::CONSOLE_SOCKET),
                pid,
                slot.console.clone(),
                slot.console_input.clone(),
                exited.clone(),
            )
            .instrument(slot.span()),
        );
        Ok(Running {
            pid,
            start_time,
            exited,
            console_reader,
        })
    }

    async fn wait_for_qmp(
        &self,
        paths: &Paths,
        pid: u32,
        exited: watch::Receiver<bool>,
    ) -> Result<(), InstanceError> {
        let socket = paths.in_run(qemu::QMP_SOCKET);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if *exited.borrow() {
                return Err(InstanceError::StartFailed {
                    log_tail: log_tail(&paths.qemu_log),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(InstanceError::StartFailed {
                    log_tail: format!("no QMP answer within {START_TIMEOUT:?}"),
                });
            }
            if socket.exists() {
                match Qmp::connect(&socket, pid, Duration::from_secs(2)).await {
                    Ok(_) => return Ok(()),
                    Err(e) => debug!(error = %e, "QMP not ready yet"),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // ---- stop and exit -------------------------------------------------------

    pub async fn stop(self: &Arc<Self>, id: &InstanceId) -> Result<InstanceStatus, InstanceError> {
        let (slot, mut state) = self.lock(id, false).await.ok_or(InstanceError::NotFound)?;
        if state.uid.is_none() {
            return Err(InstanceError::NotFound);
        }
        let result = self.stop_locked(&slot, &mut state).await;
        slot.publish(&state);
        result?;
        slot.status(&state).ok_or(InstanceError::NotFound)
    }

    /// QMP `quit`, then SIGKILL if QEMU is still there after the grace period;
    /// then the exit is finished (cgroups removed).
    async fn stop_locked(&self, slot: &Slot, state: &mut State) -> Result<(), InstanceError> {
        let Some(running) = &state.running else {
            return Ok(());
        };
        let mut exited = running.exited.clone();
        if !*exited.borrow() {
            let socket = slot.paths.in_run(qemu::QMP_SOCKET);
            let quit = async {
                let mut qmp = Qmp::connect(&socket, running.pid, Duration::from_secs(2)).await?;
                qmp.execute("quit", Duration::from_secs(2)).await
            };
            if let Err(e) = quit.await {
                warn!(error = %e, "QMP quit failed; QEMU will be killed");
            }
            let quitted = tokio::time::timeout(QUIT_GRACE, exited.wait_for(|e| *e))
                .await
                .is_ok();
            if !quitted {
                warn!(
                    pid = running.pid,
                    "QEMU still running after quit; sending SIGKILL"
                );
                kill_if_same(running.pid, running.start_time);
                tokio::time::timeout(QUIT_GRACE, exited.wait_for(|e| *e))
                    .await
                    .map_err(|_| InstanceError::StopTimedOut)?
                    .map_err(|_| InstanceError::StopTimedOut)?;
            }
        }
        self.finish_exit_locked(slot, state).await;
        Ok(())
    }

    /// Called by a watcher once the process `pid` has exited.
    async fn finish_exit(&self, slot: &Slot, pid: u32, start_time: u64) {
        let mut state = slot.state.lock().await;
        let same = state
            .running
            .as_ref()
            .is_some_and(|r| r.pid == pid && r.start_time == start_time);
        if same {
            self.finish_exit_locked(slot, &mut state).await;
            slot.publish(&state);
        }
    }

    async fn finish_if_exited(&self, slot: &Slot, state: &mut State) {
        if state.running.as_ref().is_some_and(|r| *r.exited.borrow()) {
            self.finish_exit_locked(slot, state).await;
        }
    }

    /// After QEMU has exited: let the console reader drain, remove the
    /// cgroups and the pid file.
    async fn finish_exit_locked(&self, slot: &Slot, state: &mut State) {
        let Some(running) = state.running.take() else {
            return;
        };
        let mut reader = running.console_reader;
        if tokio::time::timeout(Duration::from_secs(2), &mut reader)
            .await
            .is_err()
        {
            reader.abort();
        }
        self.remove_cgroups(&slot.id).await;
        if let Err(e) = image::remove_if_present(&slot.paths.pid) {
            warn!(error = %e, "removing the pid file failed");
        }
        info!("instance stopped");
    }

    async fn remove_cgroups(&self, id: &InstanceId) {
        let cgroups = self.cfg.cgroups.clone();
        let id = id.clone();
        let removed = tokio::task::spawn_blocking(move || cgroups.remove(&id)).await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %error_chain(&e), "removing cgroups failed"),
            Err(e) => warn!(error = %e, "cgroup removal task failed"),
        }
    }

    // ---- delete -------------------------------------------------------------

    /// Stops the instance, erases its disk and removes every trace of it. An
    /// unknown instance is answered like a repeated delete: nothing erased.
    pub async fn delete(self: &Arc<Self>, id: &InstanceId) -> Result<EraseReport, InstanceError> {
        let nothing = EraseReport {
            id: id.to_string(),
            disk_erased_at: None,
            disk_bytes_overwritten: 0,
        };
        let Some((slot, mut state)) = self.lock(id, false).await else {
            return Ok(self.receipt(id).unwrap_or(nothing));
        };
        let result = self.delete_locked(&slot, &mut state).await;
        if result.is_ok() {
            self.forget(&slot, &mut state);
        }
        slot.publish(&state);
        result
    }

    async fn delete_locked(
        &self,
        slot: &Slot,
        state: &mut State,
    ) -> Result<EraseReport, InstanceError> {
        self.stop_locked(slot, state).await?;
        let paths = slot.paths.clone();

        let erased = tokio::task::spawn_blocking(move || {
            let erased = disk::erase_run_dir(&paths.run, DISK_FILE)?;
            let at = time::OffsetDateTime::now_utc();
            Ok::<_, DiskError>((erased, at))
        })
        .await
        .map_err(|e| io_err("erase task")(io::Error::other(e)))?
        .map_err(InstanceError::Disk)?;

        // Record the erase durably before the directory goes, so a repeated delete can tell
        // when it happened; a delete that finds the disk already gone reuses that receipt.
        let (disk_len, at) = erased;
        let report = match (disk_len, self.receipt(&slot.id)) {
            (None, Some(earlier)) => earlier,
            _ => EraseReport {
                id: slot.id.to_string(),
                disk_erased_at: disk_len.map(|_| rfc3339(at)),
                disk_bytes_overwritten: disk_len.unwrap_or(0),
            },
        };
        if report.disk_erased_at.is_some() {
            let json =
                serde_json::to_vec(&report).map_err(|e| io_err("receipt")(io::Error::other(e)))?;
            fsutil::write_durably(&self.receipt_path(&slot.id), &json)
                .map_err(io_err("writing the erase receipt"))?;
        }

        // Any leftover cgroup must go too; here a failure is an error.
        let cgroups = self.cfg.cgroups.clone();
        let id = slot.id.clone();
        tokio::task::spawn_blocking(move || cgroups.remove(&id))
            .await
            .map_err(|e| io_err("cgroup removal task")(io::Error::other(e)))?
            .map_err(InstanceError::Cgroup)?;

        fsutil::remove_tree_on_one_device(&slot.paths.dir)
            .map_err(io_err("removing the instance directory"))?;
        fsutil::sync_dir(&self.instances_dir).map_err(io_err("syncing the instances directory"))?;
        state.uid = None;

        let (disk_len, _) = erased;
        info!(disk_bytes = disk_len.unwrap_or(0), "instance deleted");
        Ok(report)
    }

    fn receipt_path(&self, id: &InstanceId) -> PathBuf {
        self.receipts_dir.join(format!("{id}.json"))
    }

    /// The report of an earlier erase of this instance, if there was one.
    fn receipt(&self, id: &InstanceId) -> Option<EraseReport> {
        let text = fsutil::read_optional(&self.receipt_path(id)).ok()??;
        serde_json::from_str(&text).ok()
    }

    // ---- recovery after an agent restart ----------------------------------

    async fn recover(self: &Arc<Self>) -> Result<(), InstanceError> {
        let entries = std::fs::read_dir(&self.instances_dir)
            .map_err(io_err("listing the instances directory"))?;
        for entry in entries {
            let entry = entry.map_err(io_err("listing the instances directory"))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| InstanceId::parse(n).ok()) else {
                warn!(name = ?name, "ignoring a foreign entry in the instances directory");
                continue;
            };
            let span = tracing::info_span!("recover", instance_id = %id);
            if let Err(e) = self.recover_one(&id).instrument(span).await {
                error!(instance_id = %id, error = %error_chain(&e), "recovering instance failed");
            }
        }
        Ok(())
    }

    async fn recover_one(self: &Arc<Self>, id: &InstanceId) -> Result<(), InstanceError> {
        let Some((slot, mut state)) = self.lock(id, true).await else {
            unreachable!("lock with create always finds a slot");
        };
        let paths = slot.paths.clone();
        state.uid = read_uid(&paths.uid).map_err(io_err("reading the uid file"))?;
        if state.uid.is_none() {
            // A start that stopped before allocating a uid: it created nothing
            // but the directory, and never a disk.
            if !paths.in_run(qemu::DISK).exists() {
                info!("removing an instance directory left by an interrupted start");
                fsutil::remove_tree_on_one_device(&paths.dir)
                    .map_err(io_err("removing the instance directory"))?;
            }
            self.forget(&slot, &mut state);
            return Ok(());
        }

        let recorded = fsutil::read_optional(&paths.pid)
            .map_err(io_err("reading the pid file"))?
            .and_then(|text| parse_pid_file(&text));
        match recorded {
            Some((pid, start_time)) if process::is_running(pid, start_time) => {
                state.running = Some(self.adopt(&slot, pid, start_time));
                info!(pid, "adopted running QEMU");
            }
            _ => {
                self.kill_unrecorded(id).await?;
                self.remove_cgroups(id).await;
                image::remove_if_present(&paths.pid).map_err(io_err("removing the pid file"))?;
                info!("instance is stopped");
            }
        }
        slot.publish(&state);
        Ok(())
    }

    /// Kills what runs in the cgroups of an instance recorded as stopped: a
    /// QEMU whose start the previous agent did not finish recording (it died
    /// between spawning the jailer and writing the pid file). That start was
    /// never acknowledged, so undoing it is safe; leaving it would let a
    /// second QEMU open the same disk.
    async fn kill_unrecorded(&self, id: &InstanceId) -> Result<(), InstanceError> {
        let members = self
            .cfg
            .cgroups
            .members(id)
            .map_err(InstanceError::Cgroup)?;
        if members.is_empty() {
            return Ok(());
        }
        warn!(pids = ?members, "killing unrecorded processes in the instance's cgroups");
        for pid in &members {
            if let Some(stat) = process::stat(*pid) {
                kill_if_same(*pid, stat.start_time);
            }
        }
        let deadline = tokio::time::Instant::now() + QUIT_GRACE;
        while members
            .iter()
            .any(|pid| process::stat(*pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X')))
        {
            if tokio::time::Instant::now() > deadline {
                return Err(InstanceError::StopTimedOut);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Watches a QEMU that is not our child (its parent was an earlier agent)
    /// by polling `/proc`, and reattaches its console.
    fn adopt(self: &Arc<Self>, slot: &Arc<Slot>, pid: u32, start_time: u64) -> Running {
        let (exited_tx, exited) = watch::channel(false);
        let manager = self.clone();
        let watched = slot.clone();
        tokio::spawn(
            async move {
                while process::is_running(pid, start_time) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                info!(pid, "adopted QEMU exited");
                let _ = exited_tx.send(true);
                manager.finish_exit(&watched, pid, start_time).await;
            }
            .instrument(slot.span()),
        );
        let console_reader = tokio::spawn(
            read_console(
                slot.paths.in_run(qemu::CONSOLE_SOCKET),
                pid,
                slot.console.clone(),
                slot.console_input.clone(),
                exited.clone(),
            )
            .instrument(slot.span()),
        );
        Running {
            pid,
            start_time,
            exited,
            console_reader,
        }
    }
}

/// Lays out the chroot: root-owned directories and mount points, and `run/`
/// for the instance uid. Idempotent.
fn prepare_root(paths: &Paths, owner: (Uid, Gid), accel: Accelerator) -> io::Result<()> {
    let root_dirs = [
        paths.root.clone(),
        paths.root.join("dev"),
        paths.root.join("usr"),
    ];
    for dir in &root_dirs {
        make_dir(dir, 0o755)?;
    }
    make_dir(&paths.run, 0o700)?;
    std::os::unix::fs::lchown(&paths.run, Some(owner.0.as_raw()), Some(owner.1.as_raw()))?;

    let dev = paths.root.join("dev");
    for name in ["null", "zero", "urandom", "random"] {
        make_empty_file(&dev.join(name))?;
    }
    if accel == Accelerator::Kvm {
        make_empty_file(&dev.join("kvm"))?;
    } else {
        image::remove_if_present(&dev.join("kvm"))?;
    }

    // Debian 12 is merged-usr: the top-level directories are symlinks.
    for name in ["bin", "sbin", "lib", "lib64"] {
        let link = paths.root.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("usr/{name}"), &link)?;
        }
    }
    Ok(())
}

fn make_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        }
        Err(e) => Err(e),
    }
}

fn make_empty_file(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map(drop)
}

fn read_uid(path: &Path) -> io::Result<Option<u32>> {
    let Some(text) = fsutil::read_optional(path)? else {
        return Ok(None);
    };
    let uid: u32 = text
        .trim()
        .parse()
        .map_err(|_| io::Error::new(ErrorKind::InvalidData, "uid file is not a number"))?;
    if !(UID_BASE..UID_BASE + UID_COUNT).contains(&uid) {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            "uid outside the instance range",
        ));
    }
    Ok(Some(uid))
}

fn parse_pid_file(text: &str) -> Option<(u32, u64)> {
    let mut words = text.split_whitespace();
    let pid = words.next()?.parse().ok()?;
    let start_time = words.next()?.parse().ok()?;
    Some((pid, start_time))
}

/// SIGKILL `pid` only if it is still the process we started.
fn kill_if_same(pid: u32, start_time: u64) {
    if !process::is_running(pid, start_time) {
        return;
    }
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    if let Err(e) = kill(Pid::from_raw(raw), Signal::SIGKILL) {
        warn!(pid, error = %e, "SIGKILL failed");
    }
}

/// The last bytes of `qemu.log`, for the error of a failed start.
fn log_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return "(no qemu.log)".into();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)));
    let mut bytes = Vec::new();
    let _ = file.take(LOG_TAIL).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// Appends the guest's serial output to its console log until QEMU exits,
/// reconnecting whenever the socket drops (QEMU serves one client at a time;
/// what the guest writes while nobody is connected is lost).
async fn read_console(
    socket: PathBuf,
    pid: u32,
    log: Arc<ConsoleLog>,
    input: ConsoleInput,
    mut exited: watch::Receiver<bool>,
) {
    let mut pause = Duration::from_millis(100);
    loop {
        if *exited.borrow() {
            return;
        }
        // Only this instance's QEMU: its run/ directory is the guest uid's to change.
        match crate::unix_socket::connect_to_process(&socket, pid).await {
            Ok(stream) => {
                debug!("console attached");
                pause = Duration::from_millis(100);
                let (reader, writer) = stream.into_split();
                *input.lock().await = Some(writer);
                let pumped = pump_console(reader, &log).await;
                *input.lock().await = None;
                if let Err(e) = pumped {
                    // Only the log file can fail here (e.g. deleted): stop.
                    warn!(error = %e, "console log write failed; console reader stops");
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                // Someone else's socket in the guest's place: logged the first few times, tried
                // again less and less often (the guest can make this happen at will).
                if pause < Duration::from_secs(1) {
                    warn!(error = %e, "console socket is not this instance's QEMU");
                }
                pause = (pause * 2).min(Duration::from_secs(30));
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            changed = exited.changed() => if changed.is_err() { return },
        }
    }
}

/// Copies from the console socket to the log until EOF. A socket error ends
/// the copy like EOF; only a log write error is returned.
async fn pump_console(
    mut stream: tokio::net::unix::OwnedReadHalf,
    log: &Arc<ConsoleLog>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Ok(()),
            Ok(n) => n,
        };
        let data = buf[..n].to_vec();
        let log = log.clone();
        tokio::task::spawn_blocking(move || log.append(&data))
            .await
            .map_err(io::Error::other)??;
    }
}

fn validate_spec(id: &InstanceId, spec: &InstanceSpec) -> Result<(), InstanceError> {
    let invalid = |msg: &str| Err(InstanceError::Invalid(msg.to_string()));
    if spec.id != id.as_str() {
        return invalid("the body's id differs from the path's");
    }
    if spec.nics.len() > 1 {
        return invalid("at most one NIC per instance");
    }
    if !(1..=64).contains(&spec.vcpus) {
        return invalid("vcpus must be between 1 and 64");
    }
    if !(64..=262_144).contains(&spec.memory_mib) {
        return invalid("memory_mib must be between 64 and 262144");
    }
    if !(1..=4096).contains(&spec.disk_gib) {
        return invalid("disk_gib must be between 1 and 4096");
    }
    let image = &spec.image;
    for digest in [&image.kernel_sha256, &image.initrd_sha256] {
        let hex = digest.len() == 64
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return invalid("image digests must be 64 lower-case hex digits");
        }
    }
    for path in [&image.kernel_path, &image.initrd_path] {
        if !path.starts_with('/') || path.contains('\0') {
            return invalid("image paths must be absolute");
        }
    }
    if image.cmdline.len() > 1024 || !image.cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return invalid("cmdline must be at most 1024 printable ASCII characters");
    }
    Ok(())
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// `error: cause: cause…`, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::agent_api::ImageSpec;

    fn id() -> InstanceId {
        InstanceId::parse("0f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b").expect("valid id")
    }

    fn spec() -> InstanceSpec {
        InstanceSpec {
            id: id().to_string(),
            vcpus: 1,
            memory_mib: 128,
            disk_gib: 1,
            image: ImageSpec {
                kernel_path: "/images/vmlinuz".into(),
                kernel_sha256: "ab".repeat(32),
                initrd_path: "/images/initrd".into(),
                initrd_sha256: "cd".repeat(32),
                cmdline: "quiet".into(),
            },
            nics: vec![],
        }
    }

    #[test]
    fn a_sane_spec_is_accepted() {
        assert!(validate_spec(&id(), &spec()).is_ok());
    }

    #[test]
    fn bad_specs_are_refused() {
        type Mutation = Box<dyn Fn(&mut InstanceSpec)>;
        let cases: Vec<Mutation> = vec![
            Box::new(|s| s.id = "1f8e2a4c-1b2d-4e5f-8a9b-0c1d2e3f4a5b".into()),
            Box::new(|s| s.vcpus = 0),
            Box::new(|s| s.memory_mib = 1),
            Box::new(|s| s.disk_gib = 0),
            Box::new(|s| s.image.kernel_sha256 = "AB".repeat(32)),
            Box::new(|s| s.image.initrd_sha256 = "ab".into()),
            Box::new(|s| s.image.kernel_path = "relative/vmlinuz".into()),
            Box::new(|s| s.image.cmdline = "a\nb".into()),
            Box::new(|s| s.image.cmdline = "x".repeat(2000)),
        ];
        for (i, mutate) in cases.iter().enumerate() {
            let mut s = spec();
            mutate(&mut s);
            assert!(
                matches!(validate_spec(&id(), &s), Err(InstanceError::Invalid(_))),
                "case {i} accepted"
            );
        }
    }

    #[test]
    fn pid_file_round_trip() {
        assert_eq!(parse_pid_file("4242 987654\n"), Some((4242, 987654)));
        assert_eq!(parse_pid_file("4242"), None);
        assert_eq!(parse_pid_file("x y"), None);
    }

    #[test]
    fn uid_file_outside_the_range_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("uid");
        std::fs::write(&path, "0\n").expect("write");
        assert!(read_uid(&path).is_err());
        std::fs::write(&path, "200007\n").expect("write");
        assert_eq!(read_uid(&path).expect("read"), Some(200_007));
        assert_eq!(read_uid(&dir.path().join("none")).expect("read"), None);
    }

    #[test]
    fn prepare_root_lays_out_the_chroot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::new(dir.path(), &id());
        std::fs::create_dir(&paths.dir).expect("mkdir");
        let me = (Uid::current(), Gid::current());
        prepare_root(&paths, me, Accelerator::Kvm).expect("prepare");
        prepare_root(&paths, me, Accelerator::Tcg).expect("prepare again");

        for name in ["null", "zero", "urandom", "random"] {
            assert!(paths.root.join("dev").join(name).is_file());
        }
        assert!(!paths.root.join("dev/kvm").exists());
        assert!(paths.run.is_dir());
        assert!(paths.root.join("usr").is_dir());
        let lib = std::fs::read_link(paths.root.join("lib")).expect("symlink");
        assert_eq!(lib, Path::new("usr/lib"));
        assert_eq!(paths.in_run(qemu::QMP_SOCKET), paths.run.join("qmp.sock"));
    }
}
