//! What observability costs on the request path: the metrics and live statistics a finished
//! request updates through its route's cached handles (`Observer::finish` with the access log
//! off), and formatting its access-log line (JSON, redacted).
//!
//! `cargo bench --bench telemetry`. Numbers in docs/benchmarks.md.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};

mod common;

const CONFIG: &str = "listeners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets:\n      - url: http://127.0.0.1:9\nroutes:\n  - name: orders\n    public: true\n    upstream: app\nobservability:\n  access_log:\n    enabled: false\n";

/// A proxied request, finished: what `Observer::finish` sees.
fn ctx() -> portcullis::pipeline::RequestCtx {
    let mut ctx = common::routed_ctx("orders", "/orders/7");
    ctx.host = "api.example.com".into();
    ctx.query = Some("page=2&access_token=secret".into());
    ctx.upstream = Some("app".into());
    ctx.target = Some("http://127.0.0.1:9".into());
    ctx.status = 200;
    ctx.bytes_out = 512;
    ctx.upstream_latency = Some(std::time::Duration::from_micros(250));
    ctx
}

fn bench(c: &mut Criterion) {
    let snapshot = common::compile(CONFIG);
    let route = common::route(&snapshot, "/orders/7");
    let mut ctx = ctx();
    ctx.route_observer = Some(route.observer.clone());
    let observer = snapshot.observer.clone();
    observer.finish(&ctx); // the route's handles are resolved on first use
    c.bench_function("telemetry/metrics-and-tallies", |b| {
        b.iter(|| observer.finish(black_box(&ctx)))
    });
    c.bench_function("telemetry/access-log-line", |b| {
        b.iter(|| black_box(observer.access_log.format(black_box(&ctx))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
