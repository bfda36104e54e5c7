//! Request signing in the manner of RFC 9421 (HTTP Message Signatures) with Ed25519 keys.
//!
//! Every API request carries three headers:
//!
//! ```text
//! Content-Digest:  sha-256=:<base64 of SHA-256(body)>:            (RFC 9530)
//! Signature-Input: sig1=("@method" "@path" "@query" "content-digest");created=<unix>;\
//!                  nonce="<random>";keyid="<key id>";alg="ed25519"
//! Signature:       sig1=:<base64 Ed25519 signature over the signature base>:
//! ```
//!
//! The signature base is built as RFC 9421 §2.5 describes. The server knows only the public key,
//! so nothing it stores lets anyone sign. It refuses a creation time more than
//! [`SIGNATURE_WINDOW_SECS`] from its clock and a nonce it has seen within that window, which
//! together make every signed request usable once.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// How far a request's creation time may be from the server clock, either way.
pub const SIGNATURE_WINDOW_SECS: i64 = 60;

/// The components every request must cover, in this order.
pub const COVERED_COMPONENTS: [&str; 4] = ["@method", "@path", "@query", "content-digest"];

pub const HEADER_CONTENT_DIGEST: &str = "content-digest";
pub const HEADER_SIGNATURE_INPUT: &str = "signature-input";
pub const HEADER_SIGNATURE: &str = "signature";

const LABEL: &str = "sig1";
const ALG: &str = "ed25519";

/// Why a signature was refused; each maps to one stable API error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("request is not signed")]
    Missing,
    #[error("signature headers are malformed: {0}")]
    Malformed(&'static str),
    #[error("body does not match its content digest")]
    DigestMismatch,
    #[error("signature does not verify")]
    Invalid,
}

impl SignatureError {
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed(_) => "signature_malformed",
            SignatureError::DigestMismatch => "digest_mismatch",
            SignatureError::Invalid => "signature_invalid",
        }
    }
}

/// The parameters of a parsed `Signature-Input`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureParams {
    pub created: i64,
    pub nonce: String,
    pub keyid: String,
}

/// The parts of an HTTP request a signature covers.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub method: &'a str,
    /// Percent-encoded path, as sent.
    pub path: &'a str,
    /// Raw query without its `?` (empty when there is none).
    pub query: &'a str,
    pub body: &'a [u8],
}

/// The three header values a client attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedHeaders {
    pub content_digest: String,
    pub signature_input: String,
    pub signature: String,
}

/// `sha-256=:<base64>:` of the body.
pub fn content_digest(body: &[u8]) -> String {
    format!("sha-256=:{}:", B64.encode(Sha256::digest(body)))
}

/// The serialized inner list and parameters, as they appear after `sig1=`.
pub fn signature_params_value(params: &SignatureParams) -> String {
    let components: Vec<String> = COVERED_COMPONENTS
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect();
    format!(
        "({});created={};nonce=\"{}\";keyid=\"{}\";alg=\"{ALG}\"",
        components.join(" "),
        params.created,
        params.nonce,
        params.keyid
    )
}

/// The signature base of RFC 9421 §2.5 for our fixed set of components.
/// `query` is the raw query string without its `?` (empty when there is none).
pub fn signature_base(
    method: &str,
    path: &str,
    query: &str,
    content_digest: &str,
    params: &SignatureParams,
) -> String {
    format!(
        "\"@method\": {}\n\"@path\": {}\n\"@query\": ?{}\n\"content-digest\": {}\n\
         \"@signature-params\": {}",
        method.to_ascii_uppercase(),
        path,
        query,
        content_digest,
        signature_params_value(params)
    )
}

/// A fresh nonce: 16 random bytes, base64url without padding.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Signs one request with the given parameters (key id, creation time, nonce).
pub fn sign(key: &SigningKey, params: &SignatureParams, message: &Message<'_>) -> SignedHeaders {
    let digest = content_digest(message.body);
    let base = signature_base(message.method, message.path, message.query, &digest, params);
    let signature = key.sign(base.as_bytes());
    SignedHeaders {
        content_digest: digest,
        signature_input: format!("{LABEL}={}", signature_params_value(params)),
        signature: format!("{LABEL}=:{}:", B64.encode(signature.to_bytes())),
    }
}

/// Parses `Signature-Input`. Only our exact profile is accepted: label `sig1`, exactly the
/// covered components in order, and `created`, `nonce`, `keyid`, `alg="ed25519"` once each.
pub fn parse_signature_input(value: &str) -> Result<SignatureParams, SignatureError> {
    let rest = value
        .strip_prefix(LABEL)
        .and_then(|r| r.strip_prefix('='))
        .ok_or(SignatureError::Malformed("unknown signature label"))?;
    let close = rest
        .find(')')
        .ok_or(SignatureError::Malformed("no component list"))?;
    let list = rest[..=close]
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or(SignatureError::Malformed("no component list"))?;
    let components: Vec<&str> = list.split(' ').filter(|c| !c.is_empty()).collect();
    let expected: Vec<String> = COVERED_COMPONENTS
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect();
    if components != expected {
        return Err(SignatureError::Malformed(
            "covered components must be @method @path @query content-digest",
        ));
    }
    let (mut created, mut nonce, mut keyid, mut alg) = (None, None, None, None);
    for param in rest[close + 1..].split(';').skip(1) {
        let (name, raw) = param
            .split_once('=')
            .ok_or(SignatureError::Malformed("parameter without value"))?;
        let slot = match name {
            "created" => &mut created,
            "nonce" => &mut nonce,
            "keyid" => &mut keyid,
            "alg" => &mut alg,
            _ => return Err(SignatureError::Malformed("unknown signature parameter")),
        };
        if slot.replace(raw).is_some() {
            return Err(SignatureError::Malformed("repeated signature parameter"));
        }
    }
    if rest[close + 1..].split(';').next() != Some("") {
        return Err(SignatureError::Malformed("text after the component list"));
    }
    let created = created
        .and_then(|c| c.parse::<i64>().ok())
        .ok_or(SignatureError::Malformed("created must be an integer"))?;
    let nonce = unquote(nonce).ok_or(SignatureError::Malformed("nonce must be a string"))?;
    let keyid = unquote(keyid).ok_or(SignatureError::Malformed("keyid must be a string"))?;
    if unquote(alg).as_deref() != Some(ALG) {
        return Err(SignatureError::Malformed("alg must be \"ed25519\""));
    }
    if !(16..=64).contains(&nonce.len()) || !nonce.bytes().all(is_token_byte) {
        return Err(SignatureError::Malformed(
            "nonce must be 16 to 64 URL-safe characters",
        ));
    }
    if keyid.is_empty() || keyid.len() > 64 || !keyid.bytes().all(is_token_byte) {
        return Err(SignatureError::Malformed("keyid is not a key id"));
    }
    Ok(SignatureParams {
        created,
        nonce,
        keyid,
    })
}

/// Parses `Signature: sig1=:<base64>:` into the 64 signature bytes.
pub fn parse_signature(value: &str) -> Result<Signature, SignatureError> {
    let encoded = value
        .strip_prefix(LABEL)
        .and_then(|r| r.strip_prefix("=:"))
        .and_then(|r| r.strip_suffix(':'))
        .ok_or(SignatureError::Malformed(
            "signature must be sig1=:<base64>:",
        ))?;
    let bytes = B64
        .decode(encoded)
        .map_err(|_| SignatureError::Malformed("signature is not base64"))?;
    let bytes: [u8; 64] = bytes
        .try_into()
        .map_err(|_| SignatureError::Malformed("signature must be 64 bytes"))?;
    Ok(Signature::from_bytes(&bytes))
}

/// Checks the body against `Content-Digest` and the signature against the key. The caller
/// checks the time window and the nonce, which need the server's clock and memory.
pub fn verify(
    key: &VerifyingKey,
    message: &Message<'_>,
    content_digest_header: &str,
    params: &SignatureParams,
    signature: &Signature,
) -> Result<(), SignatureError> {
    let expected = content_digest(message.body);
    // Not secret: a digest of what the client sent. A plain comparison is fine.
    if content_digest_header != expected {
        return Err(SignatureError::DigestMismatch);
    }
    let base = signature_base(
        message.method,
        message.path,
        message.query,
        content_digest_header,
        params,
    );
    key.verify_strict(base.as_bytes(), signature)
        .map_err(|_| SignatureError::Invalid)
}

/// Public keys travel as base64 of their 32 bytes.
pub fn parse_public_key(encoded: &str) -> Option<VerifyingKey> {
    let bytes: [u8; 32] = B64.decode(encoded.trim()).ok()?.try_into().ok()?;
    VerifyingKey::from_bytes(&bytes).ok()
}

pub fn encode_public_key(key: &VerifyingKey) -> String {
    B64.encode(key.to_bytes())
}

fn unquote(raw: Option<&str>) -> Option<String> {
    let inner = raw?.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('"') && !inner.contains('\\')).then(|| inner.to_string())
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    fn msg<'a>(method: &'a str, path: &'a str, query: &'a str, body: &'a [u8]) -> Message<'a> {
        Message {
            method,
            path,
            query,
            body,
        }
    }

    fn signed(body: &[u8]) -> (SignedHeaders, SignatureParams, Signature) {
        let params = SignatureParams {
            created: 1_700_000_000,
            nonce: "AAAAAAAAAAAAAAAAAAAAAA".into(),
            keyid: "key-1".into(),
        };
        let headers = sign(&key(), &params, &msg("POST", "/v1/x", "a=1", body));
        let params = parse_signature_input(&headers.signature_input).unwrap();
        let sig = parse_signature(&headers.signature).unwrap();
        (headers, params, sig)
    }

    #[test]
    fn round_trip_verifies() {
        let (h, p, s) = signed(b"{}");
        assert_eq!(p.keyid, "key-1");
        assert_eq!(p.created, 1_700_000_000);
        let vk = key().verifying_key();
        verify(
            &vk,
            &msg("POST", "/v1/x", "a=1", b"{}"),
            &h.content_digest,
            &p,
            &s,
        )
        .unwrap();
    }

    #[test]
    fn every_covered_component_matters() {
        let (h, p, s) = signed(b"{}");
        let vk = key().verifying_key();
        let bad = [
            verify(
                &vk,
                &msg("GET", "/v1/x", "a=1", b"{}"),
                &h.content_digest,
                &p,
                &s,
            ),
            verify(
                &vk,
                &msg("POST", "/v1/y", "a=1", b"{}"),
                &h.content_digest,
                &p,
                &s,
            ),
            verify(
                &vk,
                &msg("POST", "/v1/x", "a=2", b"{}"),
                &h.content_digest,
                &p,
                &s,
            ),
        ];
        for result in bad {
            assert_eq!(result, Err(SignatureError::Invalid));
        }
        let altered = verify(
            &vk,
            &msg("POST", "/v1/x", "a=1", b"{ }"),
            &h.content_digest,
            &p,
            &s,
        );
        assert_eq!(altered, Err(SignatureError::DigestMismatch));
        let mut later = p.clone();
        later.created += 1;
        let moved = verify(
            &vk,
            &msg("POST", "/v1/x", "a=1", b"{}"),
            &h.content_digest,
            &later,
            &s,
        );
        assert_eq!(moved, Err(SignatureError::Invalid));
    }

    #[test]
    fn malformed_inputs_are_refused() {
        let good = signed(b"").0.signature_input;
        let cases = [
            String::new(),
            good.replace("sig1", "sig2"),
            good.replace(" \"content-digest\"", ""),
            good.replace("created=1700000000", "created=soon"),
            good.replace("alg=\"ed25519\"", "alg=\"hmac-sha256\""),
            format!("{good};nonce=\"BBBBBBBBBBBBBBBBBBBBBB\""),
            good.replace("nonce=\"AAAAAAAAAAAAAAAAAAAAAA\"", "nonce=\"short\""),
            good.replace("keyid=\"key-1\"", "keyid=\"../etc\""),
        ];
        for case in cases {
            assert!(
                matches!(
                    parse_signature_input(&case),
                    Err(SignatureError::Malformed(_))
                ),
                "accepted {case:?}"
            );
        }
        assert!(parse_signature("sig1=:AAAA:").is_err());
        assert!(parse_signature("garbage").is_err());
    }
}
