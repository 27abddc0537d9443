//! State shared by replicas through a real `redis-server`: one-time tokens used at one gateway
//! are refused at another, and a Redis outage refuses one-time tokens (fail closed) while
//! everything else keeps working.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::json;

use crate::{
    authn::{dpop_bound_token, dpop_proof},
    support::{redis::RedisServer, tokens::*, *},
};

const ROUTES: &str = "  - name: jwt
    match: { path: /jwt/** }
    auth: [corp]
    authorization: { any_authenticated: true }
    upstream: app
  - name: open
    match: { path: /public/** }
    public: true
    upstream: app
";

/// A gateway whose provider `corp` remembers used ids in Redis; `extra` adds provider options
/// (indented for the provider's mapping).
fn replica(
    upstream: &TestUpstream,
    dir: &std::path::Path,
    redis_url: &str,
    extra: &str,
) -> TestGateway {
    let yaml = format!(
        "{}redis:\n  url: {redis_url}\n  timeout: 300ms\n  key_prefix: \"test:\"\nauthentication:\n  jwt:\n    - name: corp\n      algorithms: [ES256]\n      keys: {{ jwks_file: jwks.json }}\n      replay_store: redis\n{extra}",
        config_with(&[upstream.url()], "", ROUTES).replace(
            "admin:\n  enabled: false\n",
            &format!("admin:\n  enabled: false\n  token: \"{ADMIN_TOKEN}\"\n")
        )
    );
    let replica_dir = tempfile::tempdir_in(dir).unwrap();
    std::fs::copy(dir.join("jwks.json"), replica_dir.path().join("jwks.json")).unwrap();
    let loaded = load_yaml(&yaml, replica_dir.path());
    let gateway = portcullis::proxy::Gateway::start(&loaded, Some(1)).unwrap();
    let addr = gateway.local_addr("main").unwrap();
    TestGateway {
        gateway: Some(gateway),
        addr,
        dir: replica_dir,
    }
}

const ADMIN_TOKEN: &str = "shared-state-admin-token";

const ONE_TIME: &str = "      one_time_use: true\n";

async fn with_token(gateway: &TestGateway, path: &str, token: &str) -> u16 {
    let request = Request::get(gateway.url(path))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    send(request).await.status
}

#[tokio::test]
async fn a_one_time_token_is_accepted_once_across_replicas_and_refused_while_redis_is_down() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let ec = Signer::ec("shared");
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&ec])).unwrap();
    let (a, b) = (
        replica(&upstream, dir.path(), &redis.url(), ONE_TIME),
        replica(&upstream, dir.path(), &redis.url(), ONE_TIME),
    );
    let token = |jti: &str| {
        let mut claims = claims("erin");
        claims["jti"] = json!(jti);
        ec.sign(&claims)
    };

    let first = token("jti-1");
    assert_eq!(with_token(&a, "/jwt/x", &first).await, 200, "first use");
    assert_eq!(
        with_token(&b, "/jwt/x", &first).await,
        401,
        "replayed at the other replica"
    );
    assert_eq!(
        with_token(&a, "/jwt/x", &first).await,
        401,
        "replayed at the same one"
    );

    let second = token("jti-2");
    assert_eq!(with_token(&b, "/jwt/x", &second).await, 200);
    assert_eq!(with_token(&a, "/jwt/x", &second).await, 401);
    assert_eq!(upstream.hits(), 2, "replays never reach the upstream");

    // concurrent first uses of one token at both replicas: exactly one wins
    let third = token("jti-3");
    let (x, y) = tokio::join!(
        with_token(&a, "/jwt/x", &third),
        with_token(&b, "/jwt/x", &third)
    );
    let mut statuses = [x, y];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 401]);

    // Redis goes away: one-time tokens are refused (nothing can prove they are unused), promptly;
    // routes that do not need Redis keep working
    redis.stop();
    let started = std::time::Instant::now();
    assert_eq!(with_token(&a, "/jwt/x", &token("jti-4")).await, 401);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "bounded by the Redis timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(a.get("/public/x").await.status, 200);

    // Redis comes back on the same address: the gateway reconnects by itself
    let _redis = RedisServer::start_on(redis.port).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for n in 0.. {
        if with_token(&a, "/jwt/x", &token(&format!("after-{n}"))).await == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "one-time tokens work again once Redis is back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[test]
fn shared_stores_need_the_redis_section() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gw.yaml");
    std::fs::write(
        &path,
        format!(
            "{}authentication:\n  jwt:\n    - name: corp\n      keys: {{ jwks_file: jwks.json }}\n      one_time_use: true\n      replay_store: redis\n  revocations: {{ store: redis }}\n",
            config_with(&["http://127.0.0.1:9".to_owned()], "", ROUTES)
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&Signer::ec("k")])).unwrap();
    let output = std::process::Command::new(binary())
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success());
    assert!(
        stdout.contains("authentication.jwt[0].replay_store: `replay_store: redis` needs the top-level `redis` section"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "authentication.revocations.store: `store: redis` needs the top-level `redis` section"
        ),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_dpop_proof_is_accepted_once_across_replicas() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (issuer, holder) = (Signer::ec("iss"), Signer::ec("holder"));
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&issuer])).unwrap();
    let extra = "      dpop: { max_age: 30s }\n";
    let (a, b) = (
        replica(&upstream, dir.path(), &redis.url(), extra),
        replica(&upstream, dir.path(), &redis.url(), extra),
    );
    let token = dpop_bound_token(&issuer, &holder, "olga");
    // both replicas serve the same public name, as behind a load balancer
    let url = "http://api.example.test/jwt/orders";
    let call = |gateway: &TestGateway, proof: String| {
        let request = Request::get(gateway.url("/jwt/orders"))
            .header("host", "api.example.test")
            .header("authorization", format!("DPoP {token}"))
            .header("dpop", proof)
            .body(Full::<Bytes>::default())
            .unwrap();
        send(request)
    };
    let proof = dpop_proof(&holder, "GET", url, &token, now(), "proof-1");
    assert_eq!(call(&a, proof.clone()).await.status, 200);
    assert_eq!(
        call(&b, proof).await.status,
        401,
        "replayed at the other replica"
    );
    let fresh = dpop_proof(&holder, "GET", url, &token, now(), "proof-2");
    assert_eq!(call(&b, fresh).await.status, 200);
}

/// Serves `gateway`'s admin API on a free port; returns a client for it.
async fn admin_api(
    gateway: &mut TestGateway,
) -> impl Fn(
    &'static str,
    String,
    &'static str,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = u16>>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(portcullis::admin::serve(
        listener,
        gateway.gateway().state(),
    ));
    move |method, path, body| {
        Box::pin(async move {
            let request = Request::builder()
                .method(method)
                .uri(format!("http://{addr}{path}"))
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            send(request).await.status
        })
    }
}

/// Polls until `gateway` answers `path` with `token` by `status`.
async fn until_status(gateway: &TestGateway, token: &str, status: u16, why: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while with_token(gateway, "/jwt/x", token).await != status {
        assert!(std::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_revocation_made_at_one_replica_reaches_the_others() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let ec = Signer::ec("rev");
    let upstream = TestUpstream::echo().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&ec])).unwrap();
    let shared = "  revocations: { store: redis, sync_interval: 100ms }\n";
    let mut a = replica(&upstream, dir.path(), &redis.url(), shared);
    let mut b = replica(&upstream, dir.path(), &redis.url(), shared);
    let (admin_a, admin_b) = (admin_api(&mut a).await, admin_api(&mut b).await);
    let alice = ec.sign(&claims("alice"));
    let mut bob_claims = claims("bob");
    bob_claims["jti"] = json!("bob-token-1");
    let bob = ec.sign(&bob_claims);
    for gateway in [&a, &b] {
        assert_eq!(with_token(gateway, "/jwt/x", &alice).await, 200);
        assert_eq!(with_token(gateway, "/jwt/x", &bob).await, 200);
    }

    let status = admin_a("POST", "/revocations".into(), r#"{"subject":"alice"}"#).await;
    assert!(status < 300, "{status}");
    assert_eq!(
        with_token(&a, "/jwt/x", &alice).await,
        401,
        "at once where it was made"
    );
    until_status(&b, &alice, 401, "the other replica catches up").await;

    let status = admin_b("POST", "/revocations".into(), r#"{"jti":"bob-token-1"}"#).await;
    assert!(status < 300, "{status}");
    until_status(&a, &bob, 401, "a revoked jti reaches the other replica").await;

    let status = admin_b("DELETE", "/revocations?subject=alice".into(), "").await;
    assert_eq!(status, 204);
    until_status(
        &a,
        &alice,
        200,
        "lifting a revocation reaches every replica",
    )
    .await;
    until_status(&b, &alice, 200, "and the one where it was lifted").await;

    // Redis goes away: changes are refused (nothing half-done), the last copy stays in force
    redis.stop();
    let status = admin_a("POST", "/revocations".into(), r#"{"subject":"carol"}"#).await;
    assert_eq!(status, 503);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(with_token(&a, "/jwt/x", &bob).await, 401);
    assert_eq!(with_token(&b, "/jwt/x", &bob).await, 401);
    assert_eq!(with_token(&a, "/jwt/x", &alice).await, 200);

    // a replica that starts while Redis is down knows no revocations: it is not ready
    let mut c = replica(&upstream, dir.path(), &redis.url(), shared);
    let admin_c = admin_api(&mut c).await;
    assert_eq!(admin_c("GET", "/readyz".into(), "").await, 503);
    assert_eq!(
        admin_a("GET", "/readyz".into(), "").await,
        200,
        "a has its copy"
    );
}
