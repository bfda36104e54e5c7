//! The public HTTPS API's request and response bodies.
//!
//! Requests reject unknown fields, so a typo is a 400, never a silently ignored setting.

use serde::{Deserialize, Serialize};

/// Largest request body the API accepts; more gets 413.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

// ---- identity ----

/// `POST /v1/auth/password`: the one call a password alone may make.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordChange {
    pub user: String,
    pub current_password: String,
    pub new_password: String,
}

/// `POST /v1/auth/keys`: registers a client-made Ed25519 public key, proven by the password.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyCreate {
    pub user: String,
    pub password: String,
    /// Base64 of the 32-byte Ed25519 public key.
    pub public_key: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub public_key: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub instances: u32,
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            instances: 10,
            vcpus: 16,
            memory_mib: 16 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantCreate {
    pub name: String,
    #[serde(default)]
    pub quota: Option<Quota>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub quota: Quota,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    pub name: String,
    pub tenant_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub id: String,
    pub name: String,
    /// `None` for platform accounts.
    pub tenant_id: Option<String>,
    /// `platform_admin` or `tenant_member`.
    pub role: String,
    pub created_at: String,
}

/// Answer to user creation: the random initial password is shown here once and never again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCreated {
    pub user: User,
    pub initial_password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Whoami {
    pub user: User,
    pub key_id: String,
}

// ---- compute ----

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub public: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Flavor {
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
}

/// The flavors every tenant may choose from.
pub fn flavors() -> Vec<Flavor> {
    let f = |name: &str, vcpus, memory_mib, disk_gib| Flavor {
        name: name.to_string(),
        vcpus,
        memory_mib,
        disk_gib,
    };
    vec![
        f("tiny", 1, 128, 1),
        f("small", 1, 256, 2),
        f("medium", 2, 512, 4),
    ]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceCreate {
    pub name: String,
    /// Image id or name.
    pub image: String,
    pub flavor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub image_id: String,
    pub flavor: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    /// `starting`, `running`, `stopping`, `stopped`, `deleting`, `deleted` or `error`.
    pub state: String,
    pub last_error: Option<String>,
    pub created_at: String,
    pub deleted_at: Option<String>,
    /// When the writable disk was overwritten, synced and unlinked.
    pub disk_erased_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConsoleOutput {
    pub offset: u64,
    pub next_offset: u64,
    pub data: String,
}

pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}
