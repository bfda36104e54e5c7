//! CLI profiles: where an API lives, which CA to pin, which user and key to sign with.
//!
//! Stored as JSON in `$PALISADE_CONFIG` (default `~/.config/palisade/config.json`); private keys
//! live beside it in `keys/<profile>.key`, mode 0600, never anywhere else.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub endpoint: String,
    /// PEM file of the platform CA: the only certificate authority this profile trusts.
    pub ca: PathBuf,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

pub fn config_path(explicit: Option<&Path>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".config/palisade/config.json")
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        write_private(path, &serde_json::to_vec_pretty(self)?)
    }

    pub fn profile(&self, name: &str) -> anyhow::Result<&Profile> {
        self.profiles
            .get(name)
            .with_context(|| format!("no profile named {name:?} (see `palisade profile set`)"))
    }
}

fn key_path(config_path: &Path, profile: &str) -> PathBuf {
    config_path
        .parent()
        .unwrap_or(Path::new("."))
        .join("keys")
        .join(format!("{profile}.key"))
}

pub fn save_key(config_path: &Path, profile: &str, key: &SigningKey) -> anyhow::Result<()> {
    let path = key_path(config_path, profile);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    write_private(&path, B64.encode(key.to_bytes()).as_bytes())
}

pub fn load_key(config_path: &Path, profile: &str) -> anyhow::Result<SigningKey> {
    let path = key_path(config_path, profile);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the key of profile {profile:?} ({})",
            path.display()
        )
    })?;
    let bytes: [u8; 32] = B64
        .decode(text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{} is not a Palisade key file", path.display()))?;
    Ok(SigningKey::from_bytes(&bytes))
}

pub fn new_key() -> SigningKey {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).expect("the OS random source is available");
    SigningKey::from_bytes(&seed)
}

/// Writes a file readable by its owner only, through a rename so it is never half-written.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
