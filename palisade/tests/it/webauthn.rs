//! WebAuthn security keys as a second factor, against the real server, answered by a real
//! authenticator (webauthn-rs's CTAP2 soft token): registration, login, `mfa verify`, single
//! use, origin binding, account binding, forged signatures, cloned keys, MFA reset.

use palisade_common::api;
use serde_json::json;

use crate::support::*;

/// A key for `user` made with the password and `webauthn` as the second factor.
fn login_with(
    p: &Platform,
    user: &Signer,
    webauthn: Option<api::WebauthnAssertion>,
) -> Result<(api::ApiKey, ed25519_dalek::SigningKey), palisade_cli::client::ApiError> {
    let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    let body = api::KeyCreate {
        user: user.user.clone(),
        password: user.password.clone(),
        public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
        name: None,
        totp_code: None,
        recovery_code: None,
        webauthn,
        expires_in_days: None,
    };
    p.block_on(p.anonymous().post::<_, api::ApiKey>("/v1/auth/keys", &body))
        .map(|created| (created, key))
        .map_err(api_error)
}

fn assert_refused<T>(result: Result<T, palisade_cli::client::ApiError>, what: &str) {
    let e = result.err().unwrap_or_else(|| panic!("{what}: accepted"));
    assert_eq!((e.status, e.code.as_str()), (401, "mfa_invalid"), "{what}");
}

#[test]
fn a_security_key_is_a_second_factor_answered_once_by_the_right_key_for_the_right_account() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let (_, bob) = p.tenant(&admin, "bobs", None);

    let alice_id = user_id(&p, &alice);

    // The first second factor: recovery codes once, and the keys made without it end.
    let mut token = new_security_key();
    let registered = register_security_key(&p, &alice, &mut token);
    assert_eq!(registered.name, "security-key");
    assert_eq!(registered.recovery_codes.len(), 10);
    let r = p.raw().signed(&p, &alice, "GET", "/v1/whoami", b"");
    assert_eq!((r.status, r.code()), (401, "key_invalid"));

    // The password alone no longer makes a key, nor adds a TOTP factor of its own.
    let e = login_with(&p, &alice, None).unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (401, "mfa_required"));
    let e = api_error(
        p.block_on(p.anonymous().post::<_, api::TotpEnrolment>(
            "/v1/auth/mfa/totp",
            &api::TotpEnrol {
                user: alice.user.clone(),
                password: alice.password.clone(),
            },
        ))
        .unwrap_err(),
    );
    assert_eq!((e.status, e.code.as_str()), (409, "mfa_already_enrolled"));

    // The key's answer to a challenge makes a key, which carries a fresh MFA proof.
    let challenge = p.webauthn_challenge(&alice.user, &alice.password);
    assert_eq!(
        challenge.origin,
        format!(
            "https://localhost:{}",
            p.endpoint.rsplit(':').next().unwrap()
        )
    );
    let assertion = answer_challenge(&mut token, challenge);
    let (key, _) = login_with(&p, &alice, Some(assertion.clone())).unwrap();
    assert_eq!(key.user_id, alice_id);

    // The same answer again: the challenge was spent.
    assert_refused(
        login_with(&p, &alice, Some(assertion.clone())),
        "a replayed answer",
    );

    // Alice's answer offered for Bob's account: the challenge is Alice's.
    let theirs = answer_challenge(
        &mut token,
        p.webauthn_challenge(&alice.user, &alice.password),
    );
    assert_refused(
        login_with(&p, &bob, Some(theirs.clone())),
        "another account's answer",
    );
    // Bob's try has no effect on Alice's challenge: hers to answer still.
    login_with(&p, &alice, Some(theirs)).unwrap();

    // An answer made, and properly signed, for another origin of the same RP ID (another
    // service on the host) is refused. (A foreign RP ID the authenticator refuses itself.)
    let challenge = p.webauthn_challenge(&alice.user, &alice.password);
    let mut phished = answer_challenge(
        &mut token,
        api::WebauthnChallenge {
            origin: "https://localhost:1".into(),
            ..challenge
        },
    );
    assert_refused(
        login_with(&p, &alice, Some(phished.clone())),
        "another origin",
    );

    // A forged signature is refused.
    let challenge = p.webauthn_challenge(&alice.user, &alice.password);
    phished = answer_challenge(&mut token, challenge);
    let signature = phished.credential["response"]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    phished.credential["response"]["signature"] = json!(format!("{flipped}{}", &signature[1..]));
    assert_refused(login_with(&p, &alice, Some(phished)), "a forged signature");

    // A key the account never registered cannot answer (its credential is not allowed).
    let mut stranger = new_security_key();
    let challenge = p.webauthn_challenge(&alice.user, &alice.password);
    let options = serde_json::from_value(challenge.options).unwrap();
    let origin = url::Url::parse(&challenge.origin).unwrap();
    assert!(
        webauthn_authenticator_rs::WebauthnAuthenticator::do_authentication(
            &mut stranger,
            origin,
            options
        )
        .is_err(),
        "an unregistered key answered"
    );

    // Every failure above was audited as a refused second factor.
    let refusals = std::fs::read_to_string(p.audit_log())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["action"] == "key.create" && r["code"] == "mfa_invalid")
        .count();
    assert_eq!(refusals, 4, "refused second factors in the audit log");
}

#[test]
fn mfa_verify_takes_a_security_key_and_adding_another_needs_a_fresh_proof() {
    let p = Platform::start_with_args(&["--mfa-fresh-secs", "2"]);
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let mut token = new_security_key();
    register_security_key(&p, &alice, &mut token);
    let challenge = p.webauthn_challenge(&alice.user, &alice.password);
    let (created, key) =
        login_with(&p, &alice, Some(answer_challenge(&mut token, challenge))).unwrap();
    let alice = p.signer(&alice.user, &alice.password, &created.id, key, None);

    // Once the proof is stale, adding a second key is refused until the first one is shown.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let raw = p.raw();
    let r = raw.signed(&p, &alice, "POST", "/v1/mfa/webauthn", b"");
    assert_eq!((r.status, r.code()), (403, "mfa_required"));
    let r = raw.signed(&p, &alice, "POST", "/v1/auth/mfa/verify/challenge", b"");
    assert_eq!(r.status, 201, "{:?}", r.body);
    let assertion = answer_challenge(&mut token, serde_json::from_value(r.body).unwrap());
    let verify = serde_json::to_vec(&json!({ "webauthn": assertion })).unwrap();
    let r = raw.signed(&p, &alice, "POST", "/v1/auth/mfa/verify", &verify);
    assert_eq!(r.status, 204, "{:?}", r.body);
    let mut spare = new_security_key();
    let second = register_security_key(&p, &alice, &mut spare);
    // Not the first factor: no new recovery codes, and the key that added it still works.
    assert!(second.recovery_codes.is_empty());
    let r = raw.signed(&p, &alice, "GET", "/v1/whoami", b"");
    assert_eq!(r.status, 200);

    // Either registered key answers a login challenge now.
    let challenge = p.webauthn_challenge(&alice.user, &alice.password);
    let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    let r = raw.send(
        &p,
        "POST",
        "/v1/auth/login",
        &serde_json::to_vec(&json!({
            "user": alice.user,
            "password": alice.password,
            "public_key": palisade_common::signing::encode_public_key(&key.verifying_key()),
            "webauthn": answer_challenge(&mut spare, challenge),
        }))
        .unwrap(),
        &[],
    );
    assert_eq!(r.status, 201, "{:?}", r.body);
}

#[test]
fn a_cloned_security_key_is_refused_and_an_mfa_reset_removes_the_keys() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let alice_id = user_id(&p, &alice);
    let mut token = new_security_key();
    register_security_key(&p, &alice, &mut token);

    // A copy of the key's secret state, taken now, lags behind once the original is used:
    // its signature counter goes backwards, the mark of a cloned authenticator.
    let mut clone =
        webauthn_authenticator_rs::softtoken::SoftToken::from_cbor(&token.to_cbor().unwrap())
            .unwrap();
    for _ in 0..2 {
        let challenge = p.webauthn_challenge(&alice.user, &alice.password);
        login_with(&p, &alice, Some(answer_challenge(&mut token, challenge))).unwrap();
    }
    let challenge = p.webauthn_challenge(&alice.user, &alice.password);
    assert_refused(
        login_with(&p, &alice, Some(answer_challenge(&mut clone, challenge))),
        "a cloned key",
    );

    // The security administrator resets Alice's MFA: her security keys are gone with it.
    let security = p.platform_account(&admin, "sec-1", "security_admin");
    let r = p.raw().signed(
        &p,
        &security,
        "DELETE",
        &format!("/v1/users/{alice_id}/mfa"),
        b"",
    );
    assert_eq!(r.status, 204, "{:?}", r.body);
    let e = api_error(
        p.block_on(p.anonymous().post::<_, api::WebauthnChallenge>(
            "/v1/auth/mfa/webauthn/challenge",
            &api::WebauthnChallengeRequest {
                user: alice.user.clone(),
                password: alice.password.clone(),
            },
        ))
        .unwrap_err(),
    );
    assert_eq!((e.status, e.code.as_str()), (409, "webauthn_not_enrolled"));
}

fn user_id(p: &Platform, s: &Signer) -> String {
    p.block_on(s.client.get::<api::Whoami>("/v1/whoami"))
        .unwrap()
        .user
        .id
}
