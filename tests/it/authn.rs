//! Authentication through the real gateway: every check with a token or key that must fail and
//! one that must pass; identity headers; JWKS rotation against a real local JWKS server.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::support::{tokens::*, *};

const ROUTES: &str = "  - name: jwt
    match: { path: /jwt/** }
    auth: [corp]
    authorization: { any_authenticated: true }
    upstream: app
  - name: key
    match: { path: /key/** }
    auth: [partners]
    authorization: { any_authenticated: true }
    upstream: app
  - name: either
    match: { path: /either/** }
    auth: [corp, partners]
    authorization: { any_authenticated: true }
    upstream: app
  - name: open
    match: { path: /public/** }
    public: true
    upstream: app
";

/// `partners` keys: `key-a1`/`key-a2` (id partner-a, rotation), `key-old` (expired).
fn authentication(keys_yaml: &str) -> String {
    format!(
        "authentication:
  jwt:
    - name: corp
      issuer: https://idp.test
      audiences: [api]
      algorithms: [RS256, ES256, EdDSA]
      keys: {keys_yaml}
      max_lifetime: 1h
      leeway: 5s
      roles_claim: roles
      claim_headers: {{ tenant: x-auth-tenant }}
  api_keys:
    - name: partners
      keys:
        - {{ id: partner-a, sha256: {}, roles: [writer] }}
        - {{ id: partner-a, sha256: {} }}
        - {{ id: partner-b, sha256: {}, expires: \"2020-01-01T00:00:00Z\" }}
",
        digest("key-a1"),
        digest("key-a2"),
        digest("key-old")
    )
}

struct Setup {
    upstream: TestUpstream,
    gateway: TestGateway,
    ec: Signer,
    rsa: Signer,
    ed: Signer,
}

async fn setup() -> Setup {
    let (ec, rsa, ed) = (Signer::ec("ec-1"), Signer::rsa("rsa-1"), Signer::ed("ed-1"));
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&ec, &rsa, &ed])).unwrap();
    let yaml = format!(
        "{}{}",
        config_with(&[upstream.url()], "", ROUTES),
        authentication("{ jwks_file: jwks.json }")
    );
    let loaded = load_yaml(&yaml, dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    Setup {
        upstream,
        gateway: TestGateway {
            gateway: Some(gateway),
            addr,
            dir,
        },
        ec,
        rsa,
        ed,
    }
}

/// A gateway with one ES256 provider `corp` (keys: `signer` in a JWKS file; `options`: more of
/// the provider's YAML lines, indented by six spaces) guarding `/jwt/**`, and an echo upstream.
/// `files` are written next to the config first.
async fn one_provider_gateway(
    signer: &Signer,
    options: &str,
    files: &[(&str, &[u8])],
) -> (TestUpstream, TestGateway) {
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&[signer])).unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let yaml = format!(
        "{}authentication:\n  jwt:\n    - name: corp\n      algorithms: [ES256]\n      keys: {{ jwks_file: jwks.json }}\n{options}",
        config_with(&[upstream.url()], "", "  - name: jwt\n    match: { path: /jwt/** }\n    auth: [corp]\n    authorization:\n      any_authenticated: true\n    upstream: app\n")
    );
    let loaded = load_yaml(&yaml, dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    let gateway = TestGateway {
        gateway: Some(gateway),
        addr,
        dir,
    };
    (upstream, gateway)
}

async fn call(gateway: &TestGateway, path: &str, headers: &[(&str, &str)]) -> TestResponse {
    let mut request = Request::get(gateway.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(request.body(Full::<Bytes>::default()).unwrap()).await
}

async fn bearer(gateway: &TestGateway, token: &str) -> TestResponse {
    call(
        gateway,
        "/jwt/x",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

#[tokio::test]
async fn valid_tokens_of_every_key_type_pass_and_carry_the_identity_upstream() {
    let s = setup().await;
    for signer in [&s.ec, &s.rsa, &s.ed] {
        let token = signer.sign(&claims("alice"));
        let response = bearer(&s.gateway, &token).await;
        assert_eq!(response.status, 200, "{:?}: {}", signer.alg, response.body);
        let seen = s.upstream.last().headers;
        assert_eq!(seen["x-auth-subject"], "alice");
        assert_eq!(seen["x-auth-method"], "jwt");
        assert_eq!(seen["x-auth-provider"], "corp");
        assert_eq!(seen["x-auth-issuer"], "https://idp.test");
        assert_eq!(seen["x-auth-roles"], "reader");
        assert_eq!(seen["x-auth-tenant"], "acme");
        assert!(
            seen.contains_key("authorization"),
            "the token is forwarded by default"
        );
    }
    // the same token again (served from the verification cache) still passes
    let token = s.ec.sign(&claims("bob"));
    for _ in 0..3 {
        assert_eq!(bearer(&s.gateway, &token).await.status, 200);
    }
}

#[tokio::test]
async fn requests_without_credentials_get_401_with_a_challenge_and_never_reach_the_upstream() {
    let s = setup().await;
    for headers in [
        vec![],
        vec![("authorization", "Basic dXNlcjpwYXNz")],
        vec![("authorization", "Bearer ")],
    ] {
        let response = call(&s.gateway, "/jwt/x", &headers).await;
        assert_eq!(response.status, 401, "{headers:?}");
        assert_eq!(
            response.headers["www-authenticate"],
            "Bearer realm=\"portcullis\""
        );
        assert_eq!(response.json()["error"], "unauthorized");
    }
    let response = call(&s.gateway, "/key/x", &[]).await;
    assert_eq!(response.status, 401);
    assert_eq!(
        response.headers["www-authenticate"],
        "ApiKey realm=\"portcullis\""
    );
    assert_eq!(s.upstream.hits(), 0);
}

#[tokio::test]
async fn every_kind_of_bad_token_is_refused() {
    let s = setup().await;
    let good = claims("mallory");
    let now = now();
    let attacker = Signer::ec("ec-1"); // same kid, different key
    let ec_header = json!({"alg": "ES256", "typ": "JWT", "kid": "ec-1"});
    let valid = s.ec.sign(&good);
    let parts: Vec<&str> = valid.split('.').collect();
    let with = |changes: Value| {
        let mut c = good.clone();
        for (k, v) in changes.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let mut tampered_claims = good.clone();
    tampered_claims["sub"] = json!("admin");
    let cases: Vec<(&str, String)> = vec![
        ("forged signature", attacker.sign(&good)),
        (
            "alg none",
            handmade(&json!({"alg": "none", "typ": "JWT"}), &good, b""),
        ),
        ("alg None", handmade(&json!({"alg": "None"}), &good, b"")),
        (
            "alg NONE",
            handmade(&json!({"alg": "NONE", "kid": "ec-1"}), &good, b""),
        ),
        ("alg nOnE", handmade(&json!({"alg": "nOnE"}), &good, b"sig")),
        (
            "HS256 with the RSA public key as secret",
            hs256(
                &json!({"alg": "HS256", "kid": "rsa-1"}),
                &good,
                s.rsa.public_pem.as_bytes(),
            ),
        ),
        (
            "HS256 with the EC public key as secret",
            hs256(
                &json!({"alg": "HS256", "kid": "ec-1"}),
                &good,
                s.ec.public_pem.as_bytes(),
            ),
        ),
        ("embedded jwk", {
            let mut header = attacker.header();
            header.kid = None;
            header.jwk = Some(serde_json::from_value(attacker.jwk.clone()).unwrap());
            attacker.sign_with(header, &good)
        }),
        ("jku to an attacker's keys", {
            let mut header = attacker.header();
            header.jku = Some("https://attacker.example/jwks.json".into());
            attacker.sign_with(header, &good)
        }),
        ("x5u header", {
            let mut header = attacker.header();
            header.x5u = Some("https://attacker.example/cert.pem".into());
            attacker.sign_with(header, &good)
        }),
        ("unknown kid", {
            let mut header = s.ec.header();
            header.kid = Some("no-such-key".into());
            s.ec.sign_with(header, &good)
        }),
        ("kid path trick", {
            let mut header = attacker.header();
            header.kid = Some("../../../../dev/null".into());
            attacker.sign_with(header, &good)
        }),
        (
            "EC key used for RS256",
            handmade(&json!({"alg": "RS256", "kid": "ec-1"}), &good, b"x"),
        ),
        ("RS token claiming the EC kid", {
            let mut header = s.rsa.header();
            header.kid = Some("ec-1".into());
            s.rsa.sign_with(header, &good)
        }),
        (
            "expired",
            s.ec.sign(&with(json!({"exp": now - 60, "iat": now - 600}))),
        ),
        ("not yet valid", s.ec.sign(&with(json!({"nbf": now + 300})))),
        (
            "issued in the future",
            s.ec.sign(&with(json!({"iat": now + 300, "exp": now + 900}))),
        ),
        (
            "wrong issuer",
            s.ec.sign(&with(json!({"iss": "https://evil.test"}))),
        ),
        (
            "wrong audience",
            s.ec.sign(&with(json!({"aud": "other-api"}))),
        ),
        (
            "no exp",
            s.ec.sign(&{
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("exp");
                c
            }),
        ),
        (
            "lifetime above the maximum",
            s.ec.sign(&with(json!({"iat": now, "exp": now + 7200}))),
        ),
        (
            "no subject",
            s.ec.sign(&{
                let mut c = good.clone();
                c.as_object_mut().unwrap().remove("sub");
                c
            }),
        ),
        (
            "tampered payload",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(tampered_claims.to_string().as_bytes()),
                parts[2]
            ),
        ),
        ("truncated", format!("{}.{}", parts[0], parts[1])),
        ("extra segment", format!("{valid}.{}", parts[2])),
        (
            "bad base64",
            format!("{}.{}!!.{}", parts[0], parts[1], parts[2]),
        ),
        ("garbage", "not-a-token".into()),
        ("unknown critical header", {
            let mut header = ec_header.clone();
            header["crit"] = json!(["exp-ext"]);
            header["exp-ext"] = json!(true);
            handmade(&header, &good, b"sig")
        }),
    ];
    for (name, token) in &cases {
        let response = bearer(&s.gateway, token).await;
        assert_eq!(response.status, 401, "{name} must be refused");
        assert_eq!(
            response.headers["www-authenticate"],
            "Bearer realm=\"portcullis\", error=\"invalid_token\"",
            "{name}"
        );
        assert!(
            !response.body.contains("expired") && !response.body.contains("signature"),
            "no detail leaks: {}",
            response.body
        );
    }
    // the crit case signed for real is refused too
    let mut crit = s.ec.header();
    crit.crit = Some(vec!["b64".into()]);
    assert_eq!(
        bearer(&s.gateway, &s.ec.sign_with(crit, &good))
            .await
            .status,
        401
    );
    assert_eq!(s.upstream.hits(), 0, "no bad token reached the upstream");
    // two Authorization headers are ambiguous
    let response = call(
        &s.gateway,
        "/jwt/x",
        &[
            ("authorization", &format!("Bearer {valid}")),
            ("authorization", &format!("Bearer {valid}")),
        ],
    )
    .await;
    assert_eq!(response.status, 401);
    // and the good one passes
    assert_eq!(bearer(&s.gateway, &valid).await.status, 200);
}

#[tokio::test]
async fn identity_headers_from_clients_are_always_stripped() {
    let s = setup().await;
    let spoof = [
        ("x-auth-subject", "admin"),
        ("x-auth-roles", "admin"),
        ("x-auth-tenant", "evil"),
        ("x-auth-method", "jwt"),
    ];
    let response = call(&s.gateway, "/public/x", &spoof).await;
    assert_eq!(response.status, 200);
    let seen = s.upstream.last().headers;
    for (name, _) in spoof {
        assert!(
            !seen.contains_key(name),
            "{name} reached the upstream of a public route"
        );
    }
    let token = s.ec.sign(&claims("alice"));
    let mut headers = spoof.to_vec();
    let auth = format!("Bearer {token}");
    headers.push(("authorization", &auth));
    assert_eq!(call(&s.gateway, "/jwt/x", &headers).await.status, 200);
    let seen = s.upstream.last().headers;
    assert_eq!(seen["x-auth-subject"], "alice");
    assert_eq!(seen["x-auth-tenant"], "acme");
    assert_eq!(seen.get_all("x-auth-subject").iter().count(), 1);

    // a `Connection` header naming identity headers cannot remove them either
    let auth = format!("Bearer {token}");
    let response = call(
        &s.gateway,
        "/jwt/x",
        &[
            ("authorization", &auth),
            ("connection", "x-auth-subject, x-auth-roles, x-auth-tenant"),
        ],
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = s.upstream.last().headers;
    assert_eq!(seen["x-auth-subject"], "alice");
    assert_eq!(seen["x-auth-roles"], "reader");
    assert_eq!(seen["x-auth-tenant"], "acme");
}

#[tokio::test]
async fn credentials_of_a_routes_other_methods_do_not_travel_upstream() {
    let s = setup().await;
    let token = s.ec.sign(&claims("gina"));
    let auth = format!("Bearer {token}");
    let response = call(
        &s.gateway,
        "/either/x",
        &[("authorization", &auth), ("x-api-key", "key-a1")],
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = s.upstream.last().headers;
    assert_eq!(
        seen["x-auth-subject"], "gina",
        "the first method (JWT) decided"
    );
    assert!(
        !seen.contains_key("x-api-key"),
        "the API key never travels on"
    );
}

#[tokio::test]
async fn api_keys_authenticate_rotate_expire_and_never_reach_the_upstream() {
    let s = setup().await;
    for key in ["key-a1", "key-a2"] {
        let response = call(&s.gateway, "/key/x", &[("x-api-key", key)]).await;
        assert_eq!(response.status, 200, "{key}");
        let seen = s.upstream.last().headers;
        assert_eq!(seen["x-auth-subject"], "partner-a");
        assert_eq!(seen["x-auth-method"], "api_key");
        assert!(
            !seen.contains_key("x-api-key"),
            "the key itself is not forwarded"
        );
    }
    assert_eq!(
        s.upstream.last().headers.get("x-auth-roles"),
        None,
        "key-a2 has no roles"
    );
    for (key, why) in [("key-old", "expired"), ("nope", "unknown"), ("", "empty")] {
        let response = call(&s.gateway, "/key/x", &[("x-api-key", key)]).await;
        assert_eq!(response.status, 401, "{why}");
        assert_eq!(
            response.headers["www-authenticate"],
            "ApiKey realm=\"portcullis\""
        );
    }
    // a route accepting either method takes either
    assert_eq!(
        call(&s.gateway, "/either/x", &[("x-api-key", "key-a1")])
            .await
            .status,
        200
    );
    let token = s.ed.sign(&claims("carol"));
    assert_eq!(
        call(
            &s.gateway,
            "/either/x",
            &[("authorization", &format!("Bearer {token}"))]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        call(&s.gateway, "/either/x", &[("x-api-key", "nope")])
            .await
            .status,
        401
    );
}

/// A fake identity provider serving one JWKS document; the caller swaps `(status, body)`.
async fn switchable_idp(
    status: u16,
    body: String,
) -> (
    std::sync::Arc<std::sync::Mutex<(u16, String)>>,
    TestUpstream,
) {
    let document = std::sync::Arc::new(std::sync::Mutex::new((status, body)));
    let served = document.clone();
    let idp = TestUpstream::start(move |_| {
        let (status, body) = served.lock().unwrap().clone();
        Reply {
            status,
            body: Bytes::from(body),
            delay: Duration::ZERO,
            headers: vec![("content-type", "application/json".into())],
        }
    })
    .await;
    (document, idp)
}

#[tokio::test]
async fn jwks_rotation_and_unknown_kids_are_handled_without_a_restart() {
    let old = Signer::ec("old");
    let new = Signer::ec("new");
    let (document, idp) = switchable_idp(200, jwks(&[&old])).await;
    let upstream = TestUpstream::echo().await;
    let keys = format!("{{ jwks_url: {{ url: \"http://{}/jwks.json\", refresh_interval: 400ms, min_refresh_interval: 200ms }} }}", idp.addr);
    let yaml = format!(
        "{}{}",
        config_with(&[upstream.url()], "", ROUTES),
        authentication(&keys)
    );
    let gateway = TestGateway::start(&yaml).await;
    let fetches = || idp.received().len();
    assert!(
        eventually(Duration::from_secs(5), || fetches() >= 1).await,
        "fetched at start"
    );
    assert_eq!(bearer(&gateway, &old.sign(&claims("a"))).await.status, 200);

    // the IdP starts signing with a new key: its unknown kid triggers a refresh right away
    *document.lock().unwrap() = (200, jwks(&[&old, &new]));
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(bearer(&gateway, &new.sign(&claims("b"))).await.status, 200);
    let remembered = old.sign(&claims("c"));
    assert_eq!(
        bearer(&gateway, &remembered).await.status,
        200,
        "old and new overlap"
    );

    // a failing IdP keeps the last good keys
    *document.lock().unwrap() = (500, String::new());
    let before = fetches();
    assert!(eventually(Duration::from_secs(5), || fetches() >= before + 2).await);
    assert_eq!(bearer(&gateway, &new.sign(&claims("d"))).await.status, 200);

    // the old key is retired: after the next scheduled refresh its tokens fail
    *document.lock().unwrap() = (200, jwks(&[&new]));
    let before = fetches();
    assert!(eventually(Duration::from_secs(5), || fetches() >= before + 2).await);
    assert_eq!(bearer(&gateway, &old.sign(&claims("e"))).await.status, 401);
    assert_eq!(
        bearer(&gateway, &remembered).await.status,
        401,
        "a cached verification dies with its key"
    );
    assert_eq!(bearer(&gateway, &new.sign(&claims("f"))).await.status, 200);

    // made-up kids cannot force a fetch storm
    let before = fetches();
    for i in 0..40 {
        let mut header = new.header();
        header.kid = Some(format!("random-{i}"));
        assert_eq!(
            bearer(&gateway, &new.sign_with(header, &claims("g")))
                .await
                .status,
            401
        );
    }
    let extra = fetches() - before;
    assert!(extra <= 4, "{extra} fetches for 40 unknown kids");
}

#[tokio::test]
async fn tokens_in_a_query_parameter_are_removed_before_forwarding() {
    let ec = Signer::ec("q");
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&ec])).unwrap();
    let yaml = format!(
        "{}{}",
        config_with(&[upstream.url()], "", ROUTES),
        authentication("{ jwks_file: jwks.json }\n      token_source: { query: access_token }\n      forward_token: false")
    );
    let loaded = load_yaml(&yaml, dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    let token = ec.sign(&claims("dave"));
    let response = send(
        Request::get(format!("http://{addr}/jwt/x?a=1&access_token={token}&b=2"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(upstream.last().path_and_query, "/jwt/x?a=1&b=2");
    drop(gateway);
}

#[tokio::test]
async fn hs256_secrets_pem_keys_and_cookie_tokens_work() {
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let ec = Signer::ec("ignored");
    std::fs::write(dir.path().join("public.pem"), &ec.public_pem).unwrap();
    let secret = "a-shared-secret-of-at-least-32-bytes!!";
    let yaml = format!(
        "{}authentication:
  jwt:
    - name: hs
      algorithms: [HS256]
      keys: {{ secret: \"{secret}\" }}
    - name: pem
      algorithms: [ES256]
      keys: {{ public_key_pem: public.pem }}
      token_source: {{ cookie: session }}
",
        config_with(
            &[upstream.url()],
            "",
            "  - name: hs\n    match: { path: /hs }\n    auth: [hs]\n    authorization:\n      any_authenticated: true\n    upstream: app\n  - name: pem\n    match: { path: /pem }\n    auth: [pem]\n    authorization:\n      any_authenticated: true\n    upstream: app\n"
        )
    );
    let loaded = load_yaml(&yaml, dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    let get = |path: &str, header: (&str, String)| {
        send(
            Request::get(format!("http://{addr}{path}"))
                .header(header.0, header.1)
                .body(Full::default())
                .unwrap(),
        )
    };
    let mut good = claims("erin");
    good.as_object_mut().unwrap().remove("aud");
    let hs_token = hs256(
        &json!({"alg": "HS256", "typ": "JWT"}),
        &good,
        secret.as_bytes(),
    );
    assert_eq!(
        get("/hs", ("authorization", format!("Bearer {hs_token}")))
            .await
            .status,
        200
    );
    let wrong = hs256(
        &json!({"alg": "HS256"}),
        &good,
        b"another-secret-that-is-also-32-bytes-long",
    );
    assert_eq!(
        get("/hs", ("authorization", format!("Bearer {wrong}")))
            .await
            .status,
        401
    );
    // an ES token cannot pass an HS-only provider, and the other way round
    assert_eq!(
        get(
            "/hs",
            ("authorization", format!("Bearer {}", ec.sign(&good)))
        )
        .await
        .status,
        401
    );
    assert_eq!(
        get("/pem", ("cookie", format!("session={hs_token}")))
            .await
            .status,
        401
    );

    let pem_token = ec.sign(&good);
    assert_eq!(
        get(
            "/pem",
            ("cookie", format!("theme=dark; session={pem_token}"))
        )
        .await
        .status,
        200
    );
    assert_eq!(
        get("/pem", ("authorization", format!("Bearer {pem_token}")))
            .await
            .status,
        401,
        "only the cookie counts"
    );
    drop(gateway);
}

#[tokio::test]
async fn one_time_tokens_cannot_be_replayed() {
    let ec = Signer::ec("once");
    let (upstream, gateway) = one_provider_gateway(&ec, "      one_time_use: true\n", &[]).await;
    let addr = gateway.addr;
    let get = |token: String| {
        send(
            Request::get(format!("http://{addr}/jwt/x"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::default())
                .unwrap(),
        )
    };
    let mut once = claims("frank");
    once["jti"] = json!("a6f1c2d0");
    let token = ec.sign(&once);
    assert_eq!(get(token.clone()).await.status, 200, "first use");
    let replay = get(token).await;
    assert_eq!(replay.status, 401, "second use is a replay");
    assert_eq!(
        replay.headers["www-authenticate"],
        "Bearer realm=\"portcullis\", error=\"invalid_token\""
    );
    once["jti"] = json!("b7e2d3e1");
    assert_eq!(get(ec.sign(&once)).await.status, 200, "a new jti is fine");
    assert_eq!(
        get(ec.sign(&claims("no-jti"))).await.status,
        401,
        "no jti, no one-time use"
    );
    assert_eq!(upstream.hits(), 2);
    drop(gateway);
}

#[tokio::test]
async fn a_cookie_token_not_to_be_forwarded_is_removed_and_other_cookies_stay() {
    let ec = Signer::ec("c");
    let (upstream, gateway) = one_provider_gateway(
        &ec,
        "      token_source: { cookie: session }\n      forward_token: false\n",
        &[],
    )
    .await;
    let addr = gateway.addr;
    let token = ec.sign(&claims("hank"));
    let response = send(
        Request::get(format!("http://{addr}/jwt/x"))
            .header("cookie", format!("theme=dark; session={token}; lang=en"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(upstream.last().headers["cookie"], "theme=dark; lang=en");
    drop(gateway);
}

#[tokio::test]
async fn identity_header_lookalikes_never_reach_the_upstream() {
    let s = setup().await;
    let lookalikes = [
        ("x_auth_subject", "admin"),
        ("X_Auth_Roles", "admin"),
        ("x-auth_tenant", "evil"),
    ];
    assert_eq!(call(&s.gateway, "/public/x", &lookalikes).await.status, 200);
    let seen = s.upstream.last().headers;
    for (name, _) in lookalikes {
        assert!(!seen.contains_key(name), "{name} reached the upstream");
    }
    let token = s.ec.sign(&claims("alice"));
    let auth = format!("Bearer {token}");
    let mut headers = lookalikes.to_vec();
    headers.push(("authorization", &auth));
    assert_eq!(call(&s.gateway, "/jwt/x", &headers).await.status, 200);
    let seen = s.upstream.last().headers;
    assert!(!seen.contains_key("x_auth_subject"));
    assert_eq!(seen["x-auth-subject"], "alice");
}

#[tokio::test]
async fn a_reload_keeps_the_keys_of_an_identity_provider_that_is_down() {
    let signer = Signer::ec("k1");
    let document = jwks(&[&signer]);
    let idp = TestUpstream::start(move |_| {
        Reply::ok(&document).header("content-type", "application/json")
    })
    .await;
    let upstream = TestUpstream::echo().await;
    let keys = format!(
        "{{ jwks_url: {{ url: \"http://{}/jwks.json\" }} }}",
        idp.addr
    );
    let yaml = format!(
        "{}{}",
        config_with(&[upstream.url()], "", ROUTES),
        authentication(&keys)
    );
    let mut gateway = TestGateway::start(&yaml).await;
    assert_eq!(
        bearer(&gateway, &signer.sign(&claims("a"))).await.status,
        200
    );
    idp.stop();
    gateway.reload(&yaml).unwrap();
    assert_eq!(
        bearer(&gateway, &signer.sign(&claims("b"))).await.status,
        200,
        "the last good keys survive a reload while the IdP is down"
    );
}

#[tokio::test]
async fn a_one_time_token_is_refused_until_it_no_longer_verifies() {
    let ec = Signer::ec("once");
    let (_upstream, gateway) =
        one_provider_gateway(&ec, "      one_time_use: true\n      leeway: 5s\n", &[]).await;
    let addr = gateway.addr;
    let get = |token: String| {
        send(
            Request::get(format!("http://{addr}/jwt/x"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::default())
                .unwrap(),
        )
    };
    let mut soon = claims("ivy");
    soon["jti"] = json!("short-lived");
    soon["exp"] = json!(now() + 1);
    let token = ec.sign(&soon);
    assert_eq!(get(token.clone()).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // past exp but within the leeway the signature still verifies: the jti must still be remembered
    for _ in 0..3 {
        assert_eq!(get(token.clone()).await.status, 401);
    }
    drop(gateway);
}

/// A fake authorization server: tokens `good-*` are active (scope `read write`), `gone` is
/// inactive, `slow` answers after 3 s; wrong client credentials get 401.
async fn fake_authorization_server() -> TestUpstream {
    TestUpstream::start(|request| {
        let expected = format!(
            "Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "gateway:s3cret%2Bpw")
        );
        if request.headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
            return Reply::status(401);
        }
        let body = String::from_utf8_lossy(&request.body).into_owned();
        let token = body
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .unwrap_or_default()
            .to_owned();
        let answer = if token.starts_with("good-") {
            json!({"active": true, "sub": token, "scope": "read write", "exp": now() + 300, "aud": "api"})
        } else {
            json!({"active": false})
        };
        let reply = Reply::ok(&answer.to_string()).header("content-type", "application/json");
        if token == "slow" {
            reply.delayed(Duration::from_secs(3))
        } else {
            reply
        }
    })
    .await
}

fn introspection_config(upstream: &TestUpstream, server: &TestUpstream, secret: &str) -> String {
    format!(
        "{}authentication:\n  introspection:\n    - name: idp\n      endpoint: http://{}/introspect\n      client_id: gateway\n      client_secret: \"{secret}\"\n      timeout: 500ms\n      audiences: [api]\n",
        config_with(&[upstream.url()], "", "  - name: opaque\n    match: { path: /opaque/** }\n    auth: [idp]\n    authorization:\n      any_authenticated: true\n    upstream: app\n"),
        server.addr
    )
}

#[tokio::test]
async fn opaque_tokens_are_introspected_cached_and_fail_closed() {
    let server = fake_authorization_server().await;
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&introspection_config(&upstream, &server, "s3cret+pw")).await;
    let get = |token: &str| {
        let auth = format!("Bearer {token}");
        let gateway = &gateway;
        async move { call(gateway, "/opaque/x", &[("authorization", &auth)]).await }
    };

    let response = get("good-1").await;
    assert_eq!(response.status, 200, "{}", response.body);
    let seen = upstream.last().headers;
    assert_eq!(seen["x-auth-subject"], "good-1");
    assert_eq!(seen["x-auth-method"], "introspection");
    assert_eq!(seen["x-auth-roles"], "read,write");
    // the answer is remembered: the server is asked once
    let asked = server.hits();
    assert_eq!(get("good-1").await.status, 200);
    assert_eq!(server.hits(), asked);

    // inactive tokens are refused, and refusals are not remembered as success
    assert_eq!(get("gone").await.status, 401);
    assert_eq!(get("gone").await.status, 401);
    assert_eq!(
        server.hits(),
        asked + 2,
        "errors are asked again, never cached"
    );

    // a slow server fails closed within the timeout
    let started = std::time::Instant::now();
    assert_eq!(get("slow").await.status, 401);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(call(&gateway, "/opaque/x", &[]).await.status, 401);

    // a server that is down fails closed too
    server.stop();
    assert_eq!(get("good-2").await.status, 401);
}

#[tokio::test]
async fn wrong_client_credentials_at_the_authorization_server_refuse_every_token() {
    let server = fake_authorization_server().await;
    let upstream = TestUpstream::echo().await;
    let gateway = TestGateway::start(&introspection_config(&upstream, &server, "wrong")).await;
    let response = call(&gateway, "/opaque/x", &[("authorization", "Bearer good-3")]).await;
    assert_eq!(response.status, 401);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn keys_are_found_through_openid_connect_discovery() {
    let signer = Signer::ec("oidc-1");
    let document = jwks(&[&signer]);
    let idp = TestUpstream::start(move |request| {
        if request.path_and_query == "/realm/.well-known/openid-configuration" {
            let host = request.headers["host"].to_str().unwrap().to_owned();
            Reply::ok(&json!({"issuer": format!("http://{host}/realm"), "jwks_uri": format!("http://{host}/realm/certs")}).to_string())
        } else if request.path_and_query == "/realm/certs" {
            Reply::ok(&document)
        } else {
            Reply::status(404)
        }
    })
    .await;
    let issuer = format!("http://{}/realm", idp.addr);
    let upstream = TestUpstream::echo().await;
    let yaml = format!(
        "{}authentication:\n  jwt:\n    - name: corp\n      algorithms: [ES256]\n      keys: {{ oidc_issuer: {{ issuer: \"{issuer}\" }} }}\n",
        config_with(&[upstream.url()], "", "  - name: jwt\n    match: { path: /jwt/** }\n    auth: [corp]\n    authorization:\n      any_authenticated: true\n    upstream: app\n")
    );
    let gateway = TestGateway::start(&yaml).await;
    let mut good = claims("kim");
    good["iss"] = json!(issuer);
    assert_eq!(bearer(&gateway, &signer.sign(&good)).await.status, 200);
    // the discovered issuer is required by default
    assert_eq!(
        bearer(&gateway, &signer.sign(&claims("lee"))).await.status,
        401
    );
    assert!(idp
        .received()
        .iter()
        .any(|r| r.path_and_query == "/realm/certs"));
}

#[tokio::test]
async fn revoked_tokens_and_subjects_are_refused_and_the_admin_api_needs_its_token() {
    let s = setup().await;
    let mut gateway = s.gateway;
    let yaml = std::fs::read_to_string(gateway.dir.path().join("portcullis.yaml"))
        .unwrap()
        .replace(
            "admin:\n  enabled: false\n",
            "admin:\n  enabled: false\n  token: \"adm1n-t0ken-for-tests\"\n",
        );
    gateway.reload(&yaml).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = listener.local_addr().unwrap();
    tokio::spawn(portcullis::admin::serve(
        listener,
        gateway.gateway().state(),
    ));
    let admin_call = |method: &str, path: &str, token: Option<&str>, body: &str| {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{admin}{path}"));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        send(
            request
                .body(Full::new(Bytes::from(body.to_owned())))
                .unwrap(),
        )
    };

    let mut c = claims("alice");
    c["jti"] = json!("jti-1");
    let token = s.ec.sign(&c);
    assert_eq!(bearer(&gateway, &token).await.status, 200);

    // the probes are open; everything else needs the token
    assert_eq!(admin_call("GET", "/healthz", None, "").await.status, 200);
    assert_eq!(admin_call("GET", "/config", None, "").await.status, 401);
    assert_eq!(
        admin_call(
            "POST",
            "/revocations",
            Some("wrong"),
            r#"{"subject":"alice"}"#
        )
        .await
        .status,
        401
    );
    assert_eq!(
        bearer(&gateway, &token).await.status,
        200,
        "nothing was revoked"
    );

    let good = Some("adm1n-t0ken-for-tests");
    assert_eq!(
        admin_call("POST", "/revocations", good, r#"{"jti":"jti-1"}"#)
            .await
            .status,
        204
    );
    assert_eq!(
        bearer(&gateway, &token).await.status,
        401,
        "revoked jti (even from the cache)"
    );
    let other = s.ec.sign(&claims("alice"));
    assert_eq!(
        bearer(&gateway, &other).await.status,
        200,
        "another token of the same subject"
    );
    assert_eq!(
        admin_call("POST", "/revocations", good, r#"{"subject":"alice"}"#)
            .await
            .status,
        204
    );
    assert_eq!(
        bearer(&gateway, &other).await.status,
        401,
        "revoked subject"
    );
    let listed = admin_call("GET", "/revocations", good, "").await;
    assert_eq!(
        listed.json(),
        json!({"token_ids": ["jti-1"], "subjects": ["alice"]})
    );
    assert_eq!(
        admin_call("DELETE", "/revocations?subject=alice", good, "")
            .await
            .status,
        204
    );
    assert_eq!(bearer(&gateway, &other).await.status, 200);
    assert_eq!(
        admin_call("POST", "/revocations", good, r#"{"nothing":1}"#)
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn tokens_bound_to_something_the_gateway_cannot_check_are_refused() {
    let s = setup().await;
    for cnf in [
        json!({"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}),
        json!({"x5t#S256": 42}),
        json!("bound"),
    ] {
        let mut c = claims("nora");
        c["cnf"] = cnf.clone();
        assert_eq!(
            bearer(&s.gateway, &s.ec.sign(&c)).await.status,
            401,
            "{cnf}"
        );
    }
    // a certificate-bound token over a connection without that certificate
    let mut c = claims("nora");
    c["cnf"] = json!({"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"});
    assert_eq!(bearer(&s.gateway, &s.ec.sign(&c)).await.status, 401);
    assert_eq!(s.upstream.hits(), 0);
}

/// A token for `subject` issued by `issuer` and bound (`cnf.jkt`) to `holder`'s key.
pub(crate) fn dpop_bound_token(issuer: &Signer, holder: &Signer, subject: &str) -> String {
    let jkt = portcullis::policy::authn::jwk_thumbprint(
        &serde_json::from_value(holder.jwk.clone()).unwrap(),
    )
    .unwrap();
    let mut bound = claims(subject);
    bound["cnf"] = json!({ "jkt": jkt });
    issuer.sign(&bound)
}

/// A DPoP proof (RFC 9449) signed by `key` for `method url`, bound to `token`.
pub(crate) fn dpop_proof(
    key: &Signer,
    method: &str,
    url: &str,
    token: &str,
    iat: i64,
    jti: &str,
) -> String {
    let mut header = jsonwebtoken::Header::new(key.alg);
    header.typ = Some("dpop+jwt".into());
    header.jwk = Some(serde_json::from_value(key.jwk.clone()).unwrap());
    let ath = b64(&portcullis::policy::authn::sha256(token.as_bytes()));
    key.sign_with(
        header,
        &json!({"htm": method, "htu": url, "iat": iat, "jti": jti, "ath": ath}),
    )
}

#[tokio::test]
async fn dpop_bound_tokens_need_a_fresh_proof_by_their_key_for_this_request() {
    let issuer = Signer::ec("iss");
    let holder = Signer::ec("holder");
    let (upstream, gateway) =
        one_provider_gateway(&issuer, "      dpop: { max_age: 30s }\n", &[]).await;
    let addr = gateway.addr;
    let url = format!("http://{addr}/jwt/orders");
    let token = dpop_bound_token(&issuer, &holder, "olga");
    let get = |scheme: &str, proof: Option<String>| {
        let mut request =
            Request::get(url.clone()).header("authorization", format!("{scheme} {token}"));
        if let Some(proof) = proof {
            request = request.header("dpop", proof);
        }
        send(request.body(Full::default()).unwrap())
    };
    let now = now();
    assert_eq!(
        get(
            "DPoP",
            Some(dpop_proof(&holder, "GET", &url, &token, now, "p1"))
        )
        .await
        .status,
        200
    );
    for (name, proof) in [
        ("no proof", None),
        (
            "replayed proof",
            Some(dpop_proof(&holder, "GET", &url, &token, now, "p1")),
        ),
        (
            "another method",
            Some(dpop_proof(&holder, "POST", &url, &token, now, "p2")),
        ),
        (
            "another URL",
            Some(dpop_proof(
                &holder,
                "GET",
                &format!("http://{addr}/jwt/other"),
                &token,
                now,
                "p3",
            )),
        ),
        (
            "another token",
            Some(dpop_proof(&holder, "GET", &url, "other-token", now, "p4")),
        ),
        (
            "another key",
            Some(dpop_proof(
                &Signer::ec("thief"),
                "GET",
                &url,
                &token,
                now,
                "p5",
            )),
        ),
        (
            "stale proof",
            Some(dpop_proof(&holder, "GET", &url, &token, now - 300, "p6")),
        ),
    ] {
        assert_eq!(get("DPoP", proof).await.status, 401, "{name}");
    }
    // a DPoP-bound token sent as a plain bearer token is refused even with a proof
    assert_eq!(
        get(
            "Bearer",
            Some(dpop_proof(&holder, "GET", &url, &token, now, "p7"))
        )
        .await
        .status,
        401
    );
    assert_eq!(upstream.hits(), 1);
    drop(gateway);
}

/// (private PKCS#8 PEM, public SPKI PEM)
fn rsa_encryption_key() -> (String, String) {
    use aws_lc_rs::{encoding::AsDer, signature::KeyPair};
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let private = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'static>>::as_der(&pair).unwrap();
    let public = pair.public_key().as_der().unwrap();
    (
        pem("PRIVATE KEY", private.as_ref()),
        pem("PUBLIC KEY", public.as_ref()),
    )
}

fn ec_encryption_key() -> (String, String) {
    use aws_lc_rs::{encoding::AsDer, signature::KeyPair};
    let pair = aws_lc_rs::signature::EcdsaKeyPair::generate(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
    )
    .unwrap();
    let private = pair.to_pkcs8v1().unwrap();
    let public = pair.public_key().as_der().unwrap();
    (
        pem("PRIVATE KEY", private.as_ref()),
        pem("PUBLIC KEY", public.as_ref()),
    )
}

fn encrypt(inner: &str, alg: &str, public_pem: &str) -> String {
    let mut header = josekit::jwe::JweHeader::new();
    header.set_content_encryption("A256GCM");
    header.set_content_type("JWT");
    let encrypter: Box<dyn josekit::jwe::JweEncrypter> = match alg {
        "RSA-OAEP-256" => Box::new(
            josekit::jwe::RSA_OAEP_256
                .encrypter_from_pem(public_pem)
                .unwrap(),
        ),
        "RSA-OAEP" => Box::new(
            josekit::jwe::RSA_OAEP
                .encrypter_from_pem(public_pem)
                .unwrap(),
        ),
        // deprecated for good reason: the test makes such a token to see it refused
        #[allow(deprecated)]
        "RSA1_5" => Box::new(josekit::jwe::RSA1_5.encrypter_from_pem(public_pem).unwrap()),
        "ECDH-ES" => Box::new(
            josekit::jwe::ECDH_ES
                .encrypter_from_pem(public_pem)
                .unwrap(),
        ),
        "ECDH-ES+A256KW" => Box::new(
            josekit::jwe::ECDH_ES_A256KW
                .encrypter_from_pem(public_pem)
                .unwrap(),
        ),
        other => panic!("{other}"),
    };
    josekit::jwe::serialize_compact(inner.as_bytes(), &header, encrypter.as_ref()).unwrap()
}

#[tokio::test]
async fn encrypted_tokens_are_decrypted_then_verified() {
    let signer = Signer::ec("sig");
    let (rsa_private, rsa_public) = rsa_encryption_key();
    let (ec_private, ec_public) = ec_encryption_key();
    let (_, stranger_public) = ec_encryption_key();
    let (upstream, gateway) = one_provider_gateway(
        &signer,
        "      decryption_keys: [rsa.pem, ec.pem]\n",
        &[
            ("rsa.pem", rsa_private.as_bytes()),
            ("ec.pem", ec_private.as_bytes()),
        ],
    )
    .await;
    let addr = gateway.addr;
    let get = |token: String| {
        send(
            Request::get(format!("http://{addr}/jwt/x"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::default())
                .unwrap(),
        )
    };
    let inner = signer.sign(&claims("pia"));
    for (alg, key) in [
        ("RSA-OAEP-256", &rsa_public),
        ("ECDH-ES+A256KW", &ec_public),
        ("ECDH-ES", &ec_public),
    ] {
        let response = get(encrypt(&inner, alg, key)).await;
        assert_eq!(response.status, 200, "{alg}");
        assert_eq!(upstream.last().headers["x-auth-subject"], "pia");
    }
    let good = encrypt(&inner, "RSA-OAEP-256", &rsa_public);
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    // flip the first ciphertext character (a whole byte's worth of bits, unlike the last one)
    let flipped = if parts[3].starts_with('A') { 'B' } else { 'A' };
    parts[3] = format!("{flipped}{}", &parts[3][1..]);
    let mut expired = claims("quinn");
    expired["exp"] = json!(now() - 100);
    expired["iat"] = json!(now() - 700);
    for (name, token) in [
        ("tampered ciphertext", parts.join(".")),
        (
            "encrypted to another key",
            encrypt(&inner, "ECDH-ES+A256KW", &stranger_public),
        ),
        (
            "RSA-OAEP with SHA-1",
            encrypt(&inner, "RSA-OAEP", &rsa_public),
        ),
        (
            "expired inner token",
            encrypt(&signer.sign(&expired), "RSA-OAEP-256", &rsa_public),
        ),
        (
            "forged inner token",
            encrypt(
                &Signer::ec("sig").sign(&claims("pia")),
                "RSA-OAEP-256",
                &rsa_public,
            ),
        ),
        (
            "unsigned inner token",
            encrypt(
                &handmade(&json!({"alg": "none"}), &claims("pia"), b""),
                "RSA-OAEP-256",
                &rsa_public,
            ),
        ),
        ("RSA1_5", encrypt(&inner, "RSA1_5", &rsa_public)),
        (
            "nested encryption",
            encrypt(&good, "RSA-OAEP-256", &rsa_public),
        ),
        ("garbage with five segments", "a.b.c.d.e".to_owned()),
    ] {
        assert_eq!(get(token).await.status, 401, "{name}");
    }
    drop(gateway);
}

#[tokio::test]
async fn api_keys_from_a_keys_file_are_reread_on_reload_and_a_broken_file_changes_nothing() {
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    let keys_path = dir.path().join("keys.yaml");
    std::fs::write(
        &keys_path,
        format!(
            "- {{ id: from-file, sha256: {}, roles: [reader] }}\n",
            digest("file-key-1")
        ),
    )
    .unwrap();
    let yaml = format!(
        "{}authentication:
  api_keys:
    - name: partners
      keys:
        - {{ id: inline, sha256: {} }}
      keys_file: keys.yaml
",
        config_with(
            &[upstream.url()],
            "",
            "  - name: key\n    match: { path: /key/** }\n    auth: [partners]\n    authorization:\n      any_authenticated: true\n    upstream: app\n"
        ),
        digest("inline-key")
    );
    let loaded = load_yaml(&yaml, dir.path());
    let started = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = started.local_addr("main").unwrap();
    let mut gateway = TestGateway {
        gateway: Some(started),
        addr,
        dir,
    };
    let status = move |key: &'static str| async move {
        let request = Request::get(format!("http://{addr}/key/x"))
            .header("x-api-key", key)
            .body(Full::<Bytes>::default())
            .unwrap();
        send(request).await.status
    };
    assert_eq!(status("inline-key").await, 200);
    assert_eq!(status("file-key-1").await, 200);
    assert_eq!(upstream.last().headers["x-auth-subject"], "from-file");
    assert_eq!(upstream.last().headers["x-auth-roles"], "reader");
    assert_eq!(status("file-key-2").await, 401);

    // a key-management job rotates the file; a reload picks it up
    std::fs::write(
        &keys_path,
        format!("- {{ id: from-file, sha256: {} }}\n", digest("file-key-2")),
    )
    .unwrap();
    gateway.reload(&yaml).unwrap();
    assert_eq!(status("file-key-2").await, 200);
    assert_eq!(
        status("file-key-1").await,
        401,
        "the rotated-out key is gone"
    );

    // a broken file is a config error naming the file; the running keys stay
    std::fs::write(&keys_path, "- { id: broken, sha256: not-hex }\n").unwrap();
    let error = gateway.reload(&yaml).unwrap_err().to_string();
    assert!(
        error.contains("authentication.api_keys[0].keys_file") && error.contains("keys.yaml"),
        "{error}"
    );
    std::fs::remove_file(&keys_path).unwrap();
    let error = gateway.reload(&yaml).unwrap_err().to_string();
    assert!(error.contains("keys.yaml"), "{error}");
    assert_eq!(status("file-key-2").await, 200);
    assert_eq!(status("inline-key").await, 200);
}

#[tokio::test]
async fn the_gateway_is_not_ready_until_its_jwks_has_been_fetched_once() {
    let signer = Signer::ec("k1");
    let (document, idp) = switchable_idp(503, String::new()).await;
    let upstream = TestUpstream::echo().await;
    let admin = free_port();
    let keys = format!(
        "{{ jwks_url: {{ url: \"http://{}/jwks.json\", refresh_interval: 1m, min_refresh_interval: 200ms }} }}",
        idp.addr
    );
    let port = free_port();
    let config = config_with(&[upstream.url()], "", ROUTES)
        .replace(
            "admin:\n  enabled: false\n",
            &format!("admin:\n  bind: 127.0.0.1:{admin}\n"),
        )
        .replace("bind: 127.0.0.1:0", &format!("bind: 127.0.0.1:{port}"));
    let yaml = format!("{config}{}", authentication(&keys));
    let process = GatewayProcess::start(&yaml, port);
    process.wait_for_port(admin);
    let readyz = || async {
        send(
            Request::get(format!("http://127.0.0.1:{admin}/readyz"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
    };
    let waiting = readyz().await;
    assert_eq!(waiting.status, 503, "the identity provider is down");
    assert_eq!(waiting.body, "not ready: waiting for JWKS keys\n");

    *document.lock().unwrap() = (200, jwks(&[&signer]));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while readyz().await.status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "ready once the keys arrive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = call_port(port, &signer.sign(&claims("rita"))).await;
    assert_eq!(response, 200);

    // once ready, a reload that adds a key set nobody can fetch does not take the gateway out
    // of service (that would take every replica out at once)
    let unreachable = format!(
        "  jwt:\n    - name: other\n      keys: {{ jwks_url: {{ url: \"http://127.0.0.1:{}/jwks.json\" }} }}\n",
        free_port()
    );
    let with_other = yaml.replacen("  jwt:\n", &unreachable, 1);
    assert_ne!(with_other, yaml);
    std::fs::write(&process.config, with_other).unwrap();
    process.signal("HUP");
    process.wait_for_log("config reloaded");
    assert_eq!(readyz().await.status, 200);
}

async fn call_port(port: u16, token: &str) -> u16 {
    let request = Request::get(format!("http://127.0.0.1:{port}/jwt/x"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    send(request).await.status
}

#[test]
fn a_key_set_with_only_a_keys_file_gets_no_empty_set_warning() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.yaml"), "[]\n").unwrap();
    let only_file = format!(
        "{}authentication:\n  api_keys:\n    - name: partners\n      keys_file: keys.yaml\n",
        config_with(
            &["http://127.0.0.1:9".to_owned()],
            "",
            "  - name: key\n    match: { path: /key/** }\n    auth: [partners]\n    authorization:\n      any_authenticated: true\n    upstream: app\n"
        )
    );
    let warnings = |yaml: &str| {
        load_yaml(yaml, dir.path())
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        !warnings(&only_file).contains("no keys"),
        "{}",
        warnings(&only_file)
    );
    let neither = only_file.replace("      keys_file: keys.yaml\n", "");
    assert!(
        warnings(&neither).contains("this key set has no keys"),
        "{}",
        warnings(&neither)
    );
}
