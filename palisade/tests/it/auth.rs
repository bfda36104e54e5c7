//! Authentication of every request: RFC 9421-style signatures, replay and skew windows, the
//! initial password, tenant isolation (404, never 403), and clear errors for bad input.

use palisade_common::api;
use palisade_controller::access::server::routes;
use serde_json::json;

use crate::support::*;

#[test]
fn signatures_refuse_replay_skew_tampering_and_unknown_keys() {
    let p = Platform::start();
    let admin = p.admin();
    let raw = p.raw();
    let tenants_before = raw.signed(&p, &admin, "GET", "/v1/tenants", b"");
    assert_eq!(tenants_before.status, 200);

    // A valid request works once; the same bytes again are a replay.
    let headers = sign(&admin, "GET", "/v1/whoami", b"", 0);
    assert_eq!(raw.send(&p, "GET", "/v1/whoami", b"", &headers).status, 200);
    let replay = raw.send(&p, "GET", "/v1/whoami", b"", &headers);
    assert_eq!((replay.status, replay.code()), (401, "replayed"));

    // Creation time beyond 60 s either way.
    // The extremes must not wrap around in the server's arithmetic.
    for skew in [-90, 90, -3600, i64::MIN, i64::MAX - 2 * time_now()] {
        let r = raw.send(
            &p,
            "GET",
            "/v1/whoami",
            b"",
            &sign(&admin, "GET", "/v1/whoami", b"", skew),
        );
        assert_eq!((r.status, r.code()), (401, "clock_skew"), "skew {skew}");
    }

    // Body changed after signing: refused, and nothing was created.
    let body = br#"{"name":"evil"}"#;
    let headers = sign(&admin, "POST", "/v1/tenants", br#"{"name":"good"}"#, 0);
    let r = raw.send(&p, "POST", "/v1/tenants", body, &headers);
    assert_eq!((r.status, r.code()), (401, "digest_mismatch"));
    // ... also when the digest header is recomputed for the new body.
    let mut headers = sign(&admin, "POST", "/v1/tenants", br#"{"name":"good"}"#, 0);
    headers[0].1 = palisade_common::signing::content_digest(body);
    let r = raw.send(&p, "POST", "/v1/tenants", body, &headers);
    assert_eq!((r.status, r.code()), (401, "signature_invalid"));
    // Path or query changed after signing.
    let headers = sign(&admin, "GET", "/v1/tenants", b"", 0);
    let r = raw.send(&p, "GET", "/v1/images", b"", &headers);
    assert_eq!((r.status, r.code()), (401, "signature_invalid"));
    let headers = sign(&admin, "GET", "/v1/tenants?a=1", b"", 0);
    let r = raw.send(&p, "GET", "/v1/tenants?a=2", b"", &headers);
    assert_eq!((r.status, r.code()), (401, "signature_invalid"));

    // Missing, malformed, and unknown-key signatures.
    let r = raw.send(&p, "GET", "/v1/whoami", b"", &[]);
    assert_eq!((r.status, r.code()), (401, "signature_missing"));
    let mut headers = sign(&admin, "GET", "/v1/whoami", b"", 0);
    headers[2].1 = "sig1=:bm90IGEgc2lnbmF0dXJl:".into();
    let r = raw.send(&p, "GET", "/v1/whoami", b"", &headers);
    assert_eq!((r.status, r.code()), (401, "signature_malformed"));
    let mut headers = sign(&admin, "GET", "/v1/whoami", b"", 0);
    headers[1].1 = headers[1].1.replace("\"@query\" ", "");
    let r = raw.send(&p, "GET", "/v1/whoami", b"", &headers);
    assert_eq!((r.status, r.code()), (401, "signature_malformed"));
    let stranger = Signer {
        client: p.anonymous(),
        key_id: "key-00000000-0000-0000-0000-000000000000".into(),
        key: ed25519_dalek::SigningKey::from_bytes(&rand_bytes()),
        user: String::new(),
        password: String::new(),
        totp: None,
    };
    let r = raw.signed(&p, &stranger, "GET", "/v1/whoami", b"");
    assert_eq!((r.status, r.code()), (401, "key_invalid"));
    // A real key id with someone else's private key.
    let forger = Signer {
        key_id: admin.key_id.clone(),
        ..stranger
    };
    let r = raw.signed(&p, &forger, "GET", "/v1/whoami", b"");
    assert_eq!((r.status, r.code()), (401, "signature_invalid"));

    let tenants_after = raw.signed(&p, &admin, "GET", "/v1/tenants", b"");
    assert_eq!(
        tenants_before.bytes, tenants_after.bytes,
        "a refused call changed something"
    );

    // A revoked key is refused from its next request on; another user's key is not found.
    let (_, alice) = p.tenant(&admin, "acme", None);
    let path = format!("/v1/keys/{}", admin.key_id);
    let r = raw.signed(&p, &alice, "DELETE", &path, b"");
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let spare = p
        .block_on(alice.client.get::<Vec<api::ApiKey>>("/v1/keys"))
        .unwrap();
    assert_eq!(spare.len(), 1);
    let path = format!("/v1/keys/{}", alice.key_id);
    let r = raw.signed(&p, &alice, "DELETE", &path, b"");
    assert_eq!(r.status, 204);
    let r = raw.signed(&p, &alice, "GET", "/v1/whoami", b"");
    assert_eq!((r.status, r.code()), (401, "key_invalid"));
}

#[test]
fn every_route_refuses_unsigned_requests() {
    let p = Platform::start();
    let raw = p.raw();
    let some_id = "3f1b2c4d-0000-4000-8000-000000000000";
    for route in routes() {
        let (method, route) = (route.method, route.path);
        let path = route.replace("{id}", some_id).replace("{user}", some_id);
        let r = raw.send(&p, method, &path, b"{}", &[]);
        r.assert_security_headers(&format!("{method} {route}"));
        if route.starts_with("/v1/auth/") {
            // Password routes: a password, not a signature, is the credential.
            assert!(
                matches!(r.status, 400 | 401),
                "{method} {route}: {}",
                r.status
            );
        } else {
            assert_eq!(
                (r.status, r.code()),
                (401, "signature_missing"),
                "{method} {route}"
            );
        }
    }
}

#[test]
fn the_initial_admin_password_only_changes_itself() {
    let p = Platform::start();
    let initial = p.initial_password.clone().unwrap();
    let anonymous = p.anonymous();
    let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    let create = api::KeyCreate {
        user: "admin".into(),
        password: initial.clone(),
        public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
        name: None,
        totp_code: None,
        recovery_code: None,
        webauthn: None,
        expires_in_days: None,
    };
    let err = api_error(
        p.block_on(anonymous.post::<_, api::ApiKey>("/v1/auth/keys", &create))
            .unwrap_err(),
    );
    assert_eq!(
        (err.status, err.code.as_str()),
        (403, "password_change_required")
    );
    // Nor does any other password route take it: no session, no second factor, no challenge.
    let public_key = palisade_common::signing::encode_public_key(&key.verifying_key());
    for (path, body) in [
        (
            "/v1/auth/login",
            json!({"user": "admin", "password": initial, "public_key": public_key}),
        ),
        (
            "/v1/auth/mfa/totp",
            json!({"user": "admin", "password": initial}),
        ),
        (
            "/v1/auth/mfa/totp/confirm",
            json!({"user": "admin", "password": initial, "code": "123456"}),
        ),
        (
            "/v1/auth/mfa/webauthn/challenge",
            json!({"user": "admin", "password": initial}),
        ),
    ] {
        assert_needs_a_password_change(&p, path, &body);
    }

    // Wrong current password, and a too-short new one, are refused.
    let mut change = api::PasswordChange {
        user: "admin".into(),
        current_password: "not-the-password".into(),
        new_password: "A-long-enough-passw0rd".into(),
        totp_code: None,
        recovery_code: None,
        webauthn: None,
    };
    let err = api_error(
        p.block_on(anonymous.post::<_, serde_json::Value>("/v1/auth/password", &change))
            .unwrap_err(),
    );
    assert_eq!(
        (err.status, err.code.as_str()),
        (401, "credentials_invalid")
    );
    change.current_password = initial.clone();
    change.new_password = "short".into();
    let err = api_error(
        p.block_on(anonymous.post::<_, serde_json::Value>("/v1/auth/password", &change))
            .unwrap_err(),
    );
    assert_eq!((err.status, err.code.as_str()), (400, "password_policy"));

    // After the change the old password is dead and keys can be made.
    change.new_password = "A-long-enough-passw0rd".into();
    let _: serde_json::Value = p
        .block_on(anonymous.post("/v1/auth/password", &change))
        .unwrap();
    let err = api_error(
        p.block_on(anonymous.post::<_, api::ApiKey>("/v1/auth/keys", &create))
            .unwrap_err(),
    );
    assert_eq!(err.status, 401);
    let mut create = api::KeyCreate {
        password: "A-long-enough-passw0rd".into(),
        ..create
    };
    // A platform account makes no key without a second factor: TOTP must be enrolled first.
    let err = api_error(
        p.block_on(anonymous.post::<_, api::ApiKey>("/v1/auth/keys", &create))
            .unwrap_err(),
    );
    assert_eq!(
        (err.status, err.code.as_str()),
        (403, "mfa_enrolment_required")
    );
    let (totp, recovery) = p.enrol_totp("admin", "A-long-enough-passw0rd");
    let err = api_error(
        p.block_on(anonymous.post::<_, api::ApiKey>("/v1/auth/keys", &create))
            .unwrap_err(),
    );
    assert_eq!((err.status, err.code.as_str()), (401, "mfa_required"));
    create.totp_code = Some(totp_code(&totp, 0));
    let _: api::ApiKey = p
        .block_on(anonymous.post("/v1/auth/keys", &create))
        .unwrap();

    // With a second factor enrolled, the password alone no longer changes the password.
    let mut change = api::PasswordChange {
        user: "admin".into(),
        current_password: "A-long-enough-passw0rd".into(),
        new_password: "Another-passw0rd-2".into(),
        totp_code: None,
        recovery_code: None,
        webauthn: None,
    };
    let err = api_error(
        p.block_on(anonymous.post::<_, serde_json::Value>("/v1/auth/password", &change))
            .unwrap_err(),
    );
    assert_eq!((err.status, err.code.as_str()), (401, "mfa_required"));

    // Neither the current password nor a recent one can come back; a weak one never. Each try
    // spends a recovery code: the second factor is checked before the new password.
    let codes = std::cell::RefCell::new(recovery.into_iter());
    let mut cycle = |current: &str, new: &str| {
        change.current_password = current.into();
        change.new_password = new.into();
        change.recovery_code = codes.borrow_mut().next();
        p.block_on(anonymous.post::<_, serde_json::Value>("/v1/auth/password", &change))
            .map_err(api_error)
    };
    let reused = cycle("A-long-enough-passw0rd", "A-long-enough-passw0rd").unwrap_err();
    assert_eq!(
        (reused.status, reused.code.as_str()),
        (400, "password_reused")
    );
    let reused = cycle("A-long-enough-passw0rd", &initial).unwrap_err();
    assert_eq!(
        (reused.status, reused.code.as_str()),
        (400, "password_reused")
    );
    let weak = cycle("A-long-enough-passw0rd", "            ").unwrap_err();
    assert_eq!((weak.status, weak.code.as_str()), (400, "password_policy"));
    cycle("A-long-enough-passw0rd", "Another-passw0rd-2").unwrap();
    let back = cycle("Another-passw0rd-2", "A-long-enough-passw0rd").unwrap_err();
    assert_eq!(back.code, "password_reused");
}

#[test]
fn tenant_b_gets_404_for_tenant_a_instances_and_never_sees_them() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "tenant-a", None);
    let (_, bob) = p.tenant(&admin, "tenant-b", None);
    let instance = p.create_instance(&alice, "secret-vm").unwrap();
    let raw = p.raw();

    // The owner may spell the id in upper case; it is the same instance.
    let upper = format!("/v1/instances/{}", instance.id.to_uppercase());
    let r = raw.signed(&p, &alice, "GET", &upper, b"");
    assert_eq!(
        (r.status, r.body["id"].as_str()),
        (200, Some(instance.id.as_str()))
    );

    let missing = "0d6f7f3e-9c1a-4b7e-8f00-000000000000";
    for (method, tail) in [
        ("GET", ""),
        ("GET", "/console"),
        ("DELETE", ""),
        ("POST", "/stop"),
        ("POST", "/start"),
    ] {
        let theirs = format!("/v1/instances/{}{tail}", instance.id);
        let nobody = format!("/v1/instances/{missing}{tail}");
        let a = raw.send(
            &p,
            method,
            &theirs,
            b"",
            &sign(&bob, method, &theirs, b"", 0),
        );
        let b = raw.send(
            &p,
            method,
            &nobody,
            b"",
            &sign(&bob, method, &nobody, b"", 0),
        );
        assert_eq!(
            (a.status, a.code()),
            (404, "not_found"),
            "{method} {theirs}"
        );
        // Indistinguishable from an id that does not exist.
        assert_eq!((a.status, &a.body), (b.status, &b.body), "{method} {tail}");
    }
    let list: Vec<api::Instance> = p.block_on(bob.client.get("/v1/instances")).unwrap();
    assert!(list.is_empty(), "tenant B sees {list:?}");
    // Tenant A's instance is untouched by B's attempts.
    let still = p.instance(&alice, &instance.id);
    assert!(
        still.deleted_at.is_none() && still.state != "deleting",
        "{still:?}"
    );
    // Platform accounts are not a way around tenancy either: the platform administrator's
    // role has no instance actions, so the instance is as invisible to it as to tenant B.
    let err = api_error(
        p.block_on(
            admin
                .client
                .get::<api::Instance>(&format!("/v1/instances/{}", instance.id)),
        )
        .unwrap_err(),
    );
    assert_eq!((err.status, err.code.as_str()), (404, "not_found"));
}

#[test]
fn bad_input_gets_a_clear_4xx_never_a_500() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let raw = p.raw();
    let call = |signer: &Signer, method: &str, path: &str, body: &[u8]| {
        raw.send(&p, method, path, body, &sign(signer, method, path, body, 0))
    };
    let big = vec![b'x'; 70 * 1024];
    // (caller, method, path, body, expected status, expected code)
    type Case<'a> = (&'a Signer, &'a str, &'a str, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            &alice,
            "POST",
            "/v1/instances",
            br#"{"name":"a","image":"debian-12-busybox","flavor":"tiny","gpu":true}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            &alice,
            "POST",
            "/v1/instances",
            br#"{"name":5,"image":"debian-12-busybox","flavor":"tiny"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            &alice,
            "POST",
            "/v1/instances",
            b"not json".to_vec(),
            400,
            "invalid_request",
        ),
        (
            &alice,
            "POST",
            "/v1/instances",
            b"".to_vec(),
            400,
            "invalid_request",
        ),
        (
            &alice,
            "POST",
            "/v1/instances",
            br#"{"name":"a","image":"debian-12-busybox","flavor":"huge"}"#.to_vec(),
            400,
            "unknown_flavor",
        ),
        (
            &alice,
            "POST",
            "/v1/instances",
            br#"{"name":"../../etc","image":"debian-12-busybox","flavor":"tiny"}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            &alice,
            "POST",
            "/v1/instances",
            br#"{"name":"a","image":"no-such-image","flavor":"tiny"}"#.to_vec(),
            404,
            "not_found",
        ),
        (
            &alice,
            "POST",
            "/v1/instances",
            big.clone(),
            413,
            "body_too_large",
        ),
        // A tag value that would reorder or hide what a table shows.
        (
            &alice,
            "POST",
            "/v1/instances",
            serde_json::to_vec(&json!({
                "name": "a", "image": "debian-12-busybox", "flavor": "tiny",
                "tags": {"k": "\u{202e}\u{200b}zz"},
            }))
            .unwrap(),
            400,
            "invalid_request",
        ),
        (
            &alice,
            "GET",
            "/v1/instances/not-a-uuid",
            Vec::new(),
            404,
            "not_found",
        ),
        (
            &alice,
            "GET",
            "/v1/instances/9b2e0f6a-1111-4222-8333-444455556666",
            Vec::new(),
            404,
            "not_found",
        ),
        (
            &alice,
            "GET",
            "/v1/nothing-here",
            Vec::new(),
            404,
            "not_found",
        ),
        (
            &alice,
            "PUT",
            "/v1/instances",
            Vec::new(),
            405,
            "method_not_allowed",
        ),
        (
            &alice,
            "POST",
            "/v1/tenants",
            br#"{"name":"x"}"#.to_vec(),
            403,
            "forbidden",
        ),
        (
            &admin,
            "POST",
            "/v1/tenants",
            br#"{"name":"x","quota":{"instances":"many"}}"#.to_vec(),
            400,
            "invalid_request",
        ),
        (
            &admin,
            "POST",
            "/v1/users",
            br#"{"name":"u","tenant_id":"nope"}"#.to_vec(),
            404,
            "not_found",
        ),
        (
            &admin,
            "POST",
            "/v1/tenants",
            br#"{"name":"acme"}"#.to_vec(),
            409,
            "name_taken",
        ),
    ];
    for (signer, method, path, body, status, code) in cases {
        let r = call(signer, method, path, &body);
        assert_eq!(
            (r.status, r.code()),
            (status, code),
            "{method} {path} {}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        assert!(!r.body["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    let r = call(&alice, "GET", "/v1/instances/abc/console?offset=minus", b"");
    assert_eq!(r.status, 404);
    let list: Vec<api::Instance> = p.block_on(alice.client.get("/v1/instances")).unwrap();
    assert!(list.is_empty(), "a refused create left {list:?}");
}

#[test]
fn a_client_that_sends_headers_slowly_is_cut_off() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    let p = Platform::start();
    let addr = p.endpoint.trim_start_matches("https://").to_string();
    let tls = palisade_common::tls::client_config(&p.ca(), None).unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(tls), name).unwrap();
    let tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream
        .write_all(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n")
        .unwrap();

    // One more header line every two seconds, never the blank line that ends them.
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "slow client still connected"
        );
        let _ = stream.write_all(b"X-Slow: 1\r\n");
        match stream.read(&mut buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            _ => break, // closed, reset, or answered (408): cut off either way
        }
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "cut off too soon to be a timeout"
    );
}

#[test]
fn a_caller_over_its_rate_gets_429_and_others_are_unaffected() {
    let p = Platform::start_with_args(&["--rate-limit-per-key", "2"]);
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let (_, bob) = p.tenant(&admin, "other", None);
    let raw = p.raw();

    // Alice fires 30 signed requests at once: beyond her burst of 4 she is refused.
    let statuses: Vec<(u16, String)> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..30)
            .map(|_| {
                scope.spawn(|| {
                    let r = raw.signed(&p, &alice, "GET", "/v1/whoami", b"");
                    (r.status, r.code().to_string())
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let limited = statuses
        .iter()
        .filter(|(s, c)| *s == 429 && c == "rate_limited")
        .count();
    let served = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(limited + served, 30, "{statuses:?}");
    assert!(
        served <= 8 && limited >= 20,
        "{served} served, {limited} limited"
    );

    // Bob, same source address, different key: unaffected.
    assert_eq!(raw.signed(&p, &bob, "GET", "/v1/whoami", b"").status, 200);
    // Each refusal is audited as such.
    let text = std::fs::read_to_string(p.audit_log()).unwrap();
    let audited = text
        .lines()
        .filter(|l| l.contains("\"code\":\"rate_limited\""))
        .count();
    assert_eq!(audited, limited);
}

#[test]
fn a_source_over_its_rate_gets_429_before_anything_is_read() {
    let p = Platform::start_with_args(&["--rate-limit-per-source", "3"]);
    let raw = p.raw();
    // Unsigned requests from one address: the budget (burst 6) runs out, then 429 whatever
    // the request.
    let codes: Vec<String> = (0..60)
        .map(|_| {
            raw.send(&p, "GET", "/v1/whoami", b"", &[])
                .code()
                .to_string()
        })
        .collect();
    let limited = codes.iter().filter(|c| *c == "rate_limited").count();
    assert!(limited >= 20, "only {limited} of 60 limited: {codes:?}");
    assert!(codes
        .iter()
        .all(|c| c == "rate_limited" || c == "signature_missing"));
}

#[test]
fn wrong_passwords_lock_the_account_with_growing_back_off_and_are_audited() {
    use std::time::{Duration, Instant};

    // Locks last 3 s, then 6 s (whole seconds on the server: effectively 2-3 s, then 5-6 s).
    let p = Platform::start_with_args(&["--lockout-after", "3", "--lockout-secs", "3"]);
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let anonymous = p.anonymous();
    let try_key = |password: &str| {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
        let body = api::KeyCreate {
            user: alice.user.clone(),
            password: password.into(),
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
            name: None,
            totp_code: None,
            recovery_code: None,
            webauthn: None,
            expires_in_days: None,
        };
        p.block_on(anonymous.post::<_, api::ApiKey>("/v1/auth/keys", &body))
            .map(|_| ())
            .map_err(api_error)
    };
    // The codes of the last `n` request records (alert records, which a lock also makes, are
    // counted apart).
    let audit_codes = |n: usize| -> Vec<String> {
        let text = std::fs::read_to_string(p.audit_log()).unwrap();
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|r: &serde_json::Value| {
                !r["action"].as_str().unwrap_or("").starts_with("alert.") && r["type"] != "host"
            })
            .collect();
        records[records.len() - n..]
            .iter()
            .map(|r| r["code"].as_str().unwrap_or("").to_string())
            .collect()
    };

    // Three wrong passwords lock it; then even the right one is refused, with the same answer.
    for _ in 0..3 {
        let e = try_key("Wrong-passw0rd-!").unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (401, "credentials_invalid"));
    }
    let locked_at = Instant::now();
    let e = try_key(&alice.password).unwrap_err();
    assert_eq!((e.status, e.code.as_str()), (401, "credentials_invalid"));
    assert_eq!(
        audit_codes(4),
        [
            "credentials_invalid",
            "credentials_invalid",
            "account_locked",
            "account_locked"
        ]
    );

    // After the lock the right password works and clears the count and the back-off.
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(locked_at.elapsed()));
    try_key(&alice.password).unwrap();

    // Two locks with no success between them: the second lasts twice as long.
    for _ in 0..3 {
        try_key("Wrong-passw0rd-!").unwrap_err();
    }
    std::thread::sleep(Duration::from_millis(3500));
    for _ in 0..3 {
        try_key("Wrong-passw0rd-!").unwrap_err();
    }
    let second_lock = Instant::now();
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        try_key(&alice.password).is_err(),
        "the second lock was not longer"
    );
    std::thread::sleep(Duration::from_millis(6500).saturating_sub(second_lock.elapsed()));
    try_key(&alice.password).unwrap();

    // Unknown users get the same answer and are never "locked" in the audit log.
    for _ in 0..5 {
        let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
        let body = api::KeyCreate {
            user: "nobody-here".into(),
            password: "Wrong-passw0rd-!".into(),
            public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
            name: None,
            totp_code: None,
            recovery_code: None,
            webauthn: None,
            expires_in_days: None,
        };
        let e = api_error(
            p.block_on(anonymous.post::<_, api::ApiKey>("/v1/auth/keys", &body))
                .unwrap_err(),
        );
        assert_eq!((e.status, e.code.as_str()), (401, "credentials_invalid"));
    }
    assert!(audit_codes(5).iter().all(|c| c == "credentials_invalid"));
}

#[test]
fn a_password_change_revokes_every_key_of_that_user_at_once() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let (_, bob) = p.tenant(&admin, "other", None);
    let anonymous = p.anonymous();
    // Alice holds ten keys.
    let signers: Vec<Signer> = (0..9)
        .map(|_| {
            let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
            let body = api::KeyCreate {
                user: alice.user.clone(),
                password: alice.password.clone(),
                public_key: palisade_common::signing::encode_public_key(&key.verifying_key()),
                name: None,
                totp_code: None,
                recovery_code: None,
                webauthn: None,
                expires_in_days: None,
            };
            let created: api::ApiKey = p.block_on(anonymous.post("/v1/auth/keys", &body)).unwrap();
            Signer {
                client: p.anonymous(),
                key_id: created.id,
                key,
                user: alice.user.clone(),
                password: alice.password.clone(),
                totp: None,
            }
        })
        .collect();
    let raw = p.raw();
    for s in signers.iter().chain([&alice]) {
        assert_eq!(raw.signed(&p, s, "GET", "/v1/whoami", b"").status, 200);
    }

    let change = api::PasswordChange {
        user: alice.user.clone(),
        current_password: alice.password.clone(),
        new_password: "Brand-new-passw0rd".into(),
        totp_code: None,
        recovery_code: None,
        webauthn: None,
    };
    let _: serde_json::Value = p
        .block_on(anonymous.post("/v1/auth/password", &change))
        .unwrap();
    for s in signers.iter().chain([&alice]) {
        let r = raw.signed(&p, s, "GET", "/v1/whoami", b"");
        assert_eq!((r.status, r.code()), (401, "key_invalid"), "{}", s.key_id);
    }
    // Nobody else's keys were touched.
    assert_eq!(raw.signed(&p, &bob, "GET", "/v1/whoami", b"").status, 200);
    assert_eq!(raw.signed(&p, &admin, "GET", "/v1/whoami", b"").status, 200);
}

#[test]
fn the_api_speaks_only_tls_and_the_client_trusts_only_the_pinned_ca() {
    use std::io::{Read, Write};
    let p = Platform::start();
    let addr = p.endpoint.trim_start_matches("https://").to_string();

    // Plain HTTP on the API port gets no HTTP answer: TLS or nothing.
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    plain
        .write_all(b"GET /v1/images HTTP/1.1\r\nHost: palisade\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );

    // A client pinned to another CA refuses the platform's certificate.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign = params.self_signed(&key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let foreign_ca = dir.path().join("foreign-ca.pem");
    std::fs::write(&foreign_ca, foreign.pem()).unwrap();
    let client = palisade_cli::client::Client::new(&p.endpoint, &foreign_ca, None).unwrap();
    let refused = p.block_on(client.get::<serde_json::Value>("/v1/images"));
    assert!(refused.is_err(), "a foreign CA was trusted");
    // The pinned CA works on the same endpoint (the refusal above was the CA's doing).
    let r = p.raw().send(&p, "GET", "/v1/images", b"", &[]);
    assert_eq!((r.status, r.code()), (401, "signature_missing"));
}

/// Regression: history entries made within one second kept no order, so "the last five"
/// could be any five of them.
#[test]
fn a_password_may_come_back_after_five_others_and_not_before() {
    let p = Platform::start();
    let admin = p.admin();
    let (_, alice) = p.tenant(&admin, "acme", None);
    let anonymous = p.anonymous();
    let change = |current: &str, new: &str| {
        let body = api::PasswordChange {
            user: alice.user.clone(),
            current_password: current.into(),
            new_password: new.into(),
            totp_code: None,
            recovery_code: None,
            webauthn: None,
        };
        p.block_on(anonymous.post::<_, serde_json::Value>("/v1/auth/password", &body))
            .map_err(api_error)
    };
    // The original, then six more in quick succession: the original is six back.
    let passwords: Vec<String> = (1..=6).map(|i| format!("Rotating-passw0rd-{i}")).collect();
    let mut current = alice.password.clone();
    for next in &passwords {
        change(&current, next).unwrap();
        current = next.clone();
    }
    for recent in &passwords[..5] {
        let e = change(&current, recent).unwrap_err();
        assert_eq!(
            (e.status, e.code.as_str()),
            (400, "password_reused"),
            "{recent}"
        );
    }
    change(&current, &alice.password).unwrap();
}

/// Every new user, not only the first administrator, gets a random one-time password that can
/// do nothing but change itself; passwords are stored only as Argon2id hashes.
#[test]
fn a_new_users_one_time_password_only_changes_itself_and_passwords_are_argon2id() {
    let p = Platform::start();
    let admin = p.admin();
    let tenant: api::Tenant = p
        .block_on(admin.client.post(
            "/v1/tenants",
            &api::TenantCreate {
                name: "acme".into(),
                quota: None,
            },
        ))
        .unwrap();
    let created: api::UserCreated = p
        .block_on(admin.client.post(
            "/v1/users",
            &api::UserCreate {
                name: "newcomer".into(),
                tenant_id: Some(tenant.id),
                role: None,
            },
        ))
        .unwrap();
    // Tenant users log in as `<name>@<tenant>`.
    assert_eq!(created.user.name, "newcomer@acme");
    let one_time = created.initial_password.clone();
    assert!(one_time.len() >= 16, "a short one-time password");
    let anonymous = p.anonymous();
    let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    let public_key = palisade_common::signing::encode_public_key(&key.verifying_key());
    for path in ["/v1/auth/keys", "/v1/auth/login"] {
        let body = json!({"user": "newcomer@acme", "password": one_time, "public_key": public_key});
        assert_needs_a_password_change(&p, path, &body);
    }
    let change = api::PasswordChange {
        user: "newcomer@acme".into(),
        current_password: one_time,
        new_password: "Fresh-passw0rd-of-mine".into(),
        totp_code: None,
        recovery_code: None,
        webauthn: None,
    };
    let _: serde_json::Value = p
        .block_on(anonymous.post("/v1/auth/password", &change))
        .unwrap();
    let body = json!({
        "user": "newcomer@acme", "password": "Fresh-passw0rd-of-mine", "public_key": public_key,
    });
    let _: api::ApiKey = p.block_on(anonymous.post("/v1/auth/keys", &body)).unwrap();

    let out = std::process::Command::new("sqlite3")
        .arg(p.data().join("palisade.db"))
        .arg("SELECT password_hash FROM users")
        .output()
        .unwrap();
    let hashes = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(hashes.lines().count() >= 2, "{hashes}");
    for hash in hashes.lines() {
        assert!(hash.starts_with("$argon2id$"), "not Argon2id: {hash}");
    }
    assert!(!hashes.contains("Fresh-passw0rd-of-mine"));
}

/// A password route called with a one-time password: refused until the password is changed.
fn assert_needs_a_password_change(p: &Platform, path: &str, body: &serde_json::Value) {
    let err = api_error(
        p.block_on(p.anonymous().post::<_, serde_json::Value>(path, body))
            .unwrap_err(),
    );
    assert_eq!(
        (err.status, err.code.as_str()),
        (403, "password_change_required"),
        "{path}"
    );
}
