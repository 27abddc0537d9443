//! Authorization through the real gateway: deny by default, permissions by method and path, role
//! inclusion, route roles and scopes, conditions (tenant isolation), static assignments, the
//! external policy service, hot reload of roles.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;

use crate::support::{
    config_with, digest, send,
    tokens::{claims, jwks, Signer},
    TestGateway, TestResponse, TestUpstream,
};

/// API keys `key-<name>` for each `(name, roles, claims)`; the key id is the name.
fn api_keys(keys: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from("authentication:\n  api_keys:\n    - name: keys\n      keys:\n");
    for (name, roles, claims) in keys {
        yaml.push_str(&format!(
            "        - {{ id: {name}, sha256: {}, roles: [{roles}], claims: {{{claims}}} }}\n",
            digest(&format!("key-{name}"))
        ));
    }
    yaml
}

async fn request(
    gateway: &TestGateway,
    method: &str,
    path: &str,
    key: Option<&str>,
) -> TestResponse {
    let mut builder = Request::builder().method(method).uri(gateway.url(path));
    if let Some(key) = key {
        builder = builder.header("x-api-key", format!("key-{key}"));
    }
    send(builder.body(Full::<Bytes>::default()).unwrap()).await
}

/// The status of [`request`]'s response.
async fn status(gateway: &TestGateway, method: &str, path: &str, key: Option<&str>) -> u16 {
    request(gateway, method, path, key).await.status
}

const ORDER_ROLES: &str = "authorization:
  roles:
    - name: reader
      permissions: [\"GET,HEAD /orders/**\"]
    - name: writer
      includes: [reader]
      permissions: [\"POST,PUT /orders/{id}\", \"POST /orders\"]
    - name: auditor
      permissions:
        - methods: [GET]
          path: /audit/**
          when:
            - client_ip_in: [127.0.0.0/8]
    - name: remote-auditor
      permissions:
        - methods: [GET]
          path: /audit/**
          when:
            - client_ip_in: [10.0.0.0/8]
";

async fn orders_gateway() -> (TestUpstream, TestGateway) {
    let upstream = TestUpstream::echo().await;
    let yaml = format!(
        "{}{}{ORDER_ROLES}",
        config_with(
            &[upstream.url()],
            "",
            "  - name: orders\n    match: { path: /orders/** }\n    auth: [keys]\n    upstream: app\n  - name: audit\n    match: { path: /audit/** }\n    auth: [keys]\n    upstream: app\n"
        ),
        api_keys(&[
            ("r", "reader", ""),
            ("w", "writer", ""),
            ("a", "auditor", ""),
            ("far", "remote-auditor", ""),
            ("nobody", "", ""),
            ("stranger", "not-a-configured-role", ""),
        ]),
    );
    (upstream, TestGateway::start(&yaml).await)
}

#[tokio::test]
async fn permissions_allow_what_they_name_and_nothing_else() {
    let (upstream, gateway) = orders_gateway().await;
    for (method, path, key, status) in [
        ("GET", "/orders/7", "r", 200),
        ("HEAD", "/orders", "r", 200),
        ("POST", "/orders/7", "r", 403),
        ("DELETE", "/orders/7", "r", 403),
        // writer includes reader
        ("GET", "/orders/7", "w", 200),
        ("PUT", "/orders/7", "w", 200),
        ("POST", "/orders", "w", 200),
        // `{id}` is one segment: no write below it
        ("PUT", "/orders/7/items", "w", 403),
        ("DELETE", "/orders/7", "w", 403),
        // no role, or a role the config does not know: nothing is granted
        ("GET", "/orders/7", "nobody", 403),
        ("GET", "/orders/7", "stranger", 403),
        // conditions on the client address (the test client is 127.0.0.1)
        ("GET", "/audit/log", "a", 200),
        ("GET", "/audit/log", "far", 403),
        ("GET", "/audit/log", "r", 403),
    ] {
        let response = request(&gateway, method, path, Some(key)).await;
        assert_eq!(
            response.status, status,
            "{method} {path} with key {key}: {}",
            response.body
        );
    }
    let hits = upstream.hits();
    // 401 without a credential, before any authorization
    let response = request(&gateway, "GET", "/orders/7", None).await;
    assert_eq!(response.status, 401);
    assert!(response.headers.contains_key("www-authenticate"));
    // a 403 names the request and nothing of the policy
    let response = request(&gateway, "DELETE", "/orders/7", Some("w")).await;
    assert_eq!(response.status, 403);
    assert!(!response.headers.contains_key("www-authenticate"));
    let body = response.json();
    assert_eq!(body["error"], "forbidden");
    assert_eq!(
        body["request_id"].as_str().unwrap(),
        response.headers["x-request-id"].to_str().unwrap()
    );
    for secret in ["writer", "reader", "orders", "role", "permission"] {
        assert!(
            !response.body.contains(secret),
            "{secret} in {}",
            response.body
        );
    }
    assert_eq!(
        upstream.hits(),
        hits,
        "denied requests never reach the upstream"
    );
}

#[tokio::test]
async fn a_tenant_reaches_its_own_paths_and_no_other_tenants_even_through_path_tricks() {
    let upstream = TestUpstream::echo().await;
    let yaml = format!(
        "{}{}authorization:
  roles:
    - name: member
      permissions:
        - methods: [GET, PUT]
          path: /tenants/{{tenant}}/**
          when:
            - param_equals_claim: {{ param: tenant, claim: tenant }}
",
        config_with(
            &[upstream.url()],
            "",
            "  - name: tenants\n    match: { path: /tenants/** }\n    auth: [keys]\n    upstream: app\n"
        ),
        api_keys(&[
            ("alice", "member", "tenant: a"),
            ("bob", "member", "tenant: b"),
            ("multi", "member", "tenant: [a, c]"),
            ("none", "member", ""),
        ]),
    );
    let gateway = TestGateway::start(&yaml).await;
    for (path, key, status) in [
        ("/tenants/a/orders", "alice", 200),
        ("/tenants/a", "alice", 200),
        ("/tenants/b/orders", "alice", 403),
        ("/tenants/b/orders", "bob", 200),
        ("/tenants/a/orders", "bob", 403),
        // an array claim: any of its tenants
        ("/tenants/c/x", "multi", 200),
        ("/tenants/b/x", "multi", 403),
        // a key without the claim has no tenant
        ("/tenants/a/x", "none", 403),
        // case matters: `A` is another tenant
        ("/tenants/A/orders", "alice", 403),
    ] {
        let response = request(&gateway, "GET", path, Some(key)).await;
        assert_eq!(
            response.status, status,
            "GET {path} as {key}: {}",
            response.body
        );
    }

    // path tricks: what is decided is what the upstream receives, after normalisation
    for raw in [
        "/tenants/a/../b/orders",
        "/tenants/a/%2e%2e/b/orders",
        "/tenants/a/./../b/orders",
        "//tenants/b/orders",
        "/tenants/a/..%2fb/orders",
        "/tenants/a%2f..%2fb/orders",
    ] {
        let reply = crate::support::RawClient::exchange(
            gateway.addr,
            format!("GET {raw} HTTP/1.1\r\nhost: x\r\nx-api-key: key-alice\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        );
        let status = crate::support::status_of(&reply);
        assert!(status == 403 || status == 400, "{raw}: {status}");
    }
    // the same tricks landing in alice's own space are allowed, and the upstream sees the
    // normalised path
    let reply = crate::support::RawClient::exchange(
        gateway.addr,
        b"GET /tenants/b/../a/orders HTTP/1.1\r\nhost: x\r\nx-api-key: key-alice\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(crate::support::status_of(&reply), 200);
    assert_eq!(upstream.last().path_and_query, "/tenants/a/orders");
}

/// A JWT gateway: tokens from `signer`, roles from `roles`, scopes from `scope`.
async fn jwt_gateway(
    signer: &Signer,
    routes: &str,
    authorization: &str,
) -> (TestUpstream, TestGateway) {
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&[signer])).unwrap();
    let yaml = format!(
        "{}authentication:\n  jwt:\n    - name: corp\n      algorithms: [ES256]\n      keys: {{ jwks_file: jwks.json }}\n      roles_claim: roles\n  api_keys:\n    - name: partners\n{authorization}",
        config_with(&[upstream.url()], "", routes)
    );
    let loaded = crate::support::load_yaml(&yaml, dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    (
        upstream,
        TestGateway {
            gateway: Some(gateway),
            addr,
            dir,
        },
    )
}

async fn with_token(gateway: &TestGateway, method: &str, path: &str, token: &str) -> u16 {
    send(
        Request::builder()
            .method(method)
            .uri(gateway.url(path))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::<Bytes>::default())
            .unwrap(),
    )
    .await
    .status
}

#[tokio::test]
async fn routes_may_require_roles_by_inclusion_or_scopes_instead_of_permissions() {
    let signer = Signer::ec("k1");
    let (_upstream, gateway) = jwt_gateway(
        &signer,
        "  - name: admin\n    match: { path: /admin/** }\n    auth: [corp]\n    authorization:\n      roles: [admin]\n    upstream: app\n  - name: write\n    match: { path: /orders/** }\n    auth: [corp]\n    authorization:\n      scopes: [orders:write]\n    upstream: app\n  - name: me\n    match: { path: /me }\n    auth: [corp]\n    authorization:\n      any_authenticated: true\n    upstream: app\n",
        "authorization:\n  roles:\n    - name: admin\n    - name: owner\n      includes: [admin]\n",
    )
    .await;
    let token = |roles: serde_json::Value, scope: &str| {
        let mut c = claims("u1");
        c["roles"] = roles;
        c["scope"] = json!(scope);
        signer.sign(&c)
    };
    assert_eq!(
        with_token(&gateway, "GET", "/admin/x", &token(json!(["admin"]), "")).await,
        200
    );
    // owner includes admin
    assert_eq!(
        with_token(&gateway, "GET", "/admin/x", &token(json!(["owner"]), "")).await,
        200
    );
    assert_eq!(
        with_token(&gateway, "GET", "/admin/x", &token(json!(["reader"]), "")).await,
        403
    );
    // a role *named* in a claim string is split like scope
    assert_eq!(
        with_token(
            &gateway,
            "GET",
            "/admin/x",
            &token(json!("reader owner"), "")
        )
        .await,
        200
    );
    let write = token(json!([]), "orders:read orders:write");
    assert_eq!(with_token(&gateway, "POST", "/orders/1", &write).await, 200);
    let read = token(json!([]), "orders:read");
    assert_eq!(with_token(&gateway, "POST", "/orders/1", &read).await, 403);
    // a scope is matched whole, not by prefix
    let lookalike = token(json!([]), "orders:writer");
    assert_eq!(
        with_token(&gateway, "POST", "/orders/1", &lookalike).await,
        403
    );
    // any authenticated identity, roles or not
    assert_eq!(with_token(&gateway, "GET", "/me", &read).await, 200);
    // `scp` as an array counts as scopes too
    let mut c = claims("u2");
    c["scp"] = json!(["orders:write"]);
    assert_eq!(
        with_token(&gateway, "PUT", "/orders/2", &signer.sign(&c)).await,
        200
    );
}

#[tokio::test]
async fn assignments_grant_roles_by_subject_and_by_group() {
    let signer = Signer::ec("k1");
    let (_upstream, gateway) = jwt_gateway(
        &signer,
        "  - name: api\n    match: { path: /api/** }\n    auth: [corp]\n    upstream: app\n",
        "authorization:
  roles:
    - name: viewer
      permissions: [\"GET /api/**\"]
    - name: editor
      includes: [viewer]
      permissions: [\"PUT /api/**\"]
  assignments:
    - subjects: [carol]
      roles: [editor]
    - groups: [engineering]
      roles: [viewer]
    - subjects: [dave]
      providers: [partners]
      roles: [editor]
",
    )
    .await;
    let token = |sub: &str, groups: serde_json::Value| {
        let mut c = claims(sub);
        c["roles"] = groups;
        signer.sign(&c)
    };
    for (method, subject, groups, status) in [
        ("PUT", "carol", json!([]), 200),
        ("GET", "erin", json!(["engineering"]), 200),
        ("PUT", "erin", json!(["engineering"]), 403),
        ("GET", "frank", json!(["sales"]), 403),
    ] {
        let got = with_token(&gateway, method, "/api/doc", &token(subject, groups)).await;
        assert_eq!(got, status, "{method} as {subject}");
    }
    // an assignment limited to another provider does not apply
    assert_eq!(
        with_token(&gateway, "GET", "/api/doc", &token("dave", json!([]))).await,
        403
    );
}

#[tokio::test]
async fn roles_change_with_a_reload_and_a_bad_policy_keeps_the_old_one() {
    let upstream = TestUpstream::echo().await;
    let base = format!(
        "{}{}",
        config_with(
            &[upstream.url()],
            "",
            "  - name: orders\n    match: { path: /orders/** }\n    auth: [keys]\n    upstream: app\n"
        ),
        api_keys(&[("r", "reader", "")]),
    );
    let v1 = format!("{base}authorization:\n  roles:\n    - name: reader\n      permissions: [\"GET /orders/**\"]\n");
    let mut gateway = TestGateway::start(&v1).await;
    assert_eq!(status(&gateway, "GET", "/orders/1", Some("r")).await, 200);
    assert_eq!(
        status(&gateway, "DELETE", "/orders/1", Some("r")).await,
        403
    );

    let v2 = format!("{base}authorization:\n  roles:\n    - name: reader\n      permissions: [\"GET,DELETE /orders/**\"]\n");
    gateway.reload(&v2).unwrap();
    assert_eq!(
        status(&gateway, "DELETE", "/orders/1", Some("r")).await,
        200
    );

    // a cycle is a config error: the reload is refused and the running policy stays
    let cyclic = format!("{base}authorization:\n  roles:\n    - name: reader\n      includes: [other]\n    - name: other\n      includes: [reader]\n");
    let dir = gateway.dir.path().to_owned();
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, &cyclic).unwrap();
    let error = portcullis::config::load_file(&path)
        .and_then(|loaded| {
            portcullis::proxy::compile(&loaded, &portcullis::upstream::UpstreamRegistry::new(1), 9)
                .map(|_| ())
        })
        .unwrap_err()
        .to_string();
    assert!(error.contains("cycle: reader → other → reader"), "{error}");
    assert!(error.contains("portcullis.yaml:"), "{error}");
    assert!(gateway.reload(&cyclic).is_err());
    assert_eq!(
        status(&gateway, "DELETE", "/orders/1", Some("r")).await,
        200
    );
}

/// A fake policy service: allows `GET` for subjects in `allow`, counts calls, may be slow.
async fn policy_service(delay: Duration) -> (TestUpstream, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let server = TestUpstream::start(move |received| {
        counter.fetch_add(1, Ordering::SeqCst);
        let input: serde_json::Value = serde_json::from_slice(&received.body).unwrap();
        let allowed = input["input"]["identity"]["subject"] == "r"
            && input["input"]["request"]["method"] == "GET"
            && input["input"]["request"]["headers"]
                .get("x-api-key")
                .is_none();
        crate::support::Reply::ok(&json!({"result": {"allow": allowed}}).to_string())
            .header("content-type", "application/json")
            .delayed(delay)
    })
    .await;
    (server, calls)
}

async fn external_gateway(service: &TestUpstream, on_error: &str) -> (TestUpstream, TestGateway) {
    let upstream = TestUpstream::echo().await;
    let yaml = format!(
        "{}{}authorization:
  roles:
    - name: reader
      permissions: [\"GET,DELETE /orders/**\"]
  external:
    - name: opa
      url: {}/v1/data/portcullis
      timeout: 300ms
      cache_ttl: 30s
      on_error: {on_error}
      headers: [x-trace]
",
        config_with(
            &[upstream.url()],
            "",
            "  - name: orders\n    match: { path: /orders/** }\n    auth: [keys]\n    authorization:\n      external: opa\n    upstream: app\n"
        ),
        api_keys(&[("r", "reader", ""), ("w", "reader", "")]),
        service.url(),
    );
    (upstream, TestGateway::start(&yaml).await)
}

#[tokio::test]
async fn an_external_policy_service_decides_after_the_local_rule_and_is_cached() {
    let (service, calls) = policy_service(Duration::ZERO).await;
    let (_upstream, gateway) = external_gateway(&service, "deny").await;
    assert_eq!(status(&gateway, "GET", "/orders/1", Some("r")).await, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // the same identity and request again: answered from the cache
    assert_eq!(status(&gateway, "GET", "/orders/1", Some("r")).await, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // the service denies another subject, and another method
    assert_eq!(status(&gateway, "GET", "/orders/1", Some("w")).await, 403);
    assert_eq!(
        status(&gateway, "DELETE", "/orders/1", Some("r")).await,
        403
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // a local denial never reaches the service
    assert_eq!(status(&gateway, "POST", "/orders/1", Some("r")).await, 403);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // the service saw the request's attributes and the identity, never the credential
    let input: serde_json::Value = serde_json::from_slice(&service.last().body).unwrap();
    assert_eq!(input["input"]["request"]["path"], "/orders/1");
    assert_eq!(input["input"]["request"]["route"], "orders");
    assert_eq!(input["input"]["identity"]["roles"], json!(["reader"]));
    assert!(!String::from_utf8_lossy(&service.last().body).contains("key-r"));
}

#[tokio::test]
async fn an_unavailable_policy_service_fails_closed_unless_told_otherwise() {
    // slower than the 300 ms timeout
    let (slow, _) = policy_service(Duration::from_secs(2)).await;
    let (_upstream, gateway) = external_gateway(&slow, "deny").await;
    let started = std::time::Instant::now();
    assert_eq!(status(&gateway, "GET", "/orders/1", Some("r")).await, 403);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );

    let (down, _) = policy_service(Duration::ZERO).await;
    down.stop();
    let (_upstream, closed) = external_gateway(&down, "deny").await;
    assert_eq!(
        request(&closed, "GET", "/orders/1", Some("r")).await.status,
        403
    );
    let (_upstream, open) = external_gateway(&down, "allow").await;
    assert_eq!(
        request(&open, "GET", "/orders/1", Some("r")).await.status,
        200
    );
    // fail-open never opens what the local rule denies
    assert_eq!(
        request(&open, "POST", "/orders/1", Some("r")).await.status,
        403
    );
}
