//! Authorization: whether a verified identity may perform this request. Deny by default: a
//! request is allowed only by a rule that says so.
//!
//! Each non-public route decides by one rule ([`RouteRule`]): the roles' permissions (the
//! default), the route's own required roles and scopes, or any authenticated identity (an
//! explicit choice). An external policy service may be asked as well, after the local rule
//! allowed. Everything is compiled at load time: a decision is a trie walk over the permissions
//! whose path matches and a binary search over role ids per candidate; an allowed decision
//! without conditions allocates only the identity's role-id list.

mod conditions;
mod external;
mod permissions;
mod roles;

use std::{collections::HashMap, fmt, net::IpAddr, ops::ControlFlow, sync::Arc};

use http::Method;

pub use conditions::Condition;
pub use external::{ExternalAnswer, ExternalAuthorizer, ExternalRequest};
pub use permissions::{MethodSet, Permission, PermissionIndex};
pub use roles::RoleTable;

use crate::{
    config::{
        model::{AuthorizationConfig, Config, PermissionConfig, RouteConfig},
        ErrorSink,
    },
    policy::authn::Identity,
    route::PathPattern,
};

/// The compiled `authorization` section, shared by every route of a snapshot.
#[derive(Debug, Default)]
pub struct Policy {
    pub roles: RoleTable,
    pub permissions: Vec<Permission>,
    index: PermissionIndex,
    pub external: HashMap<String, Arc<ExternalAuthorizer>>,
}

/// How a route decides.
#[derive(Debug)]
pub enum RouteRule {
    /// A permission of one of the identity's roles must match the method and path (default).
    Permissions,
    /// The identity must hold one of the roles (if any are named) and every scope.
    Require {
        /// Sorted ids of the roles that satisfy the role requirement (the named roles and every
        /// role including one); `None` when the route names no roles.
        holders: Option<Box<[u32]>>,
        scopes: Box<[Arc<str>]>,
    },
    /// Every verified identity.
    AnyAuthenticated,
}

/// A route's authorization.
#[derive(Debug)]
pub struct RouteAuthorization {
    pub policy: Arc<Policy>,
    pub rule: RouteRule,
    pub external: Option<Arc<ExternalAuthorizer>>,
}

/// A decision and what it rests on (for the access log, `explain`, never for the client).
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone)]
pub enum Reason {
    /// The route allows any authenticated identity.
    AnyAuthenticated,
    /// A permission of this role matched.
    Permission {
        role: Arc<str>,
        permission: Arc<str>,
    },
    /// The route's required role (held directly or by inclusion) and scopes were present.
    RouteRequirement,
    /// The external policy service decided (the local rule had allowed).
    External {
        authorizer: Arc<str>,
        answer: ExternalAnswer,
    },
    /// No permission of the identity's roles matches the method and path.
    NoPermission,
    /// A permission matched but one of its conditions did not hold.
    ConditionFailed {
        permission: Arc<str>,
        condition: Box<str>,
    },
    /// The identity holds none of the route's roles.
    MissingRole,
    /// The credential lacks one of the route's scopes.
    MissingScope(Arc<str>),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AnyAuthenticated => f.write_str("the route allows any authenticated identity"),
            Self::Permission { role, permission } => {
                write!(f, "role `{role}` grants `{permission}`")
            }
            Self::RouteRequirement => f.write_str("the route's required roles and scopes are held"),
            Self::External { authorizer, answer } => match answer {
                ExternalAnswer::Allow => write!(f, "policy service `{authorizer}` allowed"),
                ExternalAnswer::Deny => write!(f, "policy service `{authorizer}` denied"),
                ExternalAnswer::Failed { allowed, reason } => write!(
                    f,
                    "policy service `{authorizer}` failed ({reason}); on_error: {}",
                    if *allowed { "allow" } else { "deny" }
                ),
            },
            Self::NoPermission => {
                f.write_str("no permission of the identity's roles matches the method and path")
            }
            Self::ConditionFailed {
                permission,
                condition,
            } => write!(
                f,
                "permission `{permission}` matched but not its condition: {condition}"
            ),
            Self::MissingRole => f.write_str("the identity holds none of the route's roles"),
            Self::MissingScope(scope) => write!(f, "the credential lacks scope `{scope}`"),
        }
    }
}

/// The request attributes a decision reads.
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    /// Normalised, before any rewrite.
    pub path: &'a str,
    pub client_ip: IpAddr,
}

/// What an external policy service sees besides [`RequestFacts`].
pub struct RequestContext<'a> {
    pub host: &'a str,
    pub route: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl RouteAuthorization {
    /// The local decision (roles, permissions, conditions, scopes), without the external service.
    pub fn decide_local(&self, identity: &Identity, request: &RequestFacts<'_>) -> Decision {
        let roles = self.held_roles(identity);
        self.decide_with_roles(identity, &roles, request)
    }

    /// The configured roles the identity holds directly (only the rules that read roles pay for
    /// resolving them).
    fn held_roles(&self, identity: &Identity) -> Vec<u32> {
        match &self.rule {
            RouteRule::AnyAuthenticated | RouteRule::Require { holders: None, .. } => Vec::new(),
            RouteRule::Permissions | RouteRule::Require { .. } => self.policy.roles.of(identity),
        }
    }

    fn decide_with_roles(
        &self,
        identity: &Identity,
        roles: &[u32],
        request: &RequestFacts<'_>,
    ) -> Decision {
        let deny = |reason| Decision {
            allowed: false,
            reason,
        };
        match &self.rule {
            RouteRule::AnyAuthenticated => Decision {
                allowed: true,
                reason: Reason::AnyAuthenticated,
            },
            RouteRule::Require { holders, scopes } => {
                if let Some(holders) = holders {
                    if !roles.iter().any(|id| holders.binary_search(id).is_ok()) {
                        return deny(Reason::MissingRole);
                    }
                }
                if let Some(missing) = scopes
                    .iter()
                    .find(|scope| !identity.scopes.iter().any(|held| **held == ***scope))
                {
                    return deny(Reason::MissingScope(missing.clone()));
                }
                Decision {
                    allowed: true,
                    reason: Reason::RouteRequirement,
                }
            }
            RouteRule::Permissions => self.policy.decide(identity, roles, request),
        }
    }

    /// The full decision: the local rule, then the external service when the route has one.
    pub async fn authorize(
        &self,
        identity: &Identity,
        request: &RequestFacts<'_>,
        context: &RequestContext<'_>,
    ) -> Decision {
        let Some(authorizer) = &self.external else {
            return self.decide_local(identity, request);
        };
        // the external service is told every role the identity amounts to
        let roles = self.policy.roles.of(identity);
        let local = self.decide_with_roles(identity, &roles, request);
        if !local.allowed {
            return local;
        }
        let external = ExternalRequest {
            method: request.method,
            path: request.path,
            host: context.host,
            client_ip: request.client_ip,
            route: context.route,
            headers: context.headers,
            roles: self.policy.roles.expand(&roles),
        };
        let answer = authorizer.decide(&external, identity).await;
        Decision {
            allowed: answer.allowed(),
            reason: Reason::External {
                authorizer: authorizer.name.clone(),
                answer,
            },
        }
    }
}

impl Policy {
    /// The permission check: the most specific matching permission held by one of the
    /// identity's roles whose conditions hold.
    /// `roles` are the identity's role ids ([`RoleTable::of`]).
    pub fn decide(
        &self,
        identity: &Identity,
        roles: &[u32],
        request: &RequestFacts<'_>,
    ) -> Decision {
        if roles.is_empty() {
            return Decision {
                allowed: false,
                reason: Reason::NoPermission,
            };
        }
        let mut failed_condition = None;
        let found = self.index.for_each_match(request.path, &mut |id| {
            let permission = &self.permissions[id as usize];
            if !permission.methods.contains(request.method) || !permission.held_by_any(roles) {
                return ControlFlow::Continue(());
            }
            match permission
                .conditions
                .iter()
                .find(|c| !c.holds(identity, &permission.path, request))
            {
                None => ControlFlow::Break(permission),
                Some(condition) => {
                    failed_condition.get_or_insert((permission, condition));
                    ControlFlow::Continue(())
                }
            }
        });
        match (found, failed_condition) {
            (ControlFlow::Break(permission), _) => Decision {
                allowed: true,
                reason: Reason::Permission {
                    role: permission.role.clone(),
                    permission: permission.text.clone(),
                },
            },
            (ControlFlow::Continue(()), Some((permission, condition))) => Decision {
                allowed: false,
                reason: Reason::ConditionFailed {
                    permission: permission.text.clone(),
                    condition: condition.to_string().into(),
                },
            },
            (ControlFlow::Continue(()), None) => Decision {
                allowed: false,
                reason: Reason::NoPermission,
            },
        }
    }

    /// Compiles the `authorization` section; errors go to `sink`.
    pub fn compile(config: &AuthorizationConfig, sink: &mut ErrorSink<'_>) -> Self {
        let roles = RoleTable::compile(&config.roles, &config.assignments, sink);
        let mut permissions = Vec::new();
        let mut index = PermissionIndex::default();
        for (i, role) in config.roles.iter().enumerate() {
            let Some(id) = roles.id(&role.name) else {
                continue;
            };
            let role_name = roles.name(id).clone();
            for (j, permission) in role.permissions.iter().enumerate() {
                let field = format!("authorization.roles[{i}].permissions[{j}]");
                let CompiledPermission {
                    text,
                    methods,
                    path,
                    conditions,
                } = match compile_permission(permission) {
                    Ok(compiled) => compiled,
                    Err((subfield, message)) => {
                        sink.error(format!("{field}{subfield}"), message);
                        continue;
                    }
                };
                let permission_id = permissions.len() as u32;
                index.insert(&path, permission_id);
                permissions.push(Permission {
                    text,
                    role: role_name.clone(),
                    methods,
                    path,
                    conditions,
                    // holders of role `id` are empty when a cycle was found (config refused)
                    held_by: roles.holders(id).into(),
                    source: (i, j),
                });
            }
        }
        let mut external = HashMap::new();
        for (i, service) in config.external.iter().enumerate() {
            match ExternalAuthorizer::from_config(service) {
                Ok(compiled) => {
                    if external
                        .insert(service.name.clone(), Arc::new(compiled))
                        .is_some()
                    {
                        sink.error(
                            format!("authorization.external[{i}].name"),
                            format!("`{}` is defined twice", service.name),
                        );
                    }
                }
                Err((field, message)) => {
                    sink.error(format!("authorization.external[{i}].{field}"), message)
                }
            }
        }
        Self {
            roles,
            permissions,
            index,
            external,
        }
    }

    /// Compiles a non-public route's rule; errors go to `sink` under `routes[i].authorization`.
    pub fn route(
        self: &Arc<Self>,
        i: usize,
        route: &RouteConfig,
        sink: &mut ErrorSink<'_>,
    ) -> Option<RouteAuthorization> {
        let field = format!("routes[{i}].authorization");
        let Some(config) = &route.authorization else {
            return Some(RouteAuthorization {
                policy: self.clone(),
                rule: RouteRule::Permissions,
                external: None,
            });
        };
        let mut ok = true;
        let external = match &config.external {
            None => None,
            Some(name) => {
                let found = self.external.get(name).cloned();
                if found.is_none() {
                    sink.error(
                        format!("{field}.external"),
                        format!("no `authorization.external` service is named `{name}`"),
                    );
                    ok = false;
                }
                found
            }
        };
        let rule = if config.any_authenticated {
            if !config.roles.is_empty() || !config.scopes.is_empty() {
                sink.error(
                    format!("{field}.any_authenticated"),
                    "`any_authenticated` cannot be combined with `roles` or `scopes`",
                );
                ok = false;
            }
            RouteRule::AnyAuthenticated
        } else if config.roles.is_empty() && config.scopes.is_empty() {
            RouteRule::Permissions
        } else {
            let holders = if config.roles.is_empty() {
                None
            } else {
                let mut holders = Vec::new();
                for (j, name) in config.roles.iter().enumerate() {
                    match self.roles.id(name) {
                        Some(id) => holders.extend_from_slice(self.roles.holders(id)),
                        None => {
                            sink.error(
                                format!("{field}.roles[{j}]"),
                                format!("no role is named `{name}`"),
                            );
                            ok = false;
                        }
                    }
                }
                holders.sort_unstable();
                holders.dedup();
                Some(holders.into())
            };
            RouteRule::Require {
                holders,
                scopes: config.scopes.iter().map(|s| s.as_str().into()).collect(),
            }
        };
        ok.then(|| RouteAuthorization {
            policy: self.clone(),
            rule,
            external,
        })
    }
}

/// A permission's own parts, before it is given its role and index.
struct CompiledPermission {
    text: Arc<str>,
    methods: MethodSet,
    path: PathPattern,
    conditions: Box<[Condition]>,
}

/// Compiles one permission; the error names the sub-field (`.path`, `.when[0]`, or none).
fn compile_permission(config: &PermissionConfig) -> Result<CompiledPermission, (String, String)> {
    let whole = |message: String| (String::new(), message);
    match config {
        PermissionConfig::Short(text) => {
            let mut words = text.split_whitespace();
            let (Some(methods), Some(path), None) = (words.next(), words.next(), words.next())
            else {
                return Err(whole(format!(
                    "`{text}` is not `METHODS PATH` (e.g. `GET,HEAD /orders/**` or `* /admin/**`)"
                )));
            };
            let methods = MethodSet::parse(methods.split(',')).map_err(whole)?;
            let path = PathPattern::parse(path).map_err(whole)?;
            Ok(CompiledPermission {
                text: text.trim().into(),
                methods,
                path,
                conditions: Box::default(),
            })
        }
        PermissionConfig::Full(rule) => {
            let methods = MethodSet::parse(rule.methods.iter().map(String::as_str))
                .map_err(|m| (".methods".to_owned(), m))?;
            let path = PathPattern::parse(&rule.path).map_err(|m| (".path".to_owned(), m))?;
            let conditions = rule
                .when
                .iter()
                .enumerate()
                .map(|(k, condition)| {
                    Condition::compile(condition, &path).map_err(|m| (format!(".when[{k}]"), m))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut text = format!("{} {}", rule.methods.join(","), rule.path);
            if !conditions.is_empty() {
                let list: Vec<String> = conditions.iter().map(ToString::to_string).collect();
                text.push_str(&format!(" when {}", list.join(" and ")));
            }
            Ok(CompiledPermission {
                text: text.into(),
                methods,
                path,
                conditions: conditions.into(),
            })
        }
    }
}

/// The claims authorization reads (conditions and external services): authenticated identities
/// keep exactly these.
pub fn claims_read(config: &AuthorizationConfig) -> Box<[Box<str>]> {
    let mut claims: Vec<Box<str>> = config
        .roles
        .iter()
        .flat_map(|role| &role.permissions)
        .filter_map(|permission| match permission {
            PermissionConfig::Full(rule) => Some(&rule.when),
            PermissionConfig::Short(_) => None,
        })
        .flatten()
        .filter_map(Condition::claim)
        .chain(
            config
                .external
                .iter()
                .flat_map(|e| e.claims.iter().map(String::as_str)),
        )
        .map(Into::into)
        .collect();
    claims.sort_unstable();
    claims.dedup();
    claims.into()
}

/// Findings that do not stop a config from loading: permissions that grant everything,
/// permissions no route can reach, and routes no role can reach.
pub fn lint(config: &Config, policy: &Policy, sink: &mut ErrorSink<'_>) {
    // the routes whose requests the permissions decide
    let checked_routes: Vec<(usize, PathPattern, MethodSet)> = config
        .routes
        .iter()
        .enumerate()
        .filter(|(_, route)| !route.public)
        .filter(|(_, route)| {
            route
                .authorization
                .as_ref()
                .is_none_or(|a| !a.any_authenticated && a.roles.is_empty() && a.scopes.is_empty())
        })
        .filter_map(|(i, route)| {
            let path = PathPattern::parse(&route.matcher.path).ok()?;
            let methods: Vec<Method> = route
                .matcher
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect();
            Some((i, path, MethodSet::of_route(&methods)))
        })
        .collect();
    let reaches = |permission: &Permission, path: &PathPattern, methods: MethodSet| {
        permission.methods.intersects(methods) && permission.path.overlaps(path)
    };
    for permission in &policy.permissions {
        let (i, j) = permission.source;
        let field = format!("authorization.roles[{i}].permissions[{j}]");
        if permission.methods == MethodSet::ALL
            && permission.path.matches_everything()
            && permission.conditions.is_empty()
        {
            sink.warn(
                &field,
                format!(
                    "role `{}` may do anything on any path: least privilege prefers narrower permissions",
                    permission.role
                ),
            );
        }
        if !checked_routes
            .iter()
            .any(|(_, path, methods)| reaches(permission, path, *methods))
        {
            sink.warn(
                &field,
                format!(
                    "no route that checks permissions can receive `{}`: the permission has no effect",
                    permission.text
                ),
            );
        }
    }
    for (i, path, methods) in &checked_routes {
        if !policy
            .permissions
            .iter()
            .any(|permission| reaches(permission, path, *methods))
        {
            sink.warn(
                format!("routes[{i}]"),
                "no role has a permission for this route: every request will be refused with 403 (add a permission, or `authorization: {any_authenticated: true}`)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_str, LoadedConfig};

    fn load(authorization: &str) -> LoadedConfig {
        let yaml = format!(
            "listeners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets:\n      - url: http://127.0.0.1:9\nroutes:\n  - name: all\n    public: true\n    upstream: app\n{authorization}"
        );
        load_str(&yaml, "test.yaml".as_ref(), ".".into(), &|_| None)
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
    }

    fn compile(loaded: &LoadedConfig) -> Result<Policy, String> {
        let mut sink = ErrorSink::new(loaded);
        let policy = Policy::compile(&loaded.config.authorization, &mut sink);
        if sink.has_errors() {
            return Err(sink.into_errors().to_string());
        }
        Ok(policy)
    }

    /// A random policy as plain data, and the naive reading of it the index must agree with.
    struct Spec {
        /// Per role: the roles it includes (all earlier: no cycles), and its permissions as
        /// (methods or `None` for all, pattern, tenant condition on `{p}`).
        roles: Vec<(Vec<usize>, Vec<SpecPermission>)>,
    }

    /// Methods (`None`: all), path pattern, whether `{p}` must equal the `tenant` claim.
    type SpecPermission = (Option<Vec<&'static str>>, String, bool);

    const METHODS: [&str; 4] = ["GET", "POST", "DELETE", "PATCH"];

    impl Spec {
        fn random(rng: &mut fastrand::Rng) -> Self {
            let count = rng.usize(1..8);
            let roles = (0..count)
                .map(|i| {
                    let includes = (0..i).filter(|_| rng.u8(0..4) == 0).collect();
                    let permissions = (0..rng.usize(0..4))
                        .map(|_| {
                            let mut path = String::new();
                            let mut has_param = false;
                            for _ in 0..rng.usize(0..4) {
                                path.push('/');
                                match rng.u8(0..6) {
                                    0 if !has_param => {
                                        has_param = true;
                                        path.push_str("{p}")
                                    }
                                    1 => path.push('*'),
                                    n => path.push(['a', 'b', 'c'][n as usize % 3]),
                                }
                            }
                            if path.is_empty() || rng.bool() {
                                path.push_str("/**");
                            }
                            let methods = (rng.u8(0..4) != 0).then(|| {
                                let mut chosen: Vec<&str> =
                                    METHODS.iter().copied().filter(|_| rng.bool()).collect();
                                if chosen.is_empty() {
                                    chosen.push("GET");
                                }
                                chosen
                            });
                            (methods, path, has_param && rng.bool())
                        })
                        .collect();
                    (includes, permissions)
                })
                .collect();
            Self { roles }
        }

        fn yaml(&self) -> String {
            let mut yaml = String::from("authorization:\n  roles:\n");
            for (i, (includes, permissions)) in self.roles.iter().enumerate() {
                yaml.push_str(&format!("    - name: r{i}\n      includes: ["));
                let names: Vec<String> = includes.iter().map(|j| format!("r{j}")).collect();
                yaml.push_str(&names.join(", "));
                yaml.push_str("]\n      permissions:\n");
                for (methods, path, tenant) in permissions {
                    let methods = methods
                        .as_ref()
                        .map_or("\"*\"".to_owned(), |m| m.join(", "));
                    yaml.push_str(&format!(
                        "        - methods: [{methods}]\n          path: \"{path}\"\n"
                    ));
                    if *tenant {
                        yaml.push_str("          when:\n            - param_equals_claim: { param: p, claim: tenant }\n");
                    }
                }
                if permissions.is_empty() {
                    yaml.truncate(yaml.len() - "      permissions:\n".len());
                }
            }
            yaml
        }

        /// The naive reading: expand inclusion, then try every permission of every held role.
        fn allows(&self, roles: &[usize], tenant: Option<&str>, method: &str, path: &str) -> bool {
            let mut held: Vec<usize> = roles.to_vec();
            let mut i = 0;
            while i < held.len() {
                for &included in &self.roles[held[i]].0 {
                    if !held.contains(&included) {
                        held.push(included);
                    }
                }
                i += 1;
            }
            held.iter().any(|&role| {
                self.roles[role]
                    .1
                    .iter()
                    .any(|(methods, pattern, condition)| {
                        let pattern = PathPattern::parse(pattern).unwrap();
                        methods.as_ref().is_none_or(|m| m.contains(&method))
                            && pattern.matches(path)
                            && (!condition
                                || pattern.captures(path).is_some_and(|params| {
                                    params.iter().any(|(n, v)| *n == "p" && Some(*v) == tenant)
                                }))
                    })
            })
        }
    }

    #[test]
    fn no_request_is_allowed_that_no_permission_grants_and_none_granted_is_refused() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let mut allowed_count = 0;
        for case in 0..300 {
            let spec = Spec::random(&mut rng);
            let yaml = spec.yaml();
            let policy = compile(&load(&yaml)).unwrap();
            for _ in 0..40 {
                let roles: Vec<usize> = (0..spec.roles.len())
                    .filter(|_| rng.u8(0..3) == 0)
                    .collect();
                let tenant = [None, Some("a"), Some("b")][rng.usize(0..3)];
                let method = METHODS[rng.usize(0..4)];
                let path: String = (0..rng.usize(0..5))
                    .map(|_| ["/a", "/b", "/c", "/d"][rng.usize(0..4)])
                    .collect();
                let path = if path.is_empty() {
                    "/".to_owned()
                } else {
                    path
                };
                let mut identity = Identity::for_test("someone");
                identity.roles = roles.iter().map(|i| format!("r{i}").into()).collect();
                identity.roles.push("unknown-role".into());
                if let Some(tenant) = tenant {
                    identity.claims = vec![("tenant".into(), serde_json::json!(tenant))];
                }
                let method = Method::from_bytes(method.as_bytes()).unwrap();
                let held = policy.roles.of(&identity);
                let decision = policy.decide(
                    &identity,
                    &held,
                    &RequestFacts {
                        method: &method,
                        path: &path,
                        client_ip: "127.0.0.1".parse().unwrap(),
                    },
                );
                let expected = spec.allows(&roles, tenant, method.as_str(), &path);
                assert_eq!(
                    decision.allowed, expected,
                    "case {case}: roles {roles:?} tenant {tenant:?} {method} {path}: {}\n{yaml}",
                    decision.reason
                );
                allowed_count += usize::from(expected);
            }
        }
        // the generator must exercise both outcomes
        assert!(allowed_count > 500, "{allowed_count}");
    }

    #[test]
    fn credential_roles_count_only_from_the_roles_trusted_providers() {
        let loaded = load(
            "authentication:\n  api_keys:\n    - name: corp\n    - name: partner-idp\n      header: x-partner-key\nauthorization:\n  roles:\n    - name: admin\n      providers: [corp]\n      permissions: [\"* /admin/**\"]\n  assignments:\n    - subjects: [ops]\n      providers: [partner-idp]\n      roles: [admin]\n",
        );
        let policy = compile(&loaded).unwrap();
        let facts = RequestFacts {
            method: &Method::DELETE,
            path: "/admin/x",
            client_ip: "127.0.0.1".parse().unwrap(),
        };
        let decide = |provider: &str, subject: &str, roles: &[&str]| {
            let mut identity = Identity::for_test(subject);
            identity.provider = provider.into();
            identity.roles = roles.iter().map(|r| (*r).into()).collect();
            policy
                .decide(&identity, &policy.roles.of(&identity), &facts)
                .allowed
        };
        assert!(decide("corp", "ann", &["admin"]));
        // another issuer naming the role does not confer it
        assert!(!decide("partner-idp", "ann", &["admin"]));
        // an assignment does, whoever verified the subject
        assert!(decide("partner-idp", "ops", &[]));
    }

    #[test]
    fn sub_is_always_the_verified_subject() {
        let mut identity = Identity::for_test("bot-7");
        identity.claims = vec![("sub".into(), serde_json::json!("alice"))];
        assert_eq!(identity.claim("sub").unwrap().as_str(), Some("bot-7"));
    }

    #[test]
    fn cross_section_mistakes_are_refused_at_load() {
        let base = "listeners:\n  - name: main\n    bind: 127.0.0.1:0\nupstreams:\n  - name: app\n    targets:\n      - url: http://127.0.0.1:9\nroutes:\n  - name: all\n    public: true\n    upstream: app\nauthentication:\n  api_keys:\n    - name: keys\n      header: x-key\n  jwt:\n    - name: corp\n      keys: { secret: 0123456789abcdef0123456789abcdef }\n      algorithms: [HS256]\n      token_source: { header: x-token }\n";
        let attempt = |authorization: &str| {
            load_str(
                &format!("{base}{authorization}"),
                "t.yaml".as_ref(),
                ".".into(),
                &|_| None,
            )
        };
        for (authorization, expected) in [
            ("authorization:\n  roles:\n    - name: a\n      providers: [nobody]\n", "authorization.roles[0].providers[0]: no authentication method is named `nobody`"),
            ("authorization:\n  assignments:\n    - subjects: [x]\n      providers: [ghost]\n      roles: []\n", "authorization.assignments[0].providers[0]: no authentication method is named `ghost`"),
            ("authorization:\n  external:\n    - name: opa\n      url: http://127.0.0.1:8181/v1/data/x\n      headers: [X-Key]\n", "authorization.external[0].headers[0]: `X-Key` carries credentials"),
            ("authorization:\n  external:\n    - name: opa\n      url: http://127.0.0.1:8181/v1/data/x\n      headers: [x-token, cookie]\n", "`x-token` carries credentials"),
            ("authorization:\n  external:\n    - name: opa\n      url: http://127.0.0.1:8181/v1/data/x\n      timeout: 0s\n", "authorization.external[0].timeout: must be more than 0"),
        ] {
            let error = attempt(authorization).unwrap_err().to_string();
            assert!(error.contains(expected), "expected {expected:?} in:\n{error}");
        }
        let warned = attempt("authorization:\n  roles:\n    - name: r\n  assignments:\n    - subjects: [alice]\n      roles: [r]\n  external:\n    - name: opa\n      url: http://127.0.0.1:8181/v1/data/x\n      on_error: allow\n").unwrap();
        let warnings: Vec<String> = warned.warnings.iter().map(ToString::to_string).collect();
        let warnings = warnings.join("\n");
        assert!(
            warnings.contains("authorization.assignments[0].subjects: without `providers`"),
            "{warnings}"
        );
        assert!(
            warnings.contains("authorization.external[0].on_error: `allow` lets requests through"),
            "{warnings}"
        );
        // a group spelled like a role is a compile error
        let loaded = attempt("authorization:\n  roles:\n    - name: admin\n  assignments:\n    - groups: [admin]\n      roles: [admin]\n").unwrap();
        let error = compile(&loaded).unwrap_err();
        assert!(
            error.contains("authorization.assignments[0].groups[0]: `admin` is a role name"),
            "{error}"
        );
    }

    #[test]
    fn config_mistakes_are_errors_at_their_field() {
        for (authorization, expected) in [
            ("authorization:\n  roles:\n    - name: a\n      includes: [b]\n    - name: b\n      includes: [a]\n", "test.yaml:15:17: authorization.roles[0].includes: roles include each other in a cycle: a → b → a"),
            ("authorization:\n  roles:\n    - name: a\n      includes: [ghost]\n", "authorization.roles[0].includes[0]: no role is named `ghost`"),
            ("authorization:\n  roles:\n    - name: a\n    - name: a\n", "authorization.roles[1].name: role `a` is defined twice"),
            ("authorization:\n  roles:\n    - name: a\n      permissions: [\"GET\"]\n", "authorization.roles[0].permissions[0]: `GET` is not `METHODS PATH`"),
            ("authorization:\n  roles:\n    - name: a\n      permissions: [\"FETCH /x\"]\n", "`FETCH` is not a method"),
            ("authorization:\n  roles:\n    - name: a\n      permissions: [\"GET x\"]\n", "must start with `/`"),
            ("authorization:\n  roles:\n    - name: a\n      permissions:\n        - methods: [GET]\n          path: /t/{x}\n          when:\n            - param_equals_claim: { param: y, claim: t }\n", "authorization.roles[0].permissions[0].when[0]: the permission's path has no parameter `{y}`"),
            ("authorization:\n  roles:\n    - name: a\n      permissions:\n        - methods: [GET]\n          path: /t\n          when:\n            - client_ip_in: [10.0.0.0/33]\n", "is not a CIDR"),
            ("authorization:\n  assignments:\n    - subjects: [x]\n      roles: [nope]\n", "authorization.assignments[0].roles[0]: no role is named `nope`"),
            ("authorization:\n  roles:\n    - name: \"a,b\"\n", "without commas"),
        ] {
            let error = compile(&load(authorization)).unwrap_err();
            assert!(error.contains(expected), "expected {expected:?} in:\n{error}");
        }
    }
}
