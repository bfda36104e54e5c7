//! The platform master key, envelope encryption and keyed hashes for secrets at rest.
//!
//! The master key is 32 random bytes in a 0600 file (`--master-key`; by default beside the
//! database, in the data directory). A copy of the database alone opens no sealed value and
//! cannot test guesses against a keyed hash; an operator who keeps the key file on another
//! volume keeps it out of copies of the data directory as well. Each
//! sealed value gets its own random data key (XChaCha20-Poly1305), wrapped under a key derived
//! from the master key. Both layers bind the caller's purpose (e.g. `totp-seed:<user id>`) as
//! associated data, so a value copied to another row or column fails to open.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chacha20poly1305::aead::Aead;
use chacha20poly1305::aead::Payload;
use chacha20poly1305::{AeadInOut, KeyInit, XChaCha20Poly1305};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// The first field of every sealed value; a new format gets a new version, never a new meaning.
const SEALED_VERSION: &str = "v1";

/// Derivation labels. Each use of the master key gets its own subkey, so the raw master key
/// only ever keys HMAC-SHA256.
const WRAP_KEY_LABEL: &str = "palisade key-wrap v1";
const KEYED_HASH_LABEL: &str = "palisade keyed-hash v1:";

/// Associated-data labels, so the two layers of one sealed value cannot stand in for each other.
const WRAP_AAD_LABEL: &str = "palisade sealed v1 wrapped-key:";
const DATA_AAD_LABEL: &str = "palisade sealed v1 data:";

type HmacSha256 = Hmac<Sha256>;
type Key = Zeroizing<[u8; KEY_LEN]>;

/// The platform master key. Its bytes are wiped on drop and never printed.
#[derive(Clone)]
pub struct MasterKey {
    master: Key,
    /// Wraps the per-value data keys; derived from `master` with [`WRAP_KEY_LABEL`].
    wrap_key: Key,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl MasterKey {
    /// Loads the master key from `path`, or creates it there when no file exists.
    ///
    /// A file that group or others may access, or that is not exactly 32 bytes, is refused
    /// rather than repaired: either means something outside the controller touched it.
    pub fn load_or_create(path: &Path) -> anyhow::Result<MasterKey> {
        match File::open(path) {
            Ok(file) => Self::load(path, file),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(err) => {
                Err(err).with_context(|| format!("opening master key file {}", path.display()))
            }
        }
    }

    fn load(path: &Path, mut file: File) -> anyhow::Result<MasterKey> {
        // fstat on the open file, so the checks apply to the bytes we read.
        let metadata = file
            .metadata()
            .with_context(|| format!("reading metadata of master key file {}", path.display()))?;
        if !metadata.is_file() {
            bail!("master key file {} is not a regular file", path.display());
        }

        let mode = metadata.mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "master key file {} has mode {mode:o}, which gives group or others access; \
                 it must be readable by its owner only (chmod 600)",
                path.display()
            );
        }
        if metadata.len() != KEY_LEN as u64 {
            bail!(
                "master key file {} is {} bytes long, expected {KEY_LEN}",
                path.display(),
                metadata.len()
            );
        }

        let mut master = Zeroizing::new([0u8; KEY_LEN]);
        file.read_exact(&mut master[..])
            .with_context(|| format!("reading master key file {}", path.display()))?;
        Ok(Self::from_bytes(master))
    }

    /// Writes a fresh key to a 0600 side file, syncs it, then hard-links it into place. The
    /// link fails rather than replaces when `path` exists, and a crash at any point leaves
    /// either no key file or a complete one, never a torn one.
    fn create(path: &Path) -> anyhow::Result<MasterKey> {
        let file_name = path
            .file_name()
            .ok_or_else(|| anyhow!("master key path {} has no file name", path.display()))?;
        let mut staging_name = file_name.to_os_string();
        staging_name.push(".new");
        let staging = path.with_file_name(staging_name);

        let mut master = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(&mut master[..])
            .map_err(|err| anyhow!("reading the OS random source: {err}"))?;

        // A staging file left by a crash during an earlier first start was never linked into
        // place, so no sealed value depends on it.
        remove_if_present(&staging)?;
        write_new_private_file(&staging, &master[..])?;

        let linked = fs::hard_link(&staging, path);
        remove_if_present(&staging)?;
        match linked {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                // Another process created the key first; use theirs.
                let file = File::open(path)
                    .with_context(|| format!("opening master key file {}", path.display()))?;
                return Self::load(path, file);
            }
            Err(err) => {
                return Err(err).with_context(|| {
                    format!("linking master key file into place at {}", path.display())
                })
            }
        }

        sync_parent_dir(path)?;
        Ok(Self::from_bytes(master))
    }

    fn from_bytes(master: Key) -> MasterKey {
        let wrap_key = hmac_sha256(&master[..], &[WRAP_KEY_LABEL.as_bytes()]);
        MasterKey { master, wrap_key }
    }

    /// Encrypts `plaintext` for storage under a fresh data key, itself wrapped under the master
    /// key. `purpose` must be given again, identically, to open the result.
    ///
    /// The output is `v1.<wrap nonce>.<wrapped data key>.<nonce>.<ciphertext>`, each field
    /// base64url without padding.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> String {
        let data_key: Key = Zeroizing::new(random_bytes());
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let ciphertext = encrypt(&data_key, &nonce, &aad(DATA_AAD_LABEL, purpose), plaintext);

        let wrap_nonce: [u8; NONCE_LEN] = random_bytes();
        let wrap_aad = aad(WRAP_AAD_LABEL, purpose);
        let wrapped_key = encrypt(&self.wrap_key, &wrap_nonce, &wrap_aad, &data_key[..]);

        [
            SEALED_VERSION.to_owned(),
            URL_SAFE_NO_PAD.encode(wrap_nonce),
            URL_SAFE_NO_PAD.encode(wrapped_key),
            URL_SAFE_NO_PAD.encode(nonce),
            URL_SAFE_NO_PAD.encode(ciphertext),
        ]
        .join(".")
    }

    /// Decrypts a value made by [`MasterKey::seal`] with the same `purpose`.
    ///
    /// Fails on malformed input, on another master key, on another purpose and on any change
    /// to the sealed string.
    pub fn open(&self, purpose: &str, sealed: &str) -> anyhow::Result<Zeroizing<Vec<u8>>> {
        let parts = SealedParts::parse(sealed)?;

        let mut data_key = Zeroizing::new(parts.wrapped_key);
        decrypt(
            &self.wrap_key[..],
            &parts.wrap_nonce,
            &aad(WRAP_AAD_LABEL, purpose),
            &mut data_key,
        )
        .context("sealed value does not open under this master key and purpose")?;

        let mut plaintext = Zeroizing::new(parts.ciphertext);
        decrypt(
            &data_key[..],
            &parts.nonce,
            &aad(DATA_AAD_LABEL, purpose),
            &mut plaintext,
        )
        .context("sealed value's data does not open under its data key and purpose")?;
        Ok(plaintext)
    }

    /// HMAC-SHA256 of `data` under a subkey of the master key for `purpose`, as lower-case hex.
    ///
    /// For low-entropy secrets that are only ever compared (recovery codes): unlike a plain
    /// hash, a stolen database alone gives nothing to test guesses against.
    pub fn keyed_hash(&self, purpose: &str, data: &[u8]) -> String {
        let subkey = hmac_sha256(
            &self.master[..],
            &[KEYED_HASH_LABEL.as_bytes(), purpose.as_bytes()],
        );
        hex::encode(*hmac_sha256(&subkey[..], &[data]))
    }

    /// Whether `expected` is [`MasterKey::keyed_hash`] of `data` for `purpose`, compared in
    /// constant time.
    pub fn verify_keyed_hash(&self, purpose: &str, data: &[u8], expected: &str) -> bool {
        let actual = self.keyed_hash(purpose, data);
        actual.as_bytes().ct_eq(expected.as_bytes()).into()
    }
}

/// The decoded fields of a sealed string, with their lengths checked.
struct SealedParts {
    wrap_nonce: [u8; NONCE_LEN],
    wrapped_key: Vec<u8>,
    nonce: [u8; NONCE_LEN],
    ciphertext: Vec<u8>,
}

impl SealedParts {
    fn parse(sealed: &str) -> anyhow::Result<SealedParts> {
        let fields: Vec<&str> = sealed.split('.').collect();
        let [version, wrap_nonce, wrapped_key, nonce, ciphertext] = fields[..] else {
            bail!("sealed value is malformed: expected 5 dot-separated fields");
        };
        if version != SEALED_VERSION {
            bail!("sealed value has an unsupported version");
        }

        let wrapped_key = decode_field("wrapped key", wrapped_key)?;
        if wrapped_key.len() != KEY_LEN + TAG_LEN {
            bail!("sealed value is malformed: wrapped key has the wrong length");
        }
        let ciphertext = decode_field("ciphertext", ciphertext)?;
        if ciphertext.len() < TAG_LEN {
            bail!("sealed value is malformed: ciphertext is shorter than its tag");
        }

        Ok(SealedParts {
            wrap_nonce: decode_nonce("wrap nonce", wrap_nonce)?,
            wrapped_key,
            nonce: decode_nonce("nonce", nonce)?,
            ciphertext,
        })
    }
}

fn decode_field(name: &str, field: &str) -> anyhow::Result<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(field)
        .map_err(|_| anyhow!("sealed value is malformed: {name} is not base64url"))
}

fn decode_nonce(name: &str, field: &str) -> anyhow::Result<[u8; NONCE_LEN]> {
    decode_field(name, field)?
        .try_into()
        .map_err(|_| anyhow!("sealed value is malformed: {name} has the wrong length"))
}

/// The associated data of one layer: its label, then the caller's purpose.
fn aad(label: &str, purpose: &str) -> Vec<u8> {
    [label.as_bytes(), purpose.as_bytes()].concat()
}

fn encrypt(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], aad: &[u8], msg: &[u8]) -> Vec<u8> {
    // TODO(security): the cipher keeps a copy of the key that is not wiped on drop unless
    // chacha20poly1305's `zeroize` feature is enabled.
    XChaCha20Poly1305::new(key.into())
        .encrypt(nonce.into(), Payload { msg, aad })
        .expect("XChaCha20-Poly1305 encrypts any message shorter than 256 GiB")
}

/// Decrypts `buffer` in place, so the plaintext only ever lives in the caller's buffer.
fn decrypt(
    key: &[u8],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buffer: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let cipher = XChaCha20Poly1305::new_from_slice(key)
        .map_err(|_| anyhow!("decryption key has the wrong length"))?;
    cipher
        .decrypt_in_place(nonce.into(), aad, buffer)
        .map_err(|_| anyhow!("authentication failed"))
}

/// HMAC-SHA256 over the concatenation of `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Key {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts a key of any length");
    for part in parts {
        mac.update(part);
    }
    Zeroizing::new(mac.finalize().into_bytes().into())
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    bytes
}

/// Creates `path` with mode 0600, failing if it exists, and syncs `contents` to disk.
pub(crate) fn write_new_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", path.display())),
    }
}

/// Syncs the directory holding `path`, so the new directory entry survives a crash.
fn sync_parent_dir(path: &Path) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    File::open(&dir)
        .and_then(|dir_file| dir_file.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const PURPOSE: &str = "totp-seed:3f2a9c";

    fn key_in(dir: &tempfile::TempDir) -> MasterKey {
        MasterKey::load_or_create(&dir.path().join("master.key")).unwrap()
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn seal_then_open_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);

        for plaintext in [&b""[..], b"x", b"JBSWY3DPEHPK3PXP", &[0xffu8; 1000][..]] {
            let sealed = key.seal(PURPOSE, plaintext);
            assert_eq!(&key.open(PURPOSE, &sealed).unwrap()[..], plaintext);
        }
    }

    #[test]
    fn sealed_value_has_documented_shape() {
        let dir = tempfile::tempdir().unwrap();
        let sealed = key_in(&dir).seal(PURPOSE, b"secret");

        let fields: Vec<&str> = sealed.split('.').collect();
        assert_eq!(fields.len(), 5);
        assert_eq!(fields[0], "v1");
        assert!(sealed
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)));
    }

    #[test]
    fn open_with_another_purpose_fails() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);
        let sealed = key.seal("totp-seed:user-a", b"seed");

        assert!(key.open("totp-seed:user-b", &sealed).is_err());
        assert!(key.open("totp-seed:user-a ", &sealed).is_err());
        assert!(key.open("", &sealed).is_err());
    }

    #[test]
    fn open_with_another_master_key_fails() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sealed = key_in(&dir_a).seal(PURPOSE, b"seed");

        assert!(key_in(&dir_b).open(PURPOSE, &sealed).is_err());
    }

    #[test]
    fn changing_any_character_makes_open_fail() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);
        let sealed = key.seal(PURPOSE, b"a twenty byte secret");

        for (index, original) in sealed.char_indices() {
            let replacement = if original == 'A' { 'B' } else { 'A' };
            let mut tampered = sealed.clone();
            tampered.replace_range(index..index + 1, &replacement.to_string());
            assert!(
                key.open(PURPOSE, &tampered).is_err(),
                "changing character {index} still opened"
            );
        }
    }

    #[test]
    fn swapping_fields_between_sealed_values_fails() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);
        let first: Vec<String> = key
            .seal(PURPOSE, b"one")
            .split('.')
            .map(String::from)
            .collect();
        let second: Vec<String> = key
            .seal(PURPOSE, b"two")
            .split('.')
            .map(String::from)
            .collect();

        for field in 1..5 {
            let mut mixed = first.clone();
            mixed[field] = second[field].clone();
            assert!(
                key.open(PURPOSE, &mixed.join(".")).is_err(),
                "field {field}"
            );
        }
    }

    #[test]
    fn malformed_sealed_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);
        let good = key.seal(PURPOSE, b"seed");
        let truncated = &good[..good.len() - 4];
        let extra_field = format!("{good}.AAAA");
        let other_version = good.replacen("v1", "v2", 1);
        let padded = format!("{good}==");
        let inputs = [
            "",
            ".",
            "v1",
            "v1....",
            "v1.!.!.!.!",
            "v1.AAAA.AAAA.AAAA.AAAA",
            "v1.é.é.é.é",
            truncated,
            &extra_field,
            &other_version,
            &padded,
        ];

        for input in inputs {
            assert!(key.open(PURPOSE, input).is_err(), "{input:?} opened");
        }
    }

    #[test]
    fn two_seals_of_one_plaintext_differ() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);

        let first = key.seal(PURPOSE, b"same");
        let second = key.seal(PURPOSE, b"same");
        assert_ne!(first, second);
        for (a, b) in first.split('.').zip(second.split('.')).skip(1) {
            assert_ne!(a, b);
        }
    }

    #[test]
    fn sealed_value_never_contains_the_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);
        let plaintext = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP";

        let sealed = key.seal(PURPOSE, plaintext.as_bytes());
        assert!(!sealed.contains(plaintext));
        assert!(!sealed.contains(&URL_SAFE_NO_PAD.encode(plaintext)));
    }

    #[test]
    fn key_file_is_created_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");

        let created = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(mode_of(&path), 0o600);
        assert_eq!(fs::metadata(&path).unwrap().len(), 32);
        assert!(!dir.path().join("master.key.new").exists());

        let loaded = MasterKey::load_or_create(&path).unwrap();
        let sealed = created.seal(PURPOSE, b"seed");
        assert_eq!(&loaded.open(PURPOSE, &sealed).unwrap()[..], b"seed");
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        MasterKey::load_or_create(&path).unwrap();

        for mode in [0o644, 0o640, 0o604, 0o620] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = MasterKey::load_or_create(&path).unwrap_err();
            assert!(
                err.to_string().contains("group or others"),
                "mode {mode:o}: {err}"
            );
        }
    }

    #[test]
    fn key_file_of_wrong_length_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");

        for len in [0, 31, 33] {
            let _ = fs::remove_file(&path);
            write_new_private_file(&path, &vec![7u8; len]).unwrap();
            let err = MasterKey::load_or_create(&path).unwrap_err();
            assert!(err.to_string().contains("expected 32"), "{len}: {err}");
        }
    }

    #[test]
    fn stale_staging_file_does_not_block_creation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        write_new_private_file(&dir.path().join("master.key.new"), b"torn").unwrap();

        MasterKey::load_or_create(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 32);
        assert!(!dir.path().join("master.key.new").exists());
    }

    #[test]
    fn debug_output_hides_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);

        let printed = format!("{key:?}");
        assert!(!printed.contains(&hex::encode(&key.master[..])));
        assert!(!printed.contains(&format!("{:?}", &key.master[..4])));
    }

    #[test]
    fn keyed_hash_depends_on_data_purpose_and_key() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (key, other_key) = (key_in(&dir_a), key_in(&dir_b));

        let hash = key.keyed_hash("recovery-code:u1", b"abcde-fghjk");
        assert_eq!(hash.len(), 64);
        assert!(hash
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(hash, key.keyed_hash("recovery-code:u1", b"abcde-fghjk"));
        assert_ne!(hash, key.keyed_hash("recovery-code:u2", b"abcde-fghjk"));
        assert_ne!(hash, key.keyed_hash("recovery-code:u1", b"abcde-fghjm"));
        assert_ne!(
            hash,
            other_key.keyed_hash("recovery-code:u1", b"abcde-fghjk")
        );
    }

    #[test]
    fn verify_keyed_hash_accepts_only_the_matching_hash() {
        let dir = tempfile::tempdir().unwrap();
        let key = key_in(&dir);
        let hash = key.keyed_hash("recovery-code:u1", b"abcde-fghjk");

        assert!(key.verify_keyed_hash("recovery-code:u1", b"abcde-fghjk", &hash));
        assert!(!key.verify_keyed_hash("recovery-code:u1", b"abcde-fghjm", &hash));
        assert!(!key.verify_keyed_hash("recovery-code:u2", b"abcde-fghjk", &hash));
        assert!(!key.verify_keyed_hash("recovery-code:u1", b"abcde-fghjk", &hash[..63]));
        assert!(!key.verify_keyed_hash("recovery-code:u1", b"abcde-fghjk", ""));
        let upper = hash.to_uppercase();
        assert!(!key.verify_keyed_hash("recovery-code:u1", b"abcde-fghjk", &upper));
    }
}
