//! The command line: `validate` output and exit codes, `schema`, every shipped example, `demo`.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::Duration,
};

use http::Request;
use http_body_util::Full;

use crate::support::*;

fn validate(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(&path, yaml).unwrap();
    let output = Command::new(binary())
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&output.stdout).replace(&path.display().to_string(), "gw.yaml");
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn validate_prints_every_error_with_file_line_column_and_field() {
    let yaml = "\
listeners:
  - name: main
    bind: 127.0.0.1:99999
upstreams:
  - name: app
    targets:
      - url: ftp://x
routes:
  - name: open
    upstream: app
  - name: r2
    public: true
    upstream: missing
    match:
      path: /a/**/b
      methods: [get]
  - name: r3
    public: true
    upstream: app
    bogus: 1
";
    let (code, out) = validate(yaml);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "gw.yaml:3:11: listeners[0].bind: `127.0.0.1:99999` is not an address",
        "gw.yaml:7:14: upstreams[0].targets[0].url: target scheme `ftp`",
        "gw.yaml:9:5: routes[0].public: route `open` declares no authentication",
        "gw.yaml:13:15: routes[1].upstream: unknown upstream `missing`",
        "gw.yaml:15:13: routes[1].match.path: `**` may only end a path pattern",
        "gw.yaml:16:17: routes[1].match.methods[0]: `get` is not an upper-case HTTP method",
        "gw.yaml:20:5: routes[2].bogus: unknown field `bogus`",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}

#[test]
fn validate_accepts_a_good_config_and_checks_tls_files() {
    let good = "listeners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets: [{ url: http://127.0.0.1:9 }]\nroutes:\n  - name: all\n    public: true\n    upstream: app\n";
    let (code, out) = validate(good);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("gw.yaml: ok"), "{out}");

    let bad_tls = good.replace(
        "    bind: 127.0.0.1:0\n",
        "    bind: 127.0.0.1:0\n    tls:\n      certificates:\n        - { cert: missing.pem, key: missing.key }\n",
    );
    let (code, out) = validate(&bad_tls);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("listeners[0].tls.certificates[0]: cannot read"),
        "{out}"
    );
}

#[test]
fn duplicate_names_bad_cidrs_and_unreachable_routes_are_errors() {
    let yaml = "\
server:
  trusted_proxies: [10.0.0.0/33]
listeners:
  - name: main
    bind: 127.0.0.1:0
  - name: main
    bind: 127.0.0.1:0
upstreams:
  - name: app
    targets: [{ url: http://127.0.0.1:9 }]
routes:
  - name: a
    public: true
    upstream: app
    match: { path: /x, methods: [GET] }
  - name: b
    public: true
    upstream: app
    match: { path: /x, methods: [GET] }
";
    let (code, out) = validate(yaml);
    assert_eq!(code, 1);
    assert!(
        out.contains("server.trusted_proxies[0]: `10.0.0.0/33` is not a CIDR"),
        "{out}"
    );
    assert!(
        out.contains("listeners[1].name: duplicate listener name `main`"),
        "{out}"
    );
    assert!(
        out.contains("routes[1].match: route `b` is unreachable"),
        "{out}"
    );
}

#[test]
fn unknown_fields_next_to_a_balancing_policy_are_errors() {
    let yaml = "listeners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets: [{ url: http://127.0.0.1:9 }]\n    load_balancing: { policy: round_robin, hash_on: client_ip }\nroutes:\n  - name: all\n    public: true\n    upstream: app\n";
    let (code, out) = validate(yaml);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("upstreams[0].load_balancing"), "{out}");
    assert!(out.contains("unknown field `hash_on`"), "{out}");
}

#[test]
fn schema_is_generated_from_the_config_types() {
    let output = Command::new(binary()).arg("schema").output().unwrap();
    assert!(output.status.success());
    let schema: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for section in ["listeners", "upstreams", "routes", "server", "admin"] {
        assert!(schema["properties"][section].is_object(), "{section}");
    }
    assert!(schema["definitions"]["RouteConfig"]["properties"]["public"].is_object());
}

#[test]
fn every_example_config_is_valid() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let output = Command::new(binary())
                .arg("validate")
                .arg(&path)
                .env("DEMO_UPSTREAM", "127.0.0.1:9")
                .env("DEMO_ADMIN_TOKEN", "example-token")
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{} is invalid:\n{}",
                path.display(),
                String::from_utf8_lossy(&output.stdout)
            );
            checked += 1;
        }
    }
    assert!(checked >= 1, "examples were found");
}

#[tokio::test]
async fn demo_serves_the_curl_commands_it_prints() {
    let (port, admin) = (free_port(), free_port());
    let mut child = Command::new(binary())
        .args([
            "demo",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut printed = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let done = line.contains("Stop with Ctrl-C");
        printed.push(line);
        if done {
            break;
        }
    }
    let text = printed.join("\n");
    assert!(
        text.contains(&format!("curl -s http://127.0.0.1:{port}/api/hello")),
        "{text}"
    );
    let hello = send(
        Request::get(format!("http://127.0.0.1:{port}/api/hello"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(hello.status, 200);
    assert_eq!(hello.json()["path"], "/hello");
    let missing = send(
        Request::get(format!("http://127.0.0.1:{port}/nope"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(missing.status, 404);
    // ready once the demo's own identity provider has served its keys
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let ready = send(
            Request::get(format!("http://127.0.0.1:{admin}/readyz"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        if ready.status == 200 {
            break;
        }
        assert_eq!(ready.body, "not ready: waiting for JWKS keys\n");
        assert!(
            std::time::Instant::now() < deadline,
            "the demo becomes ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // the printed token opens /secure; without it, or tampered, the gateway says 401
    let token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("export TOKEN="))
        .expect("a token is printed")
        .to_owned();
    let secure = |auth: Option<String>| {
        let mut request = Request::get(format!("http://127.0.0.1:{port}/secure/orders"));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        send(request.body(Full::default()).unwrap())
    };
    let allowed = secure(Some(format!("Bearer {token}"))).await;
    assert_eq!(allowed.status, 200, "{}", allowed.body);
    assert_eq!(
        allowed.json()["headers_received"]["x-auth-subject"],
        "demo-user"
    );
    assert_eq!(secure(None).await.status, 401);
    assert_eq!(secure(Some(format!("Bearer {token}x"))).await.status, 401);
    // the reader may not delete, the admin may: both curls as printed
    let admin_token = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("export ADMIN_TOKEN="))
        .expect("an admin token is printed")
        .to_owned();
    assert!(text.contains("-X DELETE"), "{text}");
    let delete = |token: &str| {
        send(
            Request::delete(format!("http://127.0.0.1:{port}/secure/orders/7"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::default())
                .unwrap(),
        )
    };
    assert_eq!(delete(&token).await.status, 403);
    assert_eq!(delete(&admin_token).await.status, 200);
    // the visible limit: five a minute, then 429
    assert!(text.contains("/limited/x"), "{text}");
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let response = send(
            Request::get(format!("http://127.0.0.1:{port}/limited/x"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        statuses.push(response.status);
        assert!(response.headers.contains_key("ratelimit-policy"));
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    // the printed dashboard URL carries the admin API's token, and the dashboard's data shows
    // the traffic above
    let dashboard = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("http://127.0.0.1:{admin}/dashboard#token="))
        })
        .expect("the dashboard URL is printed")
        .to_owned();
    let page = send(
        Request::get(format!("http://127.0.0.1:{admin}/dashboard"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(page.status, 200);
    let data = || {
        send(
            Request::get(format!("http://127.0.0.1:{admin}/dashboard/data"))
                .header("authorization", format!("Bearer {dashboard}"))
                .body(Full::default())
                .unwrap(),
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let data = data().await;
        assert_eq!(data.status, 200, "{}", data.body);
        if data.json()["overall"]["totals"]["requests"].as_u64() >= Some(13) {
            assert!(data.json()["overall"]["totals"]["rate_limited"].as_u64() >= Some(1));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", data.body);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let config = send(
        Request::get(format!("http://127.0.0.1:{admin}/config"))
            .body(Full::default())
            .unwrap(),
    )
    .await;
    assert_eq!(config.status, 401, "the admin API needs the printed token");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn authentication_mistakes_are_config_errors() {
    let yaml = "\
listeners:
  - name: main
    bind: 127.0.0.1:0
upstreams:
  - name: app
    targets: [{ url: http://127.0.0.1:9 }]
authentication:
  jwt:
    - name: corp
      algorithms: [HS256, RS256]
      keys: { secret: short }
  api_keys:
    - name: corp
      keys:
        - { id: a, sha256: nothex }
routes:
  - name: both
    public: true
    auth: [corp]
    authorization: { any_authenticated: true }
    upstream: app
  - name: unknown
    auth: [nobody]
    authorization: { any_authenticated: true }
    upstream: app
";
    let (code, out) = validate(yaml);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "authentication.api_keys[0].name: duplicate authentication method name `corp`",
        "routes[0].auth: a route is either `public: true` or has `auth`, not both",
        "routes[1].auth[0]: unknown authentication method `nobody`",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // key material is checked when the config compiles (after the structural checks pass)
    let cut = yaml.find("routes:").unwrap();
    let compiles = format!(
        "{}routes:\n  - name: ok\n    auth: [corp]\n    authorization:\n      any_authenticated: true\n    upstream: app\n",
        &yaml[..cut].replace(
            "  api_keys:\n    - name: corp",
            "  api_keys:\n    - name: keys"
        )
    );
    let (_, out) = validate(&compiles);
    assert!(
        out.contains("authentication.jwt[0].algorithms: HS* algorithms need"),
        "{out}"
    );
    assert!(
        out.contains("authentication.api_keys[0].keys[0]: `sha256` must be 64 hex digits"),
        "{out}"
    );
}

/// A config for `explain`: API keys, a JWT provider, roles with a tenant condition.
fn explain_fixture(
    dir: &std::path::Path,
    signer: &crate::support::tokens::Signer,
) -> std::path::PathBuf {
    std::fs::write(
        dir.join("jwks.json"),
        crate::support::tokens::jwks(&[signer]),
    )
    .unwrap();
    let yaml = format!(
        "listeners:
  - name: main
    bind: 127.0.0.1:0
upstreams:
  - name: app
    targets:
      - url: http://127.0.0.1:9
authentication:
  jwt:
    - name: corp
      algorithms: [ES256]
      keys: {{ jwks_file: jwks.json }}
      roles_claim: roles
  api_keys:
    - name: keys
      keys:
        - {{ id: reporter, sha256: {}, roles: [reader] }}
authorization:
  roles:
    - name: reader
      permissions: [\"GET,HEAD /orders/**\"]
    - name: member
      includes: [reader]
      permissions:
        - methods: [PUT]
          path: /tenants/{{tenant}}/**
          when:
            - param_equals_claim: {{ param: tenant, claim: tenant }}
routes:
  - name: orders
    match: {{ path: /orders/** }}
    auth: [corp, keys]
    upstream: app
  - name: tenants
    match: {{ path: /tenants/** }}
    auth: [corp]
    upstream: app
  - name: console
    match: {{ hosts: [console.example.com], path: /console/**, headers: [{{ name: x-canary, value: \"1\" }}] }}
    auth: [keys]
    authorization: {{ any_authenticated: true }}
    upstream: app
",
        digest("the-key")
    );
    let path = dir.join("gw.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn explain(config: &std::path::Path, args: &[&str]) -> (i32, String) {
    let output = Command::new(binary())
        .arg("explain")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn explain_names_the_route_identity_roles_and_rule_and_exits_0_or_3() {
    let dir = tempfile::tempdir().unwrap();
    let signer = crate::support::tokens::Signer::ec("k1");
    let config = explain_fixture(dir.path(), &signer);

    let (code, out) = explain(
        &config,
        &[
            "--method",
            "GET",
            "--path",
            "/orders/7",
            "--api-key",
            "the-key",
        ],
    );
    assert_eq!(code, 0, "{out}");
    for expected in [
        "route:     orders",
        "identity:  reporter (via api_key `keys`)",
        "roles:     reader",
        "reason:    role `reader` grants `GET,HEAD /orders/**`",
        "decision:  ALLOW",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }

    let (code, out) = explain(
        &config,
        &[
            "--method",
            "DELETE",
            "--path",
            "/orders/7",
            "--api-key",
            "the-key",
        ],
    );
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("no permission of the identity's roles matches"),
        "{out}"
    );
    assert!(out.contains("decision:  DENY (403)"), "{out}");

    // a real token, verified against the provider's keys; `member` includes `reader`
    let mut claims = crate::support::tokens::claims("ann");
    claims["roles"] = serde_json::json!(["member"]);
    claims["tenant"] = serde_json::json!("acme");
    let token = signer.sign(&claims);
    let (code, out) = explain(&config, &["--path", "/orders/1", "--token", &token]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("roles:     reader, member"), "{out}");
    let (code, out) = explain(
        &config,
        &[
            "--method",
            "PUT",
            "--path",
            "/tenants/acme/x",
            "--token",
            &token,
        ],
    );
    assert_eq!(code, 0, "{out}");
    // tenant isolation, through a traversal
    let (code, out) = explain(
        &config,
        &[
            "--method",
            "PUT",
            "--path",
            "/tenants/acme/../other/x",
            "--token",
            &token,
        ],
    );
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("normalised: /tenants/other/x"), "{out}");
    assert!(
        out.contains("path parameter `tenant` equals claim `tenant`"),
        "{out}"
    );
    // a tampered token does not verify
    let (code, out) = explain(
        &config,
        &["--path", "/orders/1", "--token", &format!("{token}x")],
    );
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("DENY (401)"), "{out}");

    // claims taken as given
    let (code, out) = explain(
        &config,
        &[
            "--method",
            "PUT",
            "--path",
            "/tenants/b/x",
            "--claims",
            r#"{"sub": "bo", "roles": ["member"], "tenant": "b"}"#,
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no signature was checked"), "{out}");

    // host and headers as a real request has them: case and port do not matter; a query is not
    // part of the path
    let console = [
        "--path",
        "/console/x?debug=1",
        "--host",
        "CONSOLE.example.com:8443",
        "--api-key",
        "the-key",
    ];
    let (code, out) = explain(
        &config,
        &[&console[..], &["--header", "x-canary: 1"]].concat(),
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("route:     console"), "{out}");
    assert!(
        out.contains("reason:    the route allows any authenticated identity"),
        "{out}"
    );
    let (code, out) = explain(&config, &console);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("DENY (404)"), "{out}");

    // no credential, no route
    let (code, out) = explain(&config, &["--path", "/orders/1"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("DENY (401)"), "{out}");
    let (code, out) = explain(&config, &["--path", "/nowhere"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("DENY (404)"), "{out}");
    // a broken config is an error, not a decision
    std::fs::write(&config, "listeners: 3\n").unwrap();
    let (code, _) = explain(&config, &["--path", "/orders/1"]);
    assert_eq!(code, 1);
}

#[test]
fn validate_warns_about_broad_roles_unreachable_permissions_and_routes_no_role_reaches() {
    let yaml = "\
listeners:
  - name: main
    bind: 127.0.0.1:0
upstreams:
  - name: app
    targets:
      - url: http://127.0.0.1:9
authentication:
  api_keys:
    - name: keys
authorization:
  roles:
    - name: root
      permissions: [\"* /**\"]
    - name: reader
      permissions: [\"GET /orders/**\", \"GET /invoices/**\"]
routes:
  - name: orders
    match: { path: /orders/** }
    auth: [keys]
    upstream: app
  - name: admin
    match: { path: /admin/**, methods: [DELETE] }
    auth: [keys]
    authorization:
      roles: [reader]
    upstream: app
  - name: payments
    match: { path: /payments/** }
    auth: [keys]
    upstream: app
";
    let (code, out) = validate(yaml);
    assert_eq!(code, 0, "{out}");
    for expected in [
        "gw.yaml:14:21: authorization.roles[0].permissions[0]: role `root` may do anything on any path",
        "gw.yaml:16:39: authorization.roles[1].permissions[1]: no route that checks permissions can receive `GET /invoices/**`",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    // with `root` gone, `payments` is a route no role can reach
    let narrowed = yaml.replace("    - name: root\n      permissions: [\"* /**\"]\n", "");
    let (code, out) = validate(&narrowed);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("routes[2]: no role has a permission for this route"),
        "{out}"
    );
    assert!(!out.contains("routes[0]: no role"), "{out}");
    assert!(
        !out.contains("routes[1]"),
        "route roles replace permissions: {out}"
    );

    // errors: authorization on a public route, unknown role or service, contradictory rule
    let broken = narrowed
        .replace("    authorization:\n      roles: [reader]\n", "    authorization:\n      roles: [ghost]\n      external: nowhere\n")
        .replace("  - name: payments\n    match: { path: /payments/** }\n    auth: [keys]\n", "  - name: payments\n    match: { path: /payments/** }\n    public: true\n    authorization: { any_authenticated: true }\n");
    let (code, out) = validate(&broken);
    assert_eq!(code, 1, "{out}");
    for expected in [
        "routes[1].authorization.roles[0]: no role is named `ghost`",
        "routes[1].authorization.external: no `authorization.external` service is named `nowhere`",
        "routes[2].authorization: a public route has no identity to authorize",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
}
