//! Second factors: TOTP codes (RFC 6238) and one-time recovery codes. Pure logic, no storage.
//!
//! TOTP uses what every authenticator app supports: HMAC-SHA1, 6 digits, 30-second steps, and
//! one step of clock skew either way. A code is accepted once: the caller stores the step that
//! [`check_totp`] returns and passes it back, and codes of that step or earlier are refused.
//! Recovery codes are 50-bit random strings in Crockford base32; the caller stores only the
//! [keyed hash](crate::service::secrets::MasterKey::keyed_hash) of their
//! [`normalize_recovery_code`] form.

use anyhow::Context;
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, Builder, Totp};

/// The issuer shown in authenticator apps.
pub const ISSUER: &str = "Palisade";

const SECRET_LEN: usize = 20;
const DIGITS: usize = 6;
const STEP_SECONDS: u64 = 30;
const SKEW_STEPS: u64 = 1;

const RECOVERY_CODE_COUNT: usize = 10;
const RECOVERY_CODE_LEN: usize = 10;
/// Crockford base32, lower case: no i, l, o or u, so no code can be misread.
const RECOVERY_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// Why a TOTP code was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MfaError {
    #[error("the code is not 6 digits")]
    Malformed,
    #[error("the code is wrong")]
    Wrong,
    #[error("the code was already used")]
    Reused,
}

/// A new TOTP secret: 20 bytes (160 bits, RFC 4226's recommendation) from the OS.
pub fn new_totp_secret() -> Vec<u8> {
    let mut secret = vec![0u8; SECRET_LEN];
    getrandom::fill(&mut secret).expect("the OS random source is available");
    secret
}

/// The `otpauth://totp/...` URI that enrols `secret` in an authenticator app, with
/// [`ISSUER`] as issuer. Fails if `account` is empty or contains a colon, which the URI
/// format cannot carry, or if `secret` is shorter than 128 bits.
pub fn otpauth_uri(secret: &[u8], account: &str) -> anyhow::Result<String> {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(DIGITS as u8)
        .with_step_duration(STEP_SECONDS)
        .with_secret(secret)
        .with_issuer(Some(ISSUER))
        .with_account_name(account)
        .build()
        .and_then(|totp| totp.to_url())
        .context("building otpauth URI")
}

/// The code an authenticator app shows for `secret` at `now_unix`.
pub fn current_code(secret: &[u8], now_unix: u64) -> String {
    totp(secret).generate(now_unix).to_string()
}

/// Checks a TOTP `code` at `now_unix`, accepting the current step and one step either side.
///
/// Returns the step the code belongs to, which the caller must store as the new
/// `last_used_step`: a code from that step or an earlier one is refused as [`MfaError::Reused`],
/// so an observed code cannot be replayed. Every candidate is computed and compared in
/// constant time, whichever matches.
pub fn check_totp(
    secret: &[u8],
    code: &str,
    now_unix: u64,
    last_used_step: Option<u64>,
) -> Result<u64, MfaError> {
    if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(MfaError::Malformed);
    }

    let totp = totp(secret);
    let now_step = now_unix / STEP_SECONDS;
    let window = now_step.saturating_sub(SKEW_STEPS)..=now_step.saturating_add(SKEW_STEPS);

    let mut accepted = None;
    let mut reused = false;
    for step in window {
        let Some(step_start) = step.checked_mul(STEP_SECONDS) else {
            continue;
        };
        let expected = totp.generate(step_start).to_string();
        if !bool::from(expected.as_bytes().ct_eq(code.as_bytes())) {
            continue;
        }

        if last_used_step.is_some_and(|last| step <= last) {
            reused = true;
        } else if accepted.is_none() {
            accepted = Some(step);
        }
    }

    match (accepted, reused) {
        (Some(step), _) => Ok(step),
        (None, true) => Err(MfaError::Reused),
        (None, false) => Err(MfaError::Wrong),
    }
}

/// The generator for `secret`. Every parameter is a fixed RFC-compliant constant, so the
/// unchecked build cannot produce a generator that panics; the secret length is checked when
/// the secret is enrolled ([`otpauth_uri`]).
fn totp(secret: &[u8]) -> Totp {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(DIGITS as u8)
        .with_step_duration(STEP_SECONDS)
        .with_skew(SKEW_STEPS as u16)
        .with_secret(secret)
        .build_noncompliant()
}

/// Ten new recovery codes, each formatted `xxxxx-xxxxx`.
pub fn new_recovery_codes() -> Vec<String> {
    (0..RECOVERY_CODE_COUNT)
        .map(|_| new_recovery_code())
        .collect()
}

fn new_recovery_code() -> String {
    let mut random = [0u8; RECOVERY_CODE_LEN];
    getrandom::fill(&mut random).expect("the OS random source is available");

    // 256 is a multiple of 32, so taking 5 bits of each byte is unbiased.
    let symbols: String = random
        .iter()
        .map(|byte| char::from(RECOVERY_ALPHABET[usize::from(byte & 0x1f)]))
        .collect();
    format_recovery_code(&symbols)
}

/// The canonical `xxxxx-xxxxx` form of a recovery code as a person typed it, or `None` when it
/// cannot be one.
///
/// Surrounding and inner spaces and one hyphen are dropped and case is ignored. As Crockford
/// base32 intends, `i` and `l` are read as `1` and `o` as `0`.
pub fn normalize_recovery_code(input: &str) -> Option<String> {
    let mut symbols = String::with_capacity(RECOVERY_CODE_LEN);
    let mut hyphens = 0;
    for c in input.trim().chars() {
        let symbol = match c.to_ascii_lowercase() {
            ' ' => continue,
            '-' => {
                hyphens += 1;
                continue;
            }
            'i' | 'l' => '1',
            'o' => '0',
            c if c.is_ascii() && RECOVERY_ALPHABET.contains(&(c as u8)) => c,
            _ => return None,
        };
        symbols.push(symbol);
    }

    if hyphens > 1 || symbols.len() != RECOVERY_CODE_LEN {
        return None;
    }
    Some(format_recovery_code(&symbols))
}

/// `abcdefghjk` → `abcde-fghjk`. `symbols` is ASCII, so splitting by byte is safe.
fn format_recovery_code(symbols: &str) -> String {
    let (head, tail) = symbols.split_at(RECOVERY_CODE_LEN / 2);
    format!("{head}-{tail}")
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// The RFC 6238 appendix B SHA1 secret.
    const RFC_SECRET: &[u8] = b"12345678901234567890";

    /// A moment in the middle of step 1000.
    const NOW: u64 = 1000 * STEP_SECONDS + 12;

    fn code_at_step(secret: &[u8], step: u64) -> String {
        current_code(secret, step * STEP_SECONDS)
    }

    #[test]
    fn rfc6238_sha1_vectors() {
        // Appendix B gives 8 digits; 6-digit codes are their last six.
        let vectors = [
            (59, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ];
        let eight_digits = Builder::new()
            .with_digits(8)
            .with_secret(RFC_SECRET)
            .build()
            .unwrap();

        for (time, expected) in vectors {
            assert_eq!(eight_digits.generate(time).to_string(), expected);
            assert_eq!(current_code(RFC_SECRET, time), expected[2..]);
        }
        assert_eq!(current_code(RFC_SECRET, 59), "287082");
    }

    #[test]
    fn current_code_is_accepted_and_returns_its_step() {
        let secret = new_totp_secret();
        let code = current_code(&secret, NOW);

        assert_eq!(check_totp(&secret, &code, NOW, None), Ok(1000));
        assert_eq!(check_totp(&secret, &code, NOW, Some(999)), Ok(1000));
    }

    #[test]
    fn rfc_vector_checks_at_its_time() {
        assert_eq!(check_totp(RFC_SECRET, "287082", 59, None), Ok(1));
    }

    #[test]
    fn code_reused_within_its_step_is_refused() {
        let secret = new_totp_secret();
        let code = current_code(&secret, NOW);
        let step = check_totp(&secret, &code, NOW, None).unwrap();

        assert_eq!(
            check_totp(&secret, &code, NOW, Some(step)),
            Err(MfaError::Reused)
        );
        assert_eq!(
            check_totp(&secret, &code, NOW + 15, Some(step)),
            Err(MfaError::Reused)
        );
    }

    #[test]
    fn code_older_than_the_last_used_step_is_refused() {
        let secret = new_totp_secret();
        let previous = code_at_step(&secret, 999);

        assert_eq!(
            check_totp(&secret, &previous, NOW, Some(1000)),
            Err(MfaError::Reused)
        );
        assert_eq!(
            check_totp(&secret, &previous, NOW, Some(999)),
            Err(MfaError::Reused)
        );
        assert_eq!(check_totp(&secret, &previous, NOW, Some(998)), Ok(999));
    }

    #[test]
    fn one_step_of_skew_is_accepted_either_way() {
        let secret = new_totp_secret();

        assert_eq!(
            check_totp(&secret, &code_at_step(&secret, 999), NOW, None),
            Ok(999)
        );
        assert_eq!(
            check_totp(&secret, &code_at_step(&secret, 1001), NOW, None),
            Ok(1001)
        );
    }

    #[test]
    fn two_steps_of_skew_are_refused() {
        // A fixed secret whose codes at steps 998..=1002 are all distinct, so a step-2 code
        // cannot match the window by accident.
        let secret = RFC_SECRET;
        let codes: HashSet<String> = (998..=1002).map(|s| code_at_step(secret, s)).collect();
        assert_eq!(codes.len(), 5);

        assert_eq!(
            check_totp(secret, &code_at_step(secret, 998), NOW, None),
            Err(MfaError::Wrong)
        );
        assert_eq!(
            check_totp(secret, &code_at_step(secret, 1002), NOW, None),
            Err(MfaError::Wrong)
        );
    }

    #[test]
    fn wrong_code_is_refused() {
        let secret = new_totp_secret();
        let window: Vec<String> = (999..=1001).map(|s| code_at_step(&secret, s)).collect();
        let wrong = (0..)
            .map(|n| format!("{n:06}"))
            .find(|candidate| !window.contains(candidate))
            .unwrap();

        assert_eq!(check_totp(&secret, &wrong, NOW, None), Err(MfaError::Wrong));
        let other_secret = new_totp_secret();
        let code = current_code(&other_secret, NOW);
        if !window.contains(&code) {
            assert_eq!(check_totp(&secret, &code, NOW, None), Err(MfaError::Wrong));
        }
    }

    #[test]
    fn malformed_codes_are_refused() {
        let secret = new_totp_secret();
        let code = current_code(&secret, NOW);
        let inputs = [
            String::new(),
            code[..5].to_string(),
            format!("{code}0"),
            format!(" {code}"),
            format!("{code}\n"),
            format!("{} {}", &code[..3], &code[3..]),
            format!("+{}", &code[1..]),
            format!("-{}", &code[1..]),
            "12345a".to_string(),
            "١٢٣٤٥٦".to_string(),
            "１２３４５６".to_string(),
        ];

        for input in inputs {
            assert_eq!(
                check_totp(&secret, &input, NOW, None),
                Err(MfaError::Malformed),
                "{input:?}"
            );
        }
    }

    #[test]
    fn check_at_the_edges_of_time_does_not_panic() {
        let secret = new_totp_secret();

        for now in [0, 1, u64::MAX - 1, u64::MAX] {
            let code = current_code(&secret, now);
            assert_eq!(
                check_totp(&secret, &code, now, None),
                Ok(now / STEP_SECONDS)
            );
        }
    }

    #[test]
    fn new_totp_secrets_are_20_random_bytes() {
        let (a, b) = (new_totp_secret(), new_totp_secret());

        assert_eq!(a.len(), 20);
        assert_ne!(a, b);
    }

    #[test]
    fn otpauth_uri_enrols_the_secret() {
        let secret = new_totp_secret();
        let uri = otpauth_uri(&secret, "alice@acme").unwrap();

        assert!(
            uri.starts_with("otpauth://totp/Palisade:alice%40acme?"),
            "{uri}"
        );
        assert!(uri.contains("issuer=Palisade"), "{uri}");
        let parsed = Totp::from_url(&uri).unwrap();
        assert_eq!(parsed.secret().as_bytes(), &secret[..]);
        assert_eq!(parsed.digits(), 6);
        assert_eq!(parsed.step(), 30);
        assert_eq!(parsed.algorithm(), Algorithm::SHA1);
        assert_eq!(parsed.generate(NOW).to_string(), current_code(&secret, NOW));
    }

    #[test]
    fn otpauth_uri_refuses_what_it_cannot_encode() {
        let secret = new_totp_secret();

        assert!(otpauth_uri(&secret, "").is_err());
        assert!(otpauth_uri(&secret, "alice:admin").is_err());
        assert!(otpauth_uri(&secret[..15], "alice").is_err());
    }

    #[test]
    fn recovery_codes_are_ten_distinct_well_formed_codes() {
        let codes = new_recovery_codes();

        assert_eq!(codes.len(), 10);
        assert_eq!(codes.iter().collect::<HashSet<_>>().len(), 10);
        for code in &codes {
            assert_eq!(code.len(), 11, "{code}");
            assert_eq!(&code[5..6], "-", "{code}");
            let symbols = code.replace('-', "");
            assert!(
                symbols.bytes().all(|b| RECOVERY_ALPHABET.contains(&b)),
                "{code}"
            );
            assert_eq!(
                normalize_recovery_code(code).as_deref(),
                Some(code.as_str())
            );
        }
    }

    #[test]
    fn recovery_code_is_normalized_from_how_people_type_it() {
        let cases = [
            ("abcde-fghjk", "abcde-fghjk"),
            ("  ABCDE-FGHJK \n", "abcde-fghjk"),
            ("abcdefghjk", "abcde-fghjk"),
            ("abcde fghjk", "abcde-fghjk"),
            ("ab cde - fgh jk", "abcde-fghjk"),
            ("abc-defghjk", "abcde-fghjk"),
            ("0ILO1-23456", "01101-23456"),
        ];

        for (input, expected) in cases {
            assert_eq!(
                normalize_recovery_code(input).as_deref(),
                Some(expected),
                "{input:?}"
            );
        }
    }

    #[test]
    fn malformed_recovery_codes_are_refused() {
        let inputs = [
            "",
            "-",
            "abcde-fghj",
            "abcde-fghjkm",
            "abcde--fghjk",
            "ab-cde-fghjk",
            "abcde-fghju",
            "abcde_fghjk",
            "abcde-fghj\u{e9}",
            "abcde\tfghjk",
        ];

        for input in inputs {
            assert_eq!(normalize_recovery_code(input), None, "{input:?}");
        }
    }
}
