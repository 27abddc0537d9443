//! How long an authorization decision takes with a large policy: 1,000 roles and 10,000
//! permissions, compiled by the real config loader and decided through a real route.
//!
//! `cargo bench --bench authorization`. Numbers in docs/benchmarks.md.

use std::{hint::black_box, net::IpAddr, sync::Arc};

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use portcullis::policy::{
    authn::Identity,
    authz::{RequestFacts, RouteAuthorization},
};

mod common;

const ROLES: usize = 1_000;
const PERMISSIONS_PER_ROLE: usize = 10;

/// Role `r{i}` may `GET` and `PUT` `/svc{i % 100}/r{i}/p{j}/{id}` for j in 0..10, and every tenth
/// role also `GET`s `/tenants/{tenant}/svc{i}/**` for its own tenant; every tenth role includes
/// the one before it.
fn config() -> String {
    let mut yaml = String::from(
        "listeners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets:\n      - url: http://127.0.0.1:9\nauthentication:\n  api_keys:\n    - name: keys\n      keys: []\nroutes:\n  - name: all\n    auth: [keys]\n    upstream: app\nauthorization:\n  roles:\n",
    );
    for i in 0..ROLES {
        yaml.push_str(&format!("    - name: r{i}\n"));
        if i % 10 == 9 {
            yaml.push_str(&format!("      includes: [r{}]\n", i - 1));
        }
        yaml.push_str("      permissions:\n");
        let plain = if i % 10 == 0 {
            PERMISSIONS_PER_ROLE - 1
        } else {
            PERMISSIONS_PER_ROLE
        };
        for j in 0..plain {
            yaml.push_str(&format!(
                "        - \"GET,PUT /svc{}/r{i}/p{j}/{{id}}\"\n",
                i % 100
            ));
        }
        if i % 10 == 0 {
            yaml.push_str(&format!(
                "        - methods: [GET]\n          path: /tenants/{{tenant}}/svc{i}/**\n          when:\n            - param_equals_claim: {{ param: tenant, claim: tenant }}\n"
            ));
        }
    }
    yaml
}

fn identity(roles: &[&str]) -> Identity {
    let mut identity = Identity {
        method: "jwt",
        provider: "bench".into(),
        subject: "user-1".into(),
        issuer: None,
        roles: roles.iter().map(|r| (*r).into()).collect(),
        scopes: Vec::new(),
        claims: vec![("tenant".into(), serde_json::json!("acme"))],
        headers: Vec::new(),
        token_id: None,
        certificate_thumbprint: None,
        dpop_key: None,
        expires_at: None,
    };
    identity.roles.push("some-idp-group".into());
    identity
}

fn bench(c: &mut Criterion) {
    let snapshot = common::compile(&config());
    let route = common::route(&snapshot, "/");
    let authorization: Arc<RouteAuthorization> =
        route.policies.authorization.clone().expect("checked route");
    assert_eq!(
        authorization.policy.permissions.len(),
        ROLES * PERMISSIONS_PER_ROLE
    );
    let client_ip: IpAddr = "127.0.0.1".parse().unwrap();
    let user = identity(&["r9", "r420", "r777"]);
    let mut group = c.benchmark_group("authorization");
    for (name, method, path, allowed) in [
        // r9 includes r8: allowed by an inherited permission
        ("allow-inherited", Method::GET, "/svc8/r8/p3/42", true),
        ("allow-direct", Method::PUT, "/svc77/r777/p9/42", true),
        ("deny-method", Method::DELETE, "/svc77/r777/p9/42", false),
        ("deny-other-role", Method::GET, "/svc5/r5/p1/42", false),
        ("deny-no-match", Method::GET, "/nothing/here", false),
        (
            "allow-condition",
            Method::GET,
            "/tenants/acme/svc420/x/y",
            true,
        ),
        (
            "deny-condition",
            Method::GET,
            "/tenants/other/svc420/x",
            false,
        ),
    ] {
        let facts = RequestFacts {
            method: &method,
            path,
            client_ip,
        };
        assert_eq!(
            authorization.decide_local(&user, &facts).allowed,
            allowed,
            "{name}"
        );
        group.bench_function(name, |b| {
            b.iter(|| black_box(authorization.decide_local(black_box(&user), black_box(&facts))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
