//! Response caching: freshness, identities kept apart, `Vary`, revalidation, stale serving,
//! coalescing, what is never stored, purges, metrics, and the Redis store shared by replicas.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::{redis::RedisServer, *};

const ADMIN_TOKEN: &str = "caching-admin-token";

/// An upstream that numbers its responses (`response N`) and adds `headers` to each.
async fn numbered(
    headers: &'static [(&'static str, &'static str)],
) -> (TestUpstream, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let upstream = TestUpstream::start(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let mut reply = Reply::ok(&format!("response {n}"));
        for (name, value) in headers {
            reply = reply.header(name, value);
        }
        reply
    })
    .await;
    (upstream, count)
}

/// A gateway with API keys `key-alice` and `key-bob` (role `reader`: GET anything), a private
/// cached route `/private/**`, a shared one `/shared/**` and a public one (everything else).
/// `extra` goes into the config's top level (e.g. a `cache` or `redis` section).
async fn gateway(upstream: &TestUpstream, route_cache: &str, extra: &str) -> TestGateway {
    let mut yaml = config_with(
        &[upstream.url()],
        "",
        &format!(
            "  - name: private\n    match: {{ path: /private/** }}\n    auth: [keys]\n    upstream: app\n    cache: {route_cache}\n\
             \x20 - name: shared\n    match: {{ path: /shared/** }}\n    auth: [keys]\n    upstream: app\n    cache: {{ shared: true }}\n\
             \x20 - name: open\n    public: true\n    upstream: app\n    cache: {route_cache}\n"
        ),
    );
    yaml = yaml.replace(
        "admin:\n  enabled: false\n",
        &format!("admin:\n  enabled: false\n  token: \"{ADMIN_TOKEN}\"\n"),
    );
    yaml.push_str(&format!(
        "authentication:\n  api_keys:\n    - name: keys\n      keys:\n\
         \x20       - {{ id: alice, sha256: {}, roles: [reader] }}\n\
         \x20       - {{ id: bob, sha256: {}, roles: [reader] }}\n\
         authorization:\n  roles:\n    - name: reader\n      permissions: [\"GET /**\"]\n{extra}",
        digest("key-alice"),
        digest("key-bob"),
    ));
    TestGateway::start(&yaml).await
}

async fn get(gateway: &TestGateway, path: &str, headers: &[(&str, &str)]) -> TestResponse {
    let mut builder = Request::get(gateway.url(path));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    send(builder.body(Full::<Bytes>::default()).unwrap()).await
}

fn x_cache(response: &TestResponse) -> &str {
    response
        .headers
        .get("x-cache")
        .map_or("(none)", |v| v.to_str().unwrap())
}

#[tokio::test]
async fn fresh_responses_are_served_from_the_cache_until_they_expire() {
    let (upstream, count) = numbered(&[("cache-control", "max-age=1")]).await;
    let gateway = gateway(&upstream, "{}", "").await;
    let first = get(&gateway, "/page?a=1", &[]).await;
    assert_eq!(
        (first.status, first.body.as_str(), x_cache(&first)),
        (200, "response 1", "miss")
    );
    let second = get(&gateway, "/page?a=1", &[]).await;
    assert_eq!(
        (second.body.as_str(), x_cache(&second)),
        ("response 1", "hit")
    );
    assert!(second.headers.contains_key("age"));
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // another query string is another URL
    let other = get(&gateway, "/page?a=2", &[]).await;
    assert_eq!(
        (other.body.as_str(), x_cache(&other)),
        ("response 2", "miss")
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = get(&gateway, "/page?a=1", &[]).await;
    assert_eq!(
        (expired.body.as_str(), x_cache(&expired)),
        ("response 3", "miss")
    );
}

#[tokio::test]
async fn an_identity_never_receives_another_identitys_cached_response() {
    let (upstream, count) = numbered(&[("cache-control", "max-age=60")]).await;
    let gateway = gateway(&upstream, "{}", "").await;
    let alice = [("x-api-key", "key-alice")];
    let bob = [("x-api-key", "key-bob")];
    let a1 = get(&gateway, "/private/profile", &alice).await;
    let b1 = get(&gateway, "/private/profile", &bob).await;
    assert_eq!((a1.body.as_str(), x_cache(&a1)), ("response 1", "miss"));
    assert_eq!(
        (b1.body.as_str(), x_cache(&b1)),
        ("response 2", "miss"),
        "bob must not get alice's"
    );
    let a2 = get(&gateway, "/private/profile", &alice).await;
    let b2 = get(&gateway, "/private/profile", &bob).await;
    assert_eq!((a2.body.as_str(), x_cache(&a2)), ("response 1", "hit"));
    assert_eq!((b2.body.as_str(), x_cache(&b2)), ("response 2", "hit"));
    // no credential: refused before the cache is asked
    assert_eq!(get(&gateway, "/private/profile", &[]).await.status, 401);
    assert_eq!(
        get(
            &gateway,
            "/private/profile",
            &[("x-api-key", "key-mallory")]
        )
        .await
        .status,
        401
    );
    assert_eq!(count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_shared_route_serves_other_identities_only_what_the_upstream_marks_public() {
    let (upstream, _) = numbered(&[("cache-control", "max-age=60")]).await;
    let gateway = gateway(&upstream, "{}", "").await;
    let alice = [("x-api-key", "key-alice")];
    let bob = [("x-api-key", "key-bob")];
    // `max-age` alone on a response to an authenticated request: not stored on a shared route
    get(&gateway, "/shared/a", &alice).await;
    let b = get(&gateway, "/shared/a", &bob).await;
    assert_eq!((b.body.as_str(), x_cache(&b)), ("response 2", "miss"));

    let (upstream, count) = numbered(&[("cache-control", "public, max-age=60")]).await;
    let gateway = self::gateway(&upstream, "{}", "").await;
    get(&gateway, "/shared/a", &alice).await;
    let b = get(&gateway, "/shared/a", &bob).await;
    assert_eq!((b.body.as_str(), x_cache(&b)), ("response 1", "hit"));
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let upstream = TestUpstream::start(|r| {
        let language = r
            .headers
            .get("accept-language")
            .map_or("none", |v| v.to_str().unwrap())
            .to_owned();
        Reply::ok(&format!("in {language}"))
            .header("cache-control", "max-age=60")
            .header("vary", "Accept-Language")
    })
    .await;
    let gateway = gateway(&upstream, "{}", "").await;
    let de = get(&gateway, "/greeting", &[("accept-language", "de")]).await;
    let en = get(&gateway, "/greeting", &[("accept-language", "en")]).await;
    let none = get(&gateway, "/greeting", &[]).await;
    assert_eq!((de.body.as_str(), x_cache(&de)), ("in de", "miss"));
    assert_eq!((en.body.as_str(), x_cache(&en)), ("in en", "miss"));
    assert_eq!((none.body.as_str(), x_cache(&none)), ("in none", "miss"));
    let de = get(&gateway, "/greeting", &[("accept-language", "de")]).await;
    let en = get(&gateway, "/greeting", &[("accept-language", "en")]).await;
    assert_eq!((de.body.as_str(), x_cache(&de)), ("in de", "hit"));
    assert_eq!((en.body.as_str(), x_cache(&en)), ("in en", "hit"));
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn stale_entries_are_revalidated_with_their_etag() {
    let upstream = TestUpstream::start(|r| {
        if r.headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"")
        {
            Reply::status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=1")
                .header("x-refreshed", "yes")
        } else {
            Reply::ok("the body")
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=1")
        }
    })
    .await;
    let gateway = gateway(&upstream, "{}", "").await;
    assert_eq!(x_cache(&get(&gateway, "/doc", &[]).await), "miss");
    // a client's own conditional request is answered from the entry
    let conditional = get(&gateway, "/doc", &[("if-none-match", "W/\"v1\"")]).await;
    assert_eq!((conditional.status, conditional.body.as_str()), (304, ""));
    assert_eq!(conditional.headers["etag"], "\"v1\"");
    let mismatch = get(&gateway, "/doc", &[("if-none-match", "\"v0\"")]).await;
    assert_eq!((mismatch.status, mismatch.body.as_str()), (200, "the body"));
    assert_eq!(
        upstream.hits(),
        1,
        "client conditionals never reach the upstream"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let revalidated = get(&gateway, "/doc", &[]).await;
    assert_eq!(
        (
            revalidated.status,
            revalidated.body.as_str(),
            x_cache(&revalidated)
        ),
        (200, "the body", "revalidated")
    );
    assert_eq!(
        revalidated.headers["x-refreshed"], "yes",
        "headers updated from the 304"
    );
    assert_eq!(upstream.last().headers["if-none-match"], "\"v1\"");
    // fresh again after the 304
    assert_eq!(x_cache(&get(&gateway, "/doc", &[]).await), "hit");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    let (upstream, count) = numbered(&[]).await;
    let gateway = gateway(&upstream, "{ ttl: 1s, stale_while_revalidate: 30s }", "").await;
    assert_eq!(get(&gateway, "/feed", &[]).await.body, "response 1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    upstream.respond_with(|_| Reply::ok("response 2").delayed(Duration::from_millis(300)));
    let started = std::time::Instant::now();
    let stale = get(&gateway, "/feed", &[]).await;
    assert_eq!(
        (stale.body.as_str(), x_cache(&stale)),
        ("response 1", "stale")
    );
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "did not wait for the refresh"
    );
    assert!(
        eventually(Duration::from_secs(5), || upstream.hits() == 2).await,
        "one background refresh"
    );
    // the refresh answers 300 ms after it was counted
    tokio::time::sleep(Duration::from_millis(600)).await;
    let refreshed = get(&gateway, "/feed", &[]).await;
    assert_eq!(
        (refreshed.body.as_str(), x_cache(&refreshed)),
        ("response 2", "hit")
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "the first responder ran once"
    );
}

#[tokio::test]
async fn concurrent_misses_are_coalesced_into_one_upstream_fetch() {
    let upstream = TestUpstream::start(|_| {
        Reply::ok("slow and shared")
            .header("cache-control", "max-age=60")
            .delayed(Duration::from_millis(400))
    })
    .await;
    let gateway = Arc::new(gateway(&upstream, "{}", "").await);
    let requests: Vec<_> = (0..12)
        .map(|_| {
            let gateway = gateway.clone();
            tokio::spawn(async move { get(&gateway, "/report", &[]).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for request in requests {
        let response = request.await.unwrap();
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "slow and shared")
        );
        outcomes.push(x_cache(&response).to_owned());
    }
    assert_eq!(upstream.hits(), 1, "one fetch for {outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| *o == "miss").count(), 1);
    assert_eq!(outcomes.iter().filter(|o| *o == "hit").count(), 11);
}

#[tokio::test]
async fn what_must_not_be_stored_is_not() {
    let upstream = TestUpstream::start(|r| match r.path_and_query.as_str() {
        "/no-store" => Reply::ok("x").header("cache-control", "no-store, max-age=60"),
        "/mine" => Reply::ok("x").header("cache-control", "private, max-age=60"),
        "/cookie" => Reply::ok("x")
            .header("cache-control", "max-age=60")
            .header("set-cookie", "session=abc"),
        "/error" => Reply::status(500).header("cache-control", "max-age=60"),
        "/no-freshness" => Reply::ok("x"),
        _ => Reply::ok("x").header("cache-control", "max-age=60"),
    })
    .await;
    let gateway = gateway(&upstream, "{}", "").await;
    for path in ["/no-store", "/mine", "/cookie", "/error", "/no-freshness"] {
        get(&gateway, path, &[]).await;
        let again = get(&gateway, path, &[]).await;
        assert_eq!(x_cache(&again), "miss", "{path} must not be stored");
    }
    assert_eq!(upstream.hits(), 10);
    // a request with credentials on a public route is not stored without `public`
    get(&gateway, "/any", &[("authorization", "Bearer someone")]).await;
    let anonymous = get(&gateway, "/any", &[]).await;
    assert_eq!(x_cache(&anonymous), "miss");
    // only GET is looked up
    let post = send(
        Request::post(gateway.url("/any"))
            .body(Full::new(Bytes::from_static(b"data")))
            .unwrap(),
    )
    .await;
    assert_eq!(x_cache(&post), "bypass");
    let range = get(&gateway, "/any", &[("range", "bytes=0-1")]).await;
    assert_eq!(x_cache(&range), "bypass");
}

#[tokio::test]
async fn responses_larger_than_an_entry_stream_through_unstored() {
    let big = "y".repeat(300 * 1024);
    let body = big.clone();
    let upstream =
        TestUpstream::start(move |_| Reply::ok(&body).header("cache-control", "max-age=60")).await;
    let gateway = gateway(
        &upstream,
        "{}",
        "cache:\n  max_size: 4MiB\n  max_entry_size: 256KiB\n",
    )
    .await;
    let first = get(&gateway, "/big", &[]).await;
    assert_eq!(first.body.len(), big.len());
    assert_eq!(first.body, big);
    let second = get(&gateway, "/big", &[]).await;
    assert_eq!((second.body.len(), x_cache(&second)), (big.len(), "miss"));
    assert_eq!(upstream.hits(), 2);
}

async fn admin(gateway: &mut TestGateway) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(portcullis::admin::serve(
        listener,
        gateway.gateway().state(),
    ));
    addr
}

async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> TestResponse {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"));
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    send(builder.body(Full::default()).unwrap()).await
}

#[tokio::test]
async fn purges_by_key_and_prefix_through_the_admin_api_and_metrics_count_hits() {
    let (upstream, _) = numbered(&[("cache-control", "max-age=60")]).await;
    let mut gateway = gateway(&upstream, "{}", "").await;
    let admin = admin(&mut gateway).await;
    // entries are kept by host (without the port), path and query
    let host = "127.0.0.1";
    for path in ["/users/1", "/users/2", "/orders/1"] {
        get(&gateway, path, &[]).await;
        assert_eq!(x_cache(&get(&gateway, path, &[]).await), "hit");
    }
    let refused = admin_request(admin, "DELETE", "/cache?prefix=", None).await;
    assert_eq!(refused.status, 401, "purging needs the admin token");
    let purged = admin_request(
        admin,
        "DELETE",
        &format!("/cache?key={host}/users/1"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        (purged.status, purged.json()["purged"].as_u64()),
        (200, Some(1))
    );
    assert_eq!(x_cache(&get(&gateway, "/users/1", &[]).await), "miss");
    assert_eq!(x_cache(&get(&gateway, "/users/2", &[]).await), "hit");
    let purged = admin_request(
        admin,
        "DELETE",
        &format!("/cache?prefix={host}/users/"),
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(purged.json()["purged"].as_u64(), Some(2));
    assert_eq!(x_cache(&get(&gateway, "/users/2", &[]).await), "miss");
    assert_eq!(x_cache(&get(&gateway, "/orders/1", &[]).await), "hit");
    let bad = admin_request(admin, "DELETE", "/cache", Some(ADMIN_TOKEN)).await;
    assert_eq!(bad.status, 400);

    let metrics = admin_request(admin, "GET", "/metrics", Some(ADMIN_TOKEN))
        .await
        .body;
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} in\n{metrics}"))
    };
    // per path: miss + hit; then /users/1 miss, /users/2 hit, /users/2 miss, /orders/1 hit
    assert_eq!(
        value("portcullis_cache_lookups_total{route=\"open\",result=\"hit\"}"),
        5.0
    );
    assert_eq!(
        value("portcullis_cache_lookups_total{route=\"open\",result=\"miss\"}"),
        5.0
    );
    assert!(value("portcullis_cache_size_bytes") > 0.0);
}

#[tokio::test]
async fn replicas_share_entries_through_redis() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let (upstream, count) = numbered(&[("cache-control", "max-age=60")]).await;
    let extra = format!("redis:\n  url: {}\ncache:\n  store: redis\n", redis.url());
    let mut first = gateway(&upstream, "{}", &extra).await;
    let second = gateway(&upstream, "{}", &extra).await;
    let alice = [("x-api-key", "key-alice")];
    let bob = [("x-api-key", "key-bob")];
    let a = get(&first, "/private/me", &alice).await;
    assert_eq!((a.body.as_str(), x_cache(&a)), ("response 1", "miss"));
    let a = get(&second, "/private/me", &alice).await;
    assert_eq!(
        (a.body.as_str(), x_cache(&a)),
        ("response 1", "hit"),
        "the other replica stored it"
    );
    let b = get(&second, "/private/me", &bob).await;
    assert_eq!((b.body.as_str(), x_cache(&b)), ("response 2", "miss"));
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // a purge on one replica is seen by the other
    let admin = admin(&mut first).await;
    let purged = admin_request(
        admin,
        "DELETE",
        "/cache?prefix=127.0.0.1/private/",
        Some(ADMIN_TOKEN),
    )
    .await;
    assert_eq!(
        (purged.status, purged.json()["purged"].as_u64()),
        (200, Some(1))
    );
    let a = get(&second, "/private/me", &alice).await;
    assert_eq!((a.body.as_str(), x_cache(&a)), ("response 3", "miss"));
}

#[tokio::test]
async fn one_stored_response_is_compressed_for_each_client_that_asks() {
    use http_body_util::BodyExt;
    use std::io::Read;

    let text = "cacheable and compressible ".repeat(200);
    let body = text.clone();
    let upstream = TestUpstream::start(move |_| {
        Reply::ok(&body)
            .header("cache-control", "max-age=60")
            .header("content-type", "text/plain")
    })
    .await;
    let gateway = gateway(&upstream, "{}\n    compression: {}", "").await;
    let fetch = |encoding: Option<&'static str>| {
        let url = gateway.url("/text");
        async move {
            let mut builder = Request::get(url);
            if let Some(encoding) = encoding {
                builder = builder.header("accept-encoding", encoding);
            }
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
            let response = client
                .request(builder.body(Full::default()).unwrap())
                .await
                .unwrap();
            let headers = response.headers().clone();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (headers, bytes)
        }
    };
    let (headers, bytes) = fetch(Some("gzip")).await;
    assert_eq!(headers["x-cache"], "miss");
    assert_eq!(headers["content-encoding"], "gzip");
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut plain)
        .unwrap();
    assert_eq!(plain, text);
    // the entry is the upstream's identity response: a client without gzip gets it as it is
    let (headers, bytes) = fetch(None).await;
    assert_eq!(headers["x-cache"], "hit");
    assert!(headers.get("content-encoding").is_none());
    assert_eq!(bytes, text.as_bytes());
    // and a hit is compressed for a client that asks
    let (headers, bytes) = fetch(Some("gzip")).await;
    assert_eq!(headers["x-cache"], "hit");
    assert_eq!(headers["content-encoding"], "gzip");
    let vary: Vec<_> = headers.get_all("vary").iter().collect();
    assert!(
        vary.iter()
            .any(|v| v.to_str().unwrap().eq_ignore_ascii_case("accept-encoding")),
        "{vary:?}"
    );
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&bytes[..])
        .read_to_string(&mut plain)
        .unwrap();
    assert_eq!(plain, text);
    assert_eq!(upstream.hits(), 1);
}
