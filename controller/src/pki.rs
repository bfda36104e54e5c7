//! The controller's own certificate authority.
//!
//! On first start the controller makes a CA and keeps its key in the data directory (mode 0600).
//! The CA signs the API server certificate (which the CLI pins through the CA) and the
//! certificates of the mutually authenticated controller ↔ agent channel. Leaf certificates carry
//! only the extended key usage they need, so a server certificate cannot act as a client.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// Paths of the PEM files under `<data>/pki`.
#[derive(Debug, Clone)]
pub struct Pki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub agent_cert: PathBuf,
    pub agent_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn paths(data_dir: &Path) -> Pki {
        let dir = data_dir.join("pki");
        Pki {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            agent_cert: dir.join("agent.pem"),
            agent_key: dir.join("agent.key"),
            client_cert: dir.join("controller-client.pem"),
            client_key: dir.join("controller-client.key"),
            dir,
        }
    }
}

/// Creates what is missing: the CA and the controller-client certificate once; the API server
/// and local agent certificates at every start (so changed names take effect).
pub fn ensure(
    data_dir: &Path,
    server_names: &[String],
    agent_names: &[String],
) -> anyhow::Result<Pki> {
    let pki = Pki::paths(data_dir);
    std::fs::create_dir_all(&pki.dir)?;
    std::fs::set_permissions(&pki.dir, std::fs::Permissions::from_mode(0o700))?;
    let ca_key_path = pki.dir.join("ca.key");

    if !pki.ca_cert.exists() || !ca_key_path.exists() {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        write_secret(&ca_key_path, &key.serialize_pem())?;
        write_public(&pki.ca_cert, &cert.pem())?;
    }
    let ca_key = KeyPair::from_pem(&read(&ca_key_path)?)?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(server_names.iter().cloned());
    issue(
        &issuer,
        "palisade-api",
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
        &pki.server_cert,
        &pki.server_key,
    )?;
    // The local agent's certificate names the address the controller reaches it at; it is
    // re-issued at every start (same CA), so a changed agent address takes effect.
    let mut names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(agent_names.iter().cloned());
    issue(
        &issuer,
        "palisade-agent",
        names,
        ExtendedKeyUsagePurpose::ServerAuth,
        &pki.agent_cert,
        &pki.agent_key,
    )?;
    if !pki.client_cert.exists() || !pki.client_key.exists() {
        issue(
            &issuer,
            "palisade-controller",
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
            &pki.client_cert,
            &pki.client_key,
        )?;
    }
    Ok(pki)
}

/// The CA's parameters are fixed, so the issuer can be rebuilt from them and the stored key.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Palisade platform CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(3650);
    params
}

fn issue(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    cert_path: &Path,
    key_path: &Path,
) -> anyhow::Result<()> {
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(365);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_secret(key_path, &key.serialize_pem())?;
    write_public(cert_path, &cert.pem())?;
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomic(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_atomic(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &str) -> anyhow::Result<()> {
    write_atomic(path, contents, 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_private_and_certs_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure(dir.path(), &["api.example".into()], &[]).unwrap();
        for key in [
            &pki.server_key,
            &pki.agent_key,
            &pki.client_key,
            &pki.dir.join("ca.key"),
        ] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        palisade_common::tls::server_config(&pki.server_cert, &pki.server_key, Some(&pki.ca_cert))
            .unwrap();
        palisade_common::tls::client_config(
            &pki.ca_cert,
            Some((&pki.client_cert, &pki.client_key)),
        )
        .unwrap();
        // A second start keeps the CA (the CLI pinned it).
        let ca = std::fs::read(&pki.ca_cert).unwrap();
        ensure(dir.path(), &[], &[]).unwrap();
        assert_eq!(ca, std::fs::read(&pki.ca_cert).unwrap());
    }
}
