//! What a rate-limit check costs on the request path: three in-process rules (the shape of the
//! throughput benchmark in bench/ratelimit.sh), decided through a real route's `RouteLimits`.
//!
//! `cargo bench --bench ratelimit`. Numbers in docs/benchmarks.md.

use std::{hint::black_box, sync::Arc};

use criterion::{criterion_group, criterion_main, Criterion};
use http::Request;
use portcullis::policy::ratelimit::{KeySource, Phase, Record, RouteLimits};

mod common;

const CONFIG: &str = "listeners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets:\n      - url: http://127.0.0.1:9\nroutes:\n  - name: limited\n    public: true\n    rate_limits: [per-ip, per-ip-route, reads]\n    upstream: app\nrate_limits:\n  rules:\n    - name: per-ip\n      key: [client_ip]\n      rate: 100000000/s\n    - name: per-ip-route\n      key: [client_ip, route]\n      rate: 100000000/s\n    - name: reads\n      key: [class]\n      class: read\n      rate: 100000000/s\n";

fn bench(c: &mut Criterion) {
    let snapshot = common::compile(CONFIG);
    let route = common::route(&snapshot, "/x");
    let limits: Arc<RouteLimits> = route.policies.rate_limits.clone().expect("limited");
    let ctx = common::routed_ctx("limited", "/x");
    let request = Request::get("/x").body(()).unwrap().into_parts().0;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    c.bench_function("ratelimit/three-local-rules", |b| {
        b.iter(|| {
            let mut record = Record::default();
            let source = KeySource {
                ctx: &ctx,
                request: &request,
                identity: None,
            };
            let checked = runtime.block_on(limits.check(Phase::BeforeAuth, &source, &mut record));
            black_box((checked, record.outcome.map(|o| o.headers())))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
