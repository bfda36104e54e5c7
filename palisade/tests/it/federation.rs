//! Federation against a real OpenID Connect provider run locally (testing/oidc): a tenant's
//! users log in through their own provider (authorization code + PKCE), their provider groups
//! become a role and tenant groups, and every way of cutting the flow short is refused.

use palisade_common::api;
use serde_json::json;

use crate::support::*;

struct Fed {
    p: Platform,
    idp: OidcProvider,
    admin: Signer,
    acme: api::Tenant,
    ta: Signer,
    redirect: String,
}

fn setup() -> Fed {
    let redirect = format!("http://127.0.0.1:{}/callback", free_port());
    let idp = OidcProvider::start(&json!({
        "clients": [{"client_id": "palisade", "redirect_uris": [redirect]}],
        "accounts": [
            {"username": "alice", "password": "alice-password",
             "claims": {"email": "alice@acme.test", "groups": ["palisade-admins", "ops"]}},
            {"username": "bob", "password": "bob-password",
             "claims": {"email": "bob@acme.test", "groups": ["ops"]}},
        ],
    }));
    let p = Platform::start_with_args(&["--allow-private-endpoints"]);
    let admin = p.admin();
    let (acme, ta) = p.tenant(&admin, "acme", None);
    let ta = p.promote(&admin, &ta, "tenant_admin");
    Fed {
        p,
        idp,
        admin,
        acme,
        ta,
        redirect,
    }
}

fn body(value: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

/// Starts a login for `tenant` with a fresh key pair; returns it and the answer.
fn start(f: &Fed, tenant: &str) -> (ed25519_dalek::SigningKey, RawResponse) {
    let key = ed25519_dalek::SigningKey::from_bytes(&rand_bytes());
    let r = f.p.raw().send(
        &f.p,
        "POST",
        "/v1/auth/oidc/start",
        &body(json!({
            "tenant": tenant,
            "redirect_uri": f.redirect,
            "public_key": palisade_common::signing::encode_public_key(&key.verifying_key()),
        })),
        &[],
    );
    (key, r)
}

fn query_param(url: &str, name: &str) -> String {
    let query = url.split_once('?').unwrap().1;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {name} in {url}"))
}

fn finish(f: &Fed, login_id: &str, code: &str, state: &str) -> RawResponse {
    f.p.raw().send(
        &f.p,
        "POST",
        "/v1/auth/oidc/finish",
        &body(json!({"login_id": login_id, "code": code, "state": state})),
        &[],
    )
}

/// A whole login as `user`: the session key as a signer.
fn login(f: &Fed, user: &str, password: &str) -> Signer {
    let (key, started) = start(f, "acme");
    assert_eq!(started.status, 201, "{:?}", started.body);
    let url = started.body["authorization_url"].as_str().unwrap();
    let back = f.idp.browser_login(&f.p, url, user, password);
    assert!(back.starts_with(&f.redirect), "{back}");
    let r = finish(
        f,
        started.body["login_id"].as_str().unwrap(),
        &query_param(&back, "code"),
        &query_param(&back, "state"),
    );
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["kind"], "session");
    f.p.signer(user, "", r.body["id"].as_str().unwrap(), key, None)
}

#[test]
fn tenant_users_log_in_through_their_own_provider_with_groups_mapped() {
    let f = setup();
    let raw = f.p.raw();
    let ops: api::Group =
        f.p.block_on(
            f.ta.client
                .post("/v1/groups", &api::GroupCreate { name: "ops".into() }),
        )
        .unwrap();
    // A bad configuration changes nothing: a platform role, an unreachable issuer.
    for (config, code) in [
        (
            json!({"issuer": f.idp.issuer, "client_id": "palisade",
                   "role_map": {"palisade-admins": "platform_admin"}}),
            "invalid_role",
        ),
        (
            json!({"issuer": format!("http://127.0.0.1:{}", free_port()), "client_id": "palisade"}),
            "oidc_unreachable",
        ),
    ] {
        let r = raw.signed(
            &f.p,
            &f.ta,
            "PUT",
            &format!("/v1/tenants/{}/oidc", f.acme.id),
            &body(config),
        );
        assert_eq!((r.status, r.code()), (400, code), "{:?}", r.body);
    }
    let (_, r) = start(&f, "acme");
    assert_eq!((r.status, r.code()), (404, "not_found"));
    let r = raw.signed(
        &f.p,
        &f.ta,
        "PUT",
        &format!("/v1/tenants/{}/oidc", f.acme.id),
        &body(json!({"issuer": f.idp.issuer, "client_id": "palisade",
                     "role_map": {"palisade-admins": "tenant_admin"}, "default_role": "member"})),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);

    // Alice: provider group palisade-admins → tenant_admin; ops → the tenant group ops.
    let alice = login(&f, "alice", "alice-password");
    let me: api::Whoami = f.p.block_on(alice.client.get("/v1/whoami")).unwrap();
    assert_eq!(me.user.tenant_id.as_deref(), Some(f.acme.id.as_str()));
    assert_eq!(me.user.role, "tenant_admin");
    let groups: Vec<api::Group> = f.p.block_on(f.ta.client.get("/v1/groups")).unwrap();
    let members = &groups.iter().find(|g| g.id == ops.id).unwrap().members;
    assert!(members.contains(&me.user.id), "{groups:?}");
    // Bob: no mapped group → the default role.
    let bob = login(&f, "bob", "bob-password");
    let bob_me: api::Whoami = f.p.block_on(bob.client.get("/v1/whoami")).unwrap();
    assert_eq!(bob_me.user.role, "member");
    assert_ne!(bob_me.user.id, me.user.id);
    // The same person again is the same user, not a new one.
    let again = login(&f, "alice", "alice-password");
    let again_me: api::Whoami = f.p.block_on(again.client.get("/v1/whoami")).unwrap();
    assert_eq!(again_me.user.id, me.user.id);
    // A federated user has no password to log in with.
    let e = api_error(
        f.p.block_on(f.p.anonymous().post::<_, api::ApiKey>(
            "/v1/auth/login",
            &api::Login {
                user: me.user.name.clone(),
                password: "federated: no password".into(),
                public_key: palisade_common::signing::encode_public_key(
                    &ed25519_dalek::SigningKey::from_bytes(&rand_bytes()).verifying_key(),
                ),
                totp_code: None,
                recovery_code: None,
                webauthn: None,
            },
        ))
        .unwrap_err(),
    );
    assert_eq!(e.status, 401);

    // Disabled at the platform: the provider's word is not enough any more.
    let r = raw.signed(
        &f.p,
        &f.ta,
        "POST",
        &format!("/v1/users/{}/disable", bob_me.user.id),
        b"",
    );
    assert_eq!(r.status, 204);
    assert_eq!(raw.signed(&f.p, &bob, "GET", "/v1/whoami", b"").status, 401);
    let (_, started) = start(&f, "acme");
    let back = f.idp.browser_login(
        &f.p,
        started.body["authorization_url"].as_str().unwrap(),
        "bob",
        "bob-password",
    );
    let r = finish(
        &f,
        started.body["login_id"].as_str().unwrap(),
        &query_param(&back, "code"),
        &query_param(&back, "state"),
    );
    assert_eq!(r.status, 401, "{:?}", r.body);
    let _ = &f.admin;
}

#[test]
fn a_federated_login_cannot_be_replayed_forged_or_redirected() {
    let f = setup();
    let raw = f.p.raw();
    let r = raw.signed(
        &f.p,
        &f.ta,
        "PUT",
        &format!("/v1/tenants/{}/oidc", f.acme.id),
        &body(json!({"issuer": f.idp.issuer, "client_id": "palisade"})),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);

    // Only loopback redirects: the code can only reach the machine that started the login.
    for bad in [
        "https://evil.example/callback",
        "http://evil.example:8080/callback",
        "http://localhost:8080/callback",
    ] {
        let r = raw.send(
            &f.p,
            "POST",
            "/v1/auth/oidc/start",
            &body(json!({"tenant": "acme", "redirect_uri": bad,
                         "public_key": palisade_common::signing::encode_public_key(
                             &ed25519_dalek::SigningKey::from_bytes(&rand_bytes()).verifying_key())})),
            &[],
        );
        assert_eq!((r.status, r.code()), (400, "invalid_redirect"), "{bad}");
    }
    // Unknown tenant and tenant without a provider: the same 404.
    let (_, r) = start(&f, "no-such-tenant");
    assert_eq!((r.status, r.code()), (404, "not_found"));

    let (_, started) = start(&f, "acme");
    let login_id = started.body["login_id"].as_str().unwrap().to_string();
    let back = f.idp.browser_login(
        &f.p,
        started.body["authorization_url"].as_str().unwrap(),
        "alice",
        "alice-password",
    );
    let (code, state) = (query_param(&back, "code"), query_param(&back, "state"));
    // A wrong state spends the login: the right one afterwards is refused too.
    let r = finish(&f, &login_id, &code, "forged-state");
    assert_eq!((r.status, r.code()), (401, "oidc_refused"));
    let r = finish(&f, &login_id, &code, &state);
    assert_eq!((r.status, r.code()), (401, "oidc_refused"));

    // A code from one login cannot finish another (PKCE and the login binding).
    let (_, first) = start(&f, "acme");
    let (_, second) = start(&f, "acme");
    let back = f.idp.browser_login(
        &f.p,
        first.body["authorization_url"].as_str().unwrap(),
        "alice",
        "alice-password",
    );
    let second_state = query_param(second.body["authorization_url"].as_str().unwrap(), "state");
    let r = finish(
        &f,
        second.body["login_id"].as_str().unwrap(),
        &query_param(&back, "code"),
        &second_state,
    );
    assert_eq!((r.status, r.code()), (401, "oidc_refused"));
    // A finished login cannot be finished again.
    let (_, third) = start(&f, "acme");
    let back = f.idp.browser_login(
        &f.p,
        third.body["authorization_url"].as_str().unwrap(),
        "alice",
        "alice-password",
    );
    let id = third.body["login_id"].as_str().unwrap();
    let (code, state) = (query_param(&back, "code"), query_param(&back, "state"));
    assert_eq!(finish(&f, id, &code, &state).status, 201);
    let r = finish(&f, id, &code, &state);
    assert_eq!((r.status, r.code()), (401, "oidc_refused"));
    // The whole exchange is in the audit log, never the code.
    let log = std::fs::read_to_string(f.p.audit_log()).unwrap();
    assert!(log.contains("\"auth.oidc_finish\""));
    assert!(
        !log.contains(&code),
        "an authorization code is in the audit log"
    );
}

#[test]
fn the_cli_logs_in_through_the_provider_via_a_loopback_redirect() {
    use std::io::BufRead;
    let port = free_port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let idp = OidcProvider::start(&json!({
        "clients": [{"client_id": "palisade", "redirect_uris": [redirect]}],
        "accounts": [{"username": "carol", "password": "carol-password",
                      "claims": {"groups": ["ops"]}}],
    }));
    let f = Fed {
        redirect,
        idp,
        ..setup()
    };
    let r = f.p.raw().signed(
        &f.p,
        &f.ta,
        "PUT",
        &format!("/v1/tenants/{}/oidc", f.acme.id),
        &body(json!({"issuer": f.idp.issuer, "client_id": "palisade", "default_role": "member"})),
    );
    assert_eq!(r.status, 204, "{:?}", r.body);
    let endpoint = f.p.endpoint.clone();
    let ca = f.p.ca().display().to_string();
    f.p.cli_ok(&[
        "profile",
        "set",
        "carol",
        "--endpoint",
        &endpoint,
        "--ca",
        &ca,
    ]);

    let mut cli = std::process::Command::new(palisade_bin())
        .env("PALISADE_CONFIG", f.p.data().join("cli/config.json"))
        .args(["--profile", "carol", "sso", "--tenant", "acme", "--port"])
        .arg(port.to_string())
        .args(["--timeout", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(cli.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().unwrap().unwrap();
        if line.starts_with("http") {
            break line;
        }
    };
    // The browser: the provider's login, then back to the CLI's loopback port.
    let back = f.idp.browser_login(&f.p, &url, "carol", "carol-password");
    assert!(back.starts_with(&f.redirect), "{back}");
    let page =
        f.p.block_on(async { reqwest::get(&back).await.unwrap().text().await.unwrap() });
    assert!(page.contains("close this window"), "{page}");
    assert!(cli.wait().unwrap().success(), "palisade sso failed");
    let me: serde_json::Value =
        serde_json::from_str(&f.p.cli_ok(&["--profile", "carol", "--json", "whoami"])).unwrap();
    assert_eq!(me["user"]["role"], "member");
    assert_eq!(me["user"]["tenant_id"], f.acme.id.as_str());
}
