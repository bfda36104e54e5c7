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
    /// The second factor, required once the account has one enrolled.
    #[serde(default)]
    pub totp_code: Option<String>,
    #[serde(default)]
    pub recovery_code: Option<String>,
    /// A security key's answer to a WebAuthn challenge (`POST /v1/auth/mfa/webauthn/challenge`).
    #[serde(default)]
    pub webauthn: Option<WebauthnAssertion>,
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
    /// The second factor, required when the account is bound to MFA.
    #[serde(default)]
    pub totp_code: Option<String>,
    #[serde(default)]
    pub recovery_code: Option<String>,
    /// A security key's answer to a WebAuthn challenge (`POST /v1/auth/mfa/webauthn/challenge`).
    #[serde(default)]
    pub webauthn: Option<WebauthnAssertion>,
    /// Days until the key expires (default and maximum set by the platform).
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

/// `POST /v1/auth/login`: a human login (password and, when bound, a second factor) that
/// registers a short-lived session key made on the client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    pub user: String,
    pub password: String,
    pub public_key: String,
    #[serde(default)]
    pub totp_code: Option<String>,
    #[serde(default)]
    pub recovery_code: Option<String>,
    /// A security key's answer to a WebAuthn challenge (`POST /v1/auth/mfa/webauthn/challenge`).
    #[serde(default)]
    pub webauthn: Option<WebauthnAssertion>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub id: String,
    pub user_id: String,
    pub name: String,
    pub public_key: String,
    pub created_at: String,
    /// `api` (long-lived, expires) or `session` (short-lived, idle timeout).
    pub kind: String,
    /// RFC 3339; `None` only for keys made before expiry existed.
    pub expires_at: Option<String>,
    /// Sessions end after this long without a request.
    pub idle_timeout_secs: Option<u64>,
}

/// `POST /v1/keys/{id}/rotate`: a new key replaces one of the caller's; the old one keeps
/// working for `overlap_secs` (default 0: it stops now).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotate {
    pub public_key: String,
    #[serde(default)]
    pub overlap_secs: u32,
}

/// `POST /v1/auth/mfa/totp`: starts TOTP enrolment (password-authenticated).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TotpEnrol {
    pub user: String,
    pub password: String,
}

/// The new TOTP secret, shown once: base32 and as an `otpauth://` URI for authenticator apps.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TotpEnrolment {
    pub secret: String,
    pub otpauth_uri: String,
}

/// `POST /v1/auth/mfa/totp/confirm`: the first code proves the authenticator holds the secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TotpConfirm {
    pub user: String,
    pub password: String,
    pub code: String,
}

/// One-time recovery codes, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryCodes {
    pub recovery_codes: Vec<String>,
}

/// `POST /v1/auth/mfa/verify` (signed): a fresh second-factor proof for the signing key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MfaVerify {
    #[serde(default)]
    pub totp_code: Option<String>,
    #[serde(default)]
    pub recovery_code: Option<String>,
    /// A security key's answer to a WebAuthn challenge (`POST /v1/auth/mfa/webauthn/challenge`).
    #[serde(default)]
    pub webauthn: Option<WebauthnAssertion>,
}

/// `POST /v1/auth/mfa/webauthn/challenge`: a WebAuthn challenge for the account's security
/// keys (password-authenticated: the challenge names the account's credentials).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebauthnChallengeRequest {
    pub user: String,
    pub password: String,
}

/// A WebAuthn ceremony under way: `options` go to the authenticator as they are (a
/// `CredentialCreationOptions` or `CredentialRequestOptions` in the WebAuthn JSON form), and
/// the answer comes back with `ceremony_id`, once, within five minutes. `origin` is the origin
/// the platform expects in the authenticator's client data.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebauthnChallenge {
    pub ceremony_id: String,
    pub origin: String,
    pub options: serde_json::Value,
}

/// A security key's answer to a WebAuthn authentication challenge: the second factor of a
/// login, key, password change or `mfa verify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebauthnAssertion {
    pub ceremony_id: String,
    /// The `PublicKeyCredential` the authenticator returned, in the WebAuthn JSON form.
    pub credential: serde_json::Value,
}

/// `POST /v1/mfa/webauthn/confirm` (signed): the authenticator's answer to the registration
/// started by `POST /v1/mfa/webauthn`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebauthnConfirm {
    pub ceremony_id: String,
    /// The `RegisterPublicKeyCredential` the authenticator returned.
    pub credential: serde_json::Value,
    /// A name to tell the account's security keys apart (default `security-key`).
    #[serde(default)]
    pub name: Option<String>,
}

/// A registered security key. When it is the account's first second factor, `recovery_codes`
/// are new one-time codes, shown once, and the account's earlier keys and sessions have ended
/// (they proved no second factor); otherwise `recovery_codes` is empty.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebauthnRegistered {
    pub id: String,
    pub name: String,
    pub recovery_codes: Vec<String>,
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

/// A tenant's tightening of the platform's identity rules; it can only make them stricter.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Every user of the tenant must use a second factor.
    #[serde(default)]
    pub require_mfa: bool,
    /// 0 = the platform's minimum.
    #[serde(default)]
    pub password_min_length: u32,
    /// 0 = the platform's maximum age.
    #[serde(default)]
    pub password_max_age_days: u32,
    /// Days the tenant's audit records are kept before only their hashes remain; at least the
    /// platform's minimum. 0 = the platform's minimum.
    #[serde(default)]
    pub audit_retention_days: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub quota: Quota,
    pub settings: TenantSettings,
    pub disabled: bool,
    pub created_at: String,
}

/// Platform roles (accounts without a tenant) and tenant roles.
pub const PLATFORM_ROLES: &[&str] = &["platform_admin", "security_admin", "auditor", "operator"];
pub const TENANT_ROLES: &[&str] = &["tenant_admin", "member", "reader"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    pub name: String,
    /// The tenant; omitted for a platform account.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Default `member` in a tenant; required for a platform account.
    #[serde(default)]
    pub role: Option<String>,
}

/// `PUT /v1/users/{id}/role`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSet {
    pub role: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub id: String,
    pub name: String,
    /// `None` for platform accounts.
    pub tenant_id: Option<String>,
    /// One of [`PLATFORM_ROLES`] or [`TENANT_ROLES`].
    pub role: String,
    pub disabled: bool,
    pub mfa_enrolled: bool,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupCreate {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// User ids.
    pub members: Vec<String>,
    pub created_at: String,
}

/// A tenant's Cedar policies, as one text.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policies {
    pub text: String,
}

/// `PUT /v1/tenants/{id}/webhook`: where identity alerts are posted (`None` removes it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSet {
    pub url: Option<String>,
}

/// The webhook and, once (when set), the secret its calls are signed with:
/// `x-palisade-signature: sha256=<hex HMAC-SHA256 of the body>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: Option<String>,
    pub secret: Option<String>,
}

/// `PUT /v1/tenants/{id}/oidc`: the tenant's own OpenID Connect provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Issuer URL; discovery (`/.well-known/openid-configuration`) must answer for it.
    pub issuer: String,
    pub client_id: String,
    /// For a confidential client; omitted for a public one (PKCE alone).
    #[serde(default)]
    pub client_secret: Option<String>,
    /// The ID-token claim listing the user's groups at the provider.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Provider group → tenant role; the highest matching role wins.
    #[serde(default)]
    pub role_map: std::collections::BTreeMap<String, String>,
    /// The role of a user no mapping matches.
    #[serde(default = "default_federated_role")]
    pub default_role: String,
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_federated_role() -> String {
    "reader".into()
}

/// `POST /v1/auth/oidc/start` (unsigned): begins a federated login for a CLI that listens on
/// a loopback `redirect_uri` and made the key pair whose public half is given.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcStart {
    /// The tenant's name.
    pub tenant: String,
    pub redirect_uri: String,
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcStarted {
    pub login_id: String,
    /// Open in a browser.
    pub authorization_url: String,
}

/// `POST /v1/auth/oidc/finish` (unsigned): the code and state the provider sent to the
/// loopback redirect; answers with the new session key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcFinish {
    pub login_id: String,
    pub code: String,
    pub state: String,
}

/// An identity anomaly: a burst of failed logins, a new source address, ...
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    pub id: String,
    pub tenant_id: Option<String>,
    pub user_id: Option<String>,
    pub kind: String,
    pub detail: String,
    pub source: String,
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
    /// The ceiling of the instance's bandwidth, each way, in Mbit/s.
    pub bandwidth_mbps: u32,
}

/// The flavors every tenant may choose from.
pub fn flavors() -> Vec<Flavor> {
    let f = |name: &str, vcpus, memory_mib, disk_gib, bandwidth_mbps| Flavor {
        name: name.to_string(),
        vcpus,
        memory_mib,
        disk_gib,
        bandwidth_mbps,
    };
    vec![
        f("tiny", 1, 128, 1, 100),
        f("small", 1, 256, 2, 200),
        f("medium", 2, 512, 4, 500),
    ]
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceCreate {
    pub name: String,
    /// Image id or name.
    pub image: String,
    pub flavor: String,
    /// Labels that tenant policies can match (`resource.getTag("env")`).
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// The subnet (id) of the instance's port; none: the instance has no network.
    #[serde(default)]
    pub subnet: Option<String>,
    /// Security groups (ids) of the port; none: nothing in or out.
    #[serde(default)]
    pub security_groups: Vec<String>,
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
    pub tags: std::collections::BTreeMap<String, String>,
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

/// Characters that change how the text around them is shown without showing themselves:
/// bidirectional overrides and isolates, zero-width characters, invisible operators, the byte
/// order mark, interlinear annotations, tag characters, and the line and paragraph separators.
/// Text that people read in a table must not carry them (it could show one thing and say
/// another).
pub fn is_invisible_format_char(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}' | '\u{E0000}'..='\u{E0FFF}')
}

/// A tag value people can read as it is: letters and digits of any script, spaces and
/// `_ . : / = + - @` (as large clouds allow), at most 128 characters. Everything else is
/// refused — control and format characters, combining marks and selectors, symbols, and the
/// letters that show as blank (Hangul fillers) — so that two values that look the same are
/// the same.
pub fn is_valid_tag_value(value: &str) -> bool {
    value.chars().count() <= 128
        && value.chars().all(|c| {
            (c.is_alphanumeric() && !is_invisible_format_char(c)) || " _.:/=+-@".contains(c)
        })
}

pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::is_valid_tag_value;

    #[test]
    fn tag_values_are_readable_as_they_are() {
        for ok in ["prod", "team-α", "東京", "a b", "x@y.z/1:2=3+4_5", ""] {
            assert!(is_valid_tag_value(ok), "{ok:?}");
        }
        let hidden = [
            '\u{202E}',
            '\u{200B}',
            '\u{2066}',
            '\u{FEFF}',
            '\u{E0041}',
            '\u{061C}',
            '\u{1D173}',
            '\u{0600}',
            '\u{06DD}',
            '\u{070F}',
            '\u{3164}',
            '\u{115F}',
            '\u{FE0F}',
            '\u{E0100}',
            '\u{034F}',
            '\u{2800}',
            '\u{17B4}',
            '\u{FFA0}',
            '\u{0301}',
            '\u{1B}',
            '\n',
        ];
        for c in hidden {
            assert!(!is_valid_tag_value(&format!("a{c}b")), "U+{:04X}", c as u32);
        }
        assert!(!is_valid_tag_value(&"a".repeat(129)));
    }
}

/// One audit record (its stored line) and the proof that it is in the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditInclusion {
    pub record: String,
    pub proof: crate::audit::InclusionProof,
}

/// A page of audit records, oldest first, and the cursor (`after`) for the next page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditRecords {
    pub records: Vec<crate::audit::AuditRecord>,
    pub next: Option<u64>,
}

/// `GET /v1/audit/retention`: how long records are kept, and the legal holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditRetention {
    /// The platform's minimum, for records of no tenant and tenants without a longer rule.
    pub minimum_secs: u64,
    /// Tenants with a longer retention (a tenant administrator sees its own tenant only).
    pub tenants: Vec<TenantRetention>,
    pub holds: Vec<AuditHold>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TenantRetention {
    pub tenant_id: String,
    pub days: u32,
}

/// A legal hold: no record it covers is purged while it stands.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditHold {
    /// A tenant's id, or `platform` for the whole log.
    pub scope: String,
    pub reason: String,
    pub set_by: String,
    pub set_at: String,
}

/// `PUT /v1/audit/holds/{id}` (a tenant id, or `platform`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditHoldSet {
    pub reason: String,
}

/// What `POST /v1/audit/purge` did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditPurge {
    /// Records reduced to their hashes.
    pub records: u64,
    /// The purge records written (one per tenant, one for the platform's records).
    pub purge_records: Vec<u64>,
}

/// A page of the OCSF pull stream: events after the cursor given, and the cursor to give next.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OcsfPage {
    pub events: Vec<serde_json::Value>,
    pub cursor: u64,
    /// How many records the log held when this page was read: a reader that wants what is
    /// there now (not what its own reads add) stops once its cursor reaches it.
    pub end: u64,
}

// ---- tenant networks ------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcCreate {
    pub name: String,
    /// A private IPv4 block, /16 to /28 (`10.0.0.0/16`).
    pub cidr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vpc {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub cidr: String,
    pub vni: u32,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubnetCreate {
    pub name: String,
    /// Inside the VPC's block, /16 to /29, overlapping no other subnet of it.
    pub cidr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Subnet {
    pub id: String,
    pub tenant_id: String,
    pub vpc_id: String,
    pub name: String,
    pub cidr: String,
    /// The router's address in the subnet (its first).
    pub gateway: String,
    /// The network ACL, in order; empty: none.
    pub acl: Vec<AclRule>,
    pub created_at: String,
}

/// One rule of a subnet's network ACL: stateless, first match wins, and what no rule of a
/// non-empty ACL allows is denied.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// `ingress` (into the subnet) or `egress` (out of it).
    pub direction: String,
    /// `allow` or `deny`.
    pub action: String,
    /// `any`, `tcp`, `udp` or `icmp`.
    pub protocol: String,
    /// Destination ports (tcp and udp only); none: all.
    #[serde(default)]
    pub port_from: Option<u32>,
    #[serde(default)]
    pub port_to: Option<u32>,
    /// The far end: where ingress traffic comes from, where egress traffic goes.
    pub cidr: String,
}

/// `PUT /v1/subnets/{id}/acl`: the whole ACL, replaced at once.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclSet {
    pub rules: Vec<AclRule>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupCreate {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroup {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub description: String,
    pub rules: Vec<SecurityGroupRule>,
    pub created_at: String,
}

/// A stateful rule: traffic it allows is allowed, and so are the replies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupRuleCreate {
    /// `ingress` (to the group's ports) or `egress` (from them).
    pub direction: String,
    /// `any`, `tcp`, `udp` or `icmp`.
    pub protocol: String,
    /// Ports (tcp and udp only, 1-65535); none: all.
    #[serde(default)]
    pub port_from: Option<u32>,
    #[serde(default)]
    pub port_to: Option<u32>,
    /// The far end, as a prefix…
    #[serde(default)]
    pub cidr: Option<String>,
    /// …or as the ports of one of the tenant's security groups (its id).
    #[serde(default)]
    pub remote_group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupRule {
    pub id: String,
    pub group_id: String,
    pub direction: String,
    pub protocol: String,
    pub port_from: Option<u32>,
    pub port_to: Option<u32>,
    pub cidr: Option<String>,
    pub remote_group: Option<String>,
    pub created_at: String,
}

/// An instance's network port.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Port {
    pub id: String,
    pub tenant_id: String,
    pub instance_id: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub mac: String,
    pub ip: String,
    pub security_groups: Vec<String>,
    /// Bandwidth limits in kbit/s, within the flavor's ceiling.
    pub ingress_kbit: u32,
    pub egress_kbit: u32,
    pub created_at: String,
}

/// `PATCH /v1/ports/{id}`: what is given is changed.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PortUpdate {
    #[serde(default)]
    pub security_groups: Option<Vec<String>>,
    #[serde(default)]
    pub ingress_kbit: Option<u32>,
    #[serde(default)]
    pub egress_kbit: Option<u32>,
}
