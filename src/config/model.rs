//! The raw config model: a one-to-one mirror of the YAML file.
//!
//! Pure data with defaults; every struct rejects unknown fields so a typo is an error rather than a
//! silently ignored setting. The `///` docs become the JSON Schema descriptions (`portcullis schema`).
//! Compiling this model into what the hot path reads happens in `crate::proxy::snapshot`.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use super::observability::*;
use super::units::{ByteSize, HumanDuration};

/// A Portcullis config file.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings: workers, logging, shutdown, trusted proxies.
    #[serde(default)]
    pub server: ServerConfig,
    /// The admin listener (`/healthz`, `/readyz`, `/config`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Where clients connect. At least one is required.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    /// Named pools of backend targets that routes forward to.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// Which requests go where, and under which policies.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Named authentication methods that routes refer to in `auth`.
    #[serde(default)]
    pub authentication: AuthenticationConfig,
    /// Who may do what once authenticated: roles, permissions, role assignments, external
    /// policy services. Deny by default: a non-public route serves only what a rule allows.
    #[serde(default)]
    pub authorization: AuthorizationConfig,
    /// Rate limits: rules, where their state lives, what clients are told.
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    /// The Redis server that replicas share state through (one-time tokens today).
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// Access log, metrics, tracing, alerts, anomaly detection, dashboard.
    #[serde(default)]
    pub observability: ObservabilityConfig,
    /// The response cache that routes with a `cache` section use: its size and where it lives.
    #[serde(default)]
    pub cache: CacheConfig,
}

/// The response cache's store (routes opt in with their own `cache` section).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Bytes of responses (bodies, headers, bookkeeping) kept in memory at most; the least
    /// recently used URLs are evicted first.
    pub max_size: ByteSize,
    /// The largest response body stored; larger ones stream through uncached.
    pub max_entry_size: ByteSize,
    /// `memory` (each replica its own) or `redis` (the top-level `redis` server, shared by the
    /// replicas; a failing Redis is a cache miss, never an error).
    pub store: StoreKind,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_size: ByteSize(64 << 20),
            max_entry_size: ByteSize(1 << 20),
            store: StoreKind::Memory,
        }
    }
}

/// A route's response caching (RFC 9111). Only `GET` requests without a body or `Range` are
/// looked up; the lookup happens after authentication, authorization and rate limits.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteCacheConfig {
    /// Freshness for responses that state none (no `max-age`, `s-maxage` or `Expires`).
    /// Absent: such responses are not stored.
    #[serde(default)]
    pub ttl: Option<HumanDuration>,
    /// Use `ttl` even when the upstream states a freshness (`no-store` and `private` are still
    /// obeyed).
    #[serde(default)]
    pub override_ttl: bool,
    /// How long past its freshness a response may still be served (`x-cache: stale`) while one
    /// background request refreshes it. The response's own `stale-while-revalidate` wins when
    /// larger; `must-revalidate`, `proxy-revalidate` and `no-cache` forbid it.
    #[serde(default)]
    pub stale_while_revalidate: Option<HumanDuration>,
    /// Serve an entry to every identity. Off (the default), a response to an authenticated
    /// request is kept for its identity alone; on, it is stored only when the upstream marks it
    /// `public`, `s-maxage` or `must-revalidate` (RFC 9111 §3.5).
    #[serde(default)]
    pub shared: bool,
}

/// Rate limiting: named rules that routes list (or that apply to every route), and where their
/// state lives.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// The rules.
    pub rules: Vec<RateLimitRuleConfig>,
    /// Send `RateLimit-Policy` and `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers) on
    /// allowed and refused responses.
    pub headers: bool,
    /// Keys remembered in this process at most; keys whose limit has fully recovered are
    /// dropped first (they hold no information).
    pub max_keys: usize,
    /// Where the counts live: `memory` (this process) or `redis` (the top-level `redis` server,
    /// one limit for all replicas: one atomic script per request phase decides all its rules).
    pub store: StoreKind,
    /// With `store: redis`, when Redis fails or is slower than `redis.timeout`:
    /// `fail_open` enforces the limits in this process, sized to its share (`1/replicas`);
    /// `fail_closed` refuses with 503.
    pub on_store_error: StoreFailure,
    /// How many replicas share the limits (sizes this replica's share under `fail_open`).
    pub replicas: u32,
    /// With `store: redis`: `fast` (the default) decides in this process and syncs counts with
    /// Redis every `sync_interval`, so no request waits on Redis and replicas may overshoot a
    /// limit by a bounded amount; `exact` asks Redis on every request (one round trip).
    pub redis_mode: RedisLimitMode,
    /// How often `fast` mode syncs counts with Redis.
    pub sync_interval: HumanDuration,
    /// Adaptive limits: clients that behave suspiciously get tighter limits or a block.
    pub adaptive: Option<AdaptiveConfig>,
    /// Open connections one client address (the TCP peer) may have, over all listeners; more
    /// are closed at once.
    pub max_connections_per_ip: Option<usize>,
}

/// A behaviour score per client address, client network and subject, raised by suspicious
/// events and decaying over time; thresholds map it to a multiplier on that client's limits or
/// a temporary block.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// Points added per event.
    pub points: AdaptivePointsConfig,
    /// A score halves in this time without new events.
    pub half_life: HumanDuration,
    /// Prefix lengths of the scored client network.
    pub network: NetworkPrefixConfig,
    /// From the lowest score up; the highest threshold reached applies.
    pub thresholds: Vec<AdaptiveThresholdConfig>,
    /// A multiplier above 1 for subjects with a clean authenticated history.
    pub bonus: Option<AdaptiveBonusConfig>,
    /// Scored clients remembered at most (the lowest scores are forgotten first).
    pub max_entries: usize,
    /// With `rate_limits.store: redis`, how often replicas share their scores.
    pub sync_interval: HumanDuration,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            points: AdaptivePointsConfig::default(),
            half_life: HumanDuration::from_secs(600),
            network: NetworkPrefixConfig::default(),
            thresholds: Vec::new(),
            bonus: None,
            max_entries: 100_000,
            sync_interval: HumanDuration::from_millis(500),
        }
    }
}

/// Points per suspicious event.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptivePointsConfig {
    /// A 401: a missing or refused credential.
    pub auth_failure: f64,
    /// A 403.
    pub forbidden: f64,
    /// A 404 (a burst of them is scanning).
    pub not_found: f64,
    /// A malformed request (400, 413).
    pub malformed: f64,
    /// A 429.
    pub rate_limited: f64,
}

impl Default for AdaptivePointsConfig {
    fn default() -> Self {
        Self {
            auth_failure: 5.0,
            forbidden: 3.0,
            not_found: 1.0,
            malformed: 5.0,
            rate_limited: 2.0,
        }
    }
}

/// What a score leads to: `multiplier` (0 < m < 1) on the client's limits, or `block` for a
/// period (every request refused with 429).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveThresholdConfig {
    pub score: f64,
    #[serde(default)]
    pub multiplier: Option<f64>,
    #[serde(default)]
    pub block: Option<HumanDuration>,
}

/// Subjects with at least `min_requests` successful authenticated requests and a score below
/// `max_score` get their limits multiplied by `multiplier` (> 1).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveBonusConfig {
    pub min_requests: u64,
    pub multiplier: f64,
    #[serde(default = "default_bonus_max_score")]
    pub max_score: f64,
}

fn default_bonus_max_score() -> f64 {
    1.0
}

/// How limits kept in Redis are decided.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RedisLimitMode {
    /// Locally, with counts synced in the background.
    #[default]
    Fast,
    /// By Redis, on every request.
    Exact,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            rules: Vec::new(),
            headers: true,
            max_keys: 100_000,
            store: StoreKind::Memory,
            on_store_error: StoreFailure::FailOpen,
            replicas: 1,
            redis_mode: RedisLimitMode::Fast,
            sync_interval: HumanDuration::from_millis(50),
            adaptive: None,
            max_connections_per_ip: None,
        }
    }
}

/// What a failing shared store means for the requests that need it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StoreFailure {
    /// Decide locally instead.
    #[default]
    FailOpen,
    /// Refuse with 503.
    FailClosed,
}

/// One rate-limit rule.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRuleConfig {
    /// Unique name; routes list rules by name, and it names the policy in the headers.
    pub name: String,
    /// What is counted separately, combined: `client_ip`, `client_network`, `subject`,
    /// `api_key`, `route`, `method`, `class` (read = GET/HEAD/OPTIONS, write = the rest),
    /// `claim:NAME`, `header:NAME`. Empty: one counter for everything the rule sees.
    #[serde(default)]
    pub key: Vec<String>,
    /// `100/s`, `600/min`, `5000/h`, `100000/d`.
    pub rate: String,
    /// Requests allowed at once above the sustained rate's spacing. Default: the rate's count.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Apply to every route (routes need not list it).
    #[serde(default)]
    pub global: bool,
    /// Only requests of this class: `read` or `write`. Absent: both.
    #[serde(default)]
    pub class: Option<RequestClass>,
    /// Only these methods. Empty: all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Prefix lengths for `client_network`.
    #[serde(default)]
    pub network: NetworkPrefixConfig,
    /// Count and log, but never refuse (for a safe rollout).
    #[serde(default)]
    pub shadow: bool,
}

/// Read (GET, HEAD, OPTIONS) or write (everything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestClass {
    Read,
    Write,
}

/// How much of an address is the client's network.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkPrefixConfig {
    pub ipv4: u8,
    pub ipv6: u8,
}

impl Default for NetworkPrefixConfig {
    fn default() -> Self {
        Self { ipv4: 24, ipv6: 56 }
    }
}

/// Role-based access control, evaluated after authentication on every non-public route.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuthorizationConfig {
    /// Named sets of permissions. A role may include other roles (no cycles).
    pub roles: Vec<RoleConfig>,
    /// Static role grants by subject or by group (a name a credential carries in its roles that
    /// is not itself a configured role, e.g. an IdP group).
    pub assignments: Vec<RoleAssignmentConfig>,
    /// HTTP policy services (OPA's data API shape) that routes may consult with `external`.
    pub external: Vec<ExternalAuthorizerConfig>,
}

/// A role: a named set of permissions.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// Unique name; credentials carry it (JWT `roles_claim`, API-key `roles`, mTLS `roles`).
    pub name: String,
    /// Roles whose permissions this role has too.
    #[serde(default)]
    pub includes: Vec<String>,
    /// Authentication methods (by name) whose credentials may confer this role. Empty: any.
    /// Assignments grant it regardless.
    #[serde(default)]
    pub providers: Vec<String>,
    /// What the role allows: `"GET,HEAD /orders/**"` (methods, or `*` for all, then a path
    /// pattern), or the long form with conditions.
    #[serde(default)]
    pub permissions: Vec<PermissionConfig>,
}

/// One permission: the short form `"METHODS PATH"` or a mapping with conditions.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum PermissionConfig {
    /// `"GET,HEAD /orders/**"`, `"* /admin/**"`.
    Short(String),
    /// Methods, a path pattern and conditions.
    Full(PermissionRuleConfig),
}

impl<'de> Deserialize<'de> for PermissionConfig {
    // hand-written instead of `untagged` so that a mistake in the long form reports its field
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PermissionConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a permission: \"METHODS PATH\" or {methods, path, when}")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(PermissionConfig::Short(text.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                PermissionRuleConfig::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(PermissionConfig::Full)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The long form of a permission.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PermissionRuleConfig {
    /// Methods (`GET`, `POST`, ...), or `["*"]` for all.
    pub methods: Vec<String>,
    /// A path pattern in the routing language (`/tenants/{tenant}/**`), matched against the
    /// normalised request path (before any rewrite).
    pub path: String,
    /// Conditions that must all hold.
    #[serde(default)]
    pub when: Vec<ConditionConfig>,
}

/// An attribute check beyond roles.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum ConditionConfig {
    /// A path parameter of the permission's pattern must equal a claim (or one element of an
    /// array claim): `{param: tenant, claim: tenant}`.
    ParamEqualsClaim { param: String, claim: String },
    /// A claim (dotted path; any element of an array claim) must be one of these values.
    ClaimIn { claim: String, values: Vec<String> },
    /// The client address must be in one of these networks (CIDRs).
    ClientIpIn(Vec<String>),
}

/// Grants roles to identities, whatever their credential says.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleAssignmentConfig {
    /// Subjects that get the roles.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Groups (names the credential carries in its roles) that get the roles.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Only identities verified by these authentication methods. Empty: any.
    #[serde(default)]
    pub providers: Vec<String>,
    /// The roles granted.
    pub roles: Vec<String>,
}

/// An external policy service asked over HTTP: `POST url` with `{"input": {...}}`, answered
/// `{"result": true}` or `{"result": {"allow": true}}` (OPA's data API).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExternalAuthorizerConfig {
    /// Unique name that routes refer to in `authorization.external`.
    pub name: String,
    /// e.g. `http://127.0.0.1:8181/v1/data/portcullis/allow` (`https://`, or `http://` to a
    /// loopback address).
    pub url: String,
    /// An answer that takes longer counts as an error.
    #[serde(default = "default_external_timeout")]
    pub timeout: HumanDuration,
    /// How long a decision is remembered for the same identity and request (0: never).
    #[serde(default = "default_external_cache_ttl")]
    pub cache_ttl: HumanDuration,
    /// Decisions remembered at most.
    #[serde(default = "default_verified_cache")]
    pub cache_size: usize,
    /// What an error or timeout means: `deny` (fail closed, the default) or `allow`.
    #[serde(default)]
    pub on_error: FailureMode,
    /// Request headers passed in `input.request.headers` (credentials never are).
    #[serde(default)]
    pub headers: Vec<String>,
    /// Claims (dotted paths) passed in `input.identity.claims`.
    #[serde(default)]
    pub claims: Vec<String>,
}

fn default_external_timeout() -> HumanDuration {
    HumanDuration::from_millis(200)
}

fn default_external_cache_ttl() -> HumanDuration {
    HumanDuration::from_secs(10)
}

/// What an unavailable dependency means for a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Refuse (fail closed).
    #[default]
    Deny,
    /// Let the request through (fail open).
    Allow,
}

/// A route's authorization rule. Without one, the route's permissions decide: a role of the
/// identity must grant the method and path.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RouteAuthorizationConfig {
    /// Every verified identity may use the route (an explicit, logged choice).
    pub any_authenticated: bool,
    /// The identity must hold one of these roles (directly or by inclusion); replaces the
    /// permission check.
    pub roles: Vec<String>,
    /// The credential must carry all of these OAuth scopes; replaces the permission check.
    pub scopes: Vec<String>,
    /// Also ask this external policy service (by name) once the local rule allowed.
    pub external: Option<String>,
}

/// A Redis server shared by the gateway's replicas.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:PASSWORD@]HOST[:PORT][/DB]` (plain TCP; keep Redis on a private network).
    /// Take a password from the environment: `url: "${REDIS_URL}"`.
    pub url: String,
    /// How long one Redis command may take; past it the request is refused (fail closed).
    #[serde(default = "default_redis_timeout")]
    pub timeout: HumanDuration,
    /// Prefix of every key the gateway writes, so that several gateways can share one server.
    #[serde(default = "default_redis_prefix")]
    pub key_prefix: String,
    /// `url` is a seed node of a Redis Cluster: the gateway discovers the others and sends
    /// each key to the node that owns it.
    #[serde(default)]
    pub cluster: bool,
}

fn default_redis_timeout() -> HumanDuration {
    HumanDuration::from_millis(250)
}

fn default_redis_prefix() -> String {
    "portcullis:".to_owned()
}

/// Where state that replicas may share is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In this process (each replica keeps its own).
    #[default]
    Memory,
    /// In the top-level `redis` server, shared by every replica.
    Redis,
}

/// Authentication methods, by name, and how a verified identity reaches the upstream.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuthenticationConfig {
    /// JWT providers (signed tokens, JWS).
    pub jwt: Vec<JwtProviderConfig>,
    /// Sets of API keys.
    pub api_keys: Vec<ApiKeySetConfig>,
    /// OAuth 2.0 token introspection (RFC 7662) for opaque access tokens.
    pub introspection: Vec<IntrospectionConfig>,
    /// TLS client certificates (the listener must have `tls.client_auth`).
    pub mtls: Vec<MtlsConfig>,
    /// Headers that carry the verified identity to the upstream. Whatever a client sends in
    /// these headers is always removed first, on every route.
    pub identity_headers: IdentityHeadersConfig,
    /// Where revocations made through the admin API are kept.
    pub revocations: RevocationsConfig,
}

/// Where revocations are kept, and how often replicas catch up with each other's.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationsConfig {
    /// `memory`: each process keeps its own. `redis`: kept in the top-level `redis` server; a
    /// revocation made at any replica's admin API reaches every replica within `sync_interval`.
    pub store: StoreKind,
    /// How often each replica reads the shared revocations (with `store: redis`).
    pub sync_interval: HumanDuration,
}

impl Default for RevocationsConfig {
    fn default() -> Self {
        Self {
            store: StoreKind::Memory,
            sync_interval: HumanDuration::from_secs(1),
        }
    }
}

/// A JWT provider: where its keys come from and what its tokens must say.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JwtProviderConfig {
    /// Unique name (one namespace for all authentication methods), used by routes in `auth`.
    pub name: String,
    /// Required `iss` value.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted `aud` values (the token must name at least one). Empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Allowed algorithms. Each must fit the key it is used with (an RSA key never verifies an
    /// HS or ES token). `none` does not exist here.
    #[serde(default = "default_jwt_algorithms")]
    pub algorithms: Vec<String>,
    /// Where the verification keys come from.
    pub keys: JwtKeysConfig,
    /// Clock skew tolerated for `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway: HumanDuration,
    /// Reject tokens without `exp`.
    #[serde(default = "default_true")]
    pub require_exp: bool,
    /// Reject tokens whose lifetime (`exp - iat`) is longer, or that have no `iat`.
    #[serde(default)]
    pub max_lifetime: Option<HumanDuration>,
    /// Required `typ` header value (e.g. `at+jwt`), compared case-insensitively.
    #[serde(default)]
    pub typ: Option<String>,
    /// Claims that must be present with exactly these values.
    #[serde(default)]
    pub required_claims: std::collections::BTreeMap<String, serde_json::Value>,
    /// Where the token is read from. Default: `Authorization: Bearer`.
    #[serde(default)]
    pub token_source: TokenSourceConfig,
    /// Also send the original token upstream (in the header or cookie it came in).
    #[serde(default = "default_true")]
    pub forward_token: bool,
    /// Claims copied to upstream headers, e.g. `{tenant: x-auth-tenant}`.
    #[serde(default)]
    pub claim_headers: std::collections::BTreeMap<String, String>,
    /// Where roles are read from in the claims (dotted path, e.g. `realm_access.roles`; a
    /// string is split on spaces, as `scope` is).
    #[serde(default)]
    pub roles_claim: Option<String>,
    /// Verified tokens remembered (by SHA-256 of the token, never past `exp`), so repeated
    /// tokens skip the signature check.
    #[serde(default = "default_verified_cache")]
    pub cache_size: usize,
    /// Accept each token (`jti`) only once, until it expires: replay defence for one-time tokens.
    /// Tokens without `jti` are refused. Remembered where `replay_store` says.
    #[serde(default)]
    pub one_time_use: bool,
    /// Where used token ids (`one_time_use`) and DPoP proof ids are remembered: `memory` (this
    /// process) or `redis` (the top-level `redis` server, shared by every replica).
    #[serde(default)]
    pub replay_store: StoreKind,
    /// The gateway's private keys (PKCS#8 PEM, RSA or EC P-256/P-384) for encrypted tokens (JWE
    /// with RSA-OAEP-256 or ECDH-ES(+A256KW), A256GCM/A128GCM). The nested signed JWT is then
    /// verified as usual. Empty: encrypted tokens are refused.
    #[serde(default)]
    pub decryption_keys: Vec<std::path::PathBuf>,
    /// Accept DPoP-bound tokens (RFC 9449: `cnf.jkt`, `Authorization: DPoP`, a proof in the
    /// `DPoP` header). Without this, DPoP-bound tokens are refused.
    #[serde(default)]
    pub dpop: Option<DpopConfig>,
}

/// DPoP settings of a JWT provider.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DpopConfig {
    /// Refuse tokens that are not DPoP-bound (sender-constrained tokens only).
    #[serde(default)]
    pub required: bool,
    /// How old a proof (`iat`) may be.
    #[serde(default = "default_dpop_max_age")]
    pub max_age: HumanDuration,
}

fn default_dpop_max_age() -> HumanDuration {
    HumanDuration::from_secs(60)
}

/// Exactly one key source.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum JwtKeysConfig {
    /// A JWKS document on disk (read at load and at every reload).
    JwksFile(std::path::PathBuf),
    /// A JWKS URL, fetched at start, refreshed on a schedule and when a token names an unknown
    /// `kid` (at most once per `min_refresh_interval`); a failed fetch keeps the last good keys.
    JwksUrl {
        url: String,
        #[serde(default = "default_jwks_refresh")]
        refresh_interval: HumanDuration,
        #[serde(default = "default_jwks_min_refresh")]
        min_refresh_interval: HumanDuration,
    },
    /// OpenID Connect discovery: `{issuer}/.well-known/openid-configuration` names the JWKS
    /// (`jwks_uri`), which is then fetched and refreshed like `jwks_url`. The provider's `issuer`
    /// defaults to this one, and the document must name it.
    OidcIssuer {
        issuer: String,
        #[serde(default = "default_jwks_refresh")]
        refresh_interval: HumanDuration,
        #[serde(default = "default_jwks_min_refresh")]
        min_refresh_interval: HumanDuration,
    },
    /// A shared secret for HS256/384/512 (use `${ENV}`; at least 32 bytes).
    Secret(String),
    /// A PEM public key file (RSA, EC or Ed25519).
    PublicKeyPem(std::path::PathBuf),
}

/// Where a token is read from.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum TokenSourceConfig {
    /// `Authorization: Bearer <token>`.
    #[default]
    Bearer,
    /// The whole value of this header.
    Header(String),
    /// This cookie.
    Cookie(String),
    /// This query parameter (discouraged: URLs end up in logs). The parameter is removed from
    /// the URL sent upstream.
    Query(String),
}

/// A set of API keys.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySetConfig {
    /// Unique name (one namespace for all authentication methods), used by routes in `auth`.
    pub name: String,
    /// Header carrying the key.
    #[serde(default = "default_api_key_header")]
    pub header: String,
    /// Also accept the key in this query parameter (removed from the URL sent upstream).
    #[serde(default)]
    pub query: Option<String>,
    /// The keys, stored as SHA-256 hashes (see `portcullis key generate`).
    #[serde(default)]
    pub keys: Vec<ApiKeyConfig>,
    /// A YAML file holding more keys (a list in the same shape as `keys`), relative to the config
    /// file. Lets a key-management job rewrite the keys without touching the gateway's config;
    /// it is re-read on every reload.
    #[serde(default)]
    pub keys_file: Option<std::path::PathBuf>,
}

/// One API key. Several keys may share an `id`, which is how a client rotates its key.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The identity the key authenticates (sent upstream as the subject).
    pub id: String,
    /// Hex SHA-256 of the key.
    pub sha256: String,
    /// Roles granted to this identity.
    #[serde(default)]
    pub roles: Vec<String>,
    /// OAuth-style scopes the key carries (for routes that require scopes).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Attributes of the identity that authorization conditions read as claims, e.g.
    /// `{tenant: acme}`.
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, serde_json::Value>,
    /// The key stops working at this time (RFC 3339, e.g. `2027-01-31T00:00:00Z`).
    #[serde(default)]
    pub expires: Option<String>,
}

/// Names of the identity headers sent upstream.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeadersConfig {
    pub subject: String,
    pub issuer: String,
    /// `jwt`, `api_key`, `introspection` or `mtls`.
    pub method: String,
    /// The provider's name.
    pub provider: String,
    /// Comma-separated roles.
    pub roles: String,
}

impl Default for IdentityHeadersConfig {
    fn default() -> Self {
        Self {
            subject: "x-auth-subject".into(),
            issuer: "x-auth-issuer".into(),
            method: "x-auth-method".into(),
            provider: "x-auth-provider".into(),
            roles: "x-auth-roles".into(),
        }
    }
}

fn default_jwt_algorithms() -> Vec<String> {
    ["RS256", "PS256", "ES256", "EdDSA"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_leeway() -> HumanDuration {
    HumanDuration::from_secs(30)
}

fn default_verified_cache() -> usize {
    10_000
}

fn default_jwks_refresh() -> HumanDuration {
    HumanDuration::from_secs(300)
}

fn default_jwks_min_refresh() -> HumanDuration {
    HumanDuration::from_secs(30)
}

/// An OAuth 2.0 introspection endpoint (RFC 7662) that says whether an opaque token is active.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// Unique name (shared namespace with JWT providers and API key sets).
    pub name: String,
    /// The introspection endpoint (`https://`, or `http://` to a loopback address).
    pub endpoint: String,
    /// The gateway's client credentials at the authorization server (HTTP Basic).
    pub client_id: String,
    /// Use `"${ENV}"`.
    pub client_secret: String,
    /// An answer that takes longer refuses the request (fail closed).
    #[serde(default = "default_introspection_timeout")]
    pub timeout: HumanDuration,
    /// Active answers are remembered (by SHA-256 of the token) until the token's `exp`, but at
    /// most this long, so a revocation at the server takes effect within it. Errors and inactive
    /// answers are never remembered.
    #[serde(default = "default_introspection_ttl")]
    pub max_cache_ttl: HumanDuration,
    /// Answers remembered at most.
    #[serde(default = "default_verified_cache")]
    pub cache_size: usize,
    /// Required `aud` (any of) in the answer. Empty: not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where roles are read from in the answer (`scope` is split on spaces).
    #[serde(default = "default_scope_claim")]
    pub roles_claim: String,
    /// Also send the original token upstream.
    #[serde(default = "default_true")]
    pub forward_token: bool,
}

fn default_introspection_timeout() -> HumanDuration {
    HumanDuration::from_secs(2)
}

fn default_introspection_ttl() -> HumanDuration {
    HumanDuration::from_secs(60)
}

fn default_scope_claim() -> String {
    "scope".into()
}

fn default_api_key_header() -> String {
    "x-api-key".into()
}

/// Process-wide settings.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Worker threads, each with its own single-threaded runtime. Default: one per CPU core.
    /// Changing it needs a restart.
    pub workers: Option<usize>,
    /// How long in-flight requests may take to finish after SIGTERM/SIGINT (or a hand-over to a
    /// new process) before connections are closed.
    pub shutdown_timeout: HumanDuration,
    /// Log output format and level.
    pub log: LogConfig,
    /// Deprecated: use `observability.access_log.enabled` (this one, when set, wins and is
    /// warned about).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<bool>,
    /// Proxies (CIDRs) whose `X-Forwarded-*`, `Forwarded` and `x-request-id` headers are believed.
    /// From anyone else those headers are replaced.
    pub trusted_proxies: Vec<String>,
    /// Watch the config file and reload it when it changes (SIGHUP always reloads).
    pub watch_config: bool,
    /// A Unix socket path on which the running gateway hands its listening sockets to a new
    /// process started with `portcullis run --upgrade` (zero-downtime restart, see
    /// `docs/restart.md`). Relative to the config file's directory. Unset: no hand-over.
    /// Changing it needs a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_socket: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            workers: None,
            shutdown_timeout: HumanDuration::from_secs(30),
            log: LogConfig::default(),
            access_log: None,
            trusted_proxies: Vec::new(),
            watch_config: true,
            upgrade_socket: None,
        }
    }
}

/// Log output.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `json` (one object per line) or `human`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `portcullis=debug,info`. `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            level: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Json,
    Human,
}

/// The admin listener. It binds to loopback by default and is never exposed through routes.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Set to `false` to run without an admin listener.
    pub enabled: bool,
    /// Address to bind, e.g. `127.0.0.1:9901`.
    pub bind: String,
    /// Bearer token for every admin endpoint but `/healthz` and `/readyz` (use `"${ENV}"`).
    /// Without it, reads are open and changes (`POST`/`DELETE`) are refused.
    pub token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: "127.0.0.1:9901".into(),
            token: None,
        }
    }
}

/// A socket that accepts client connections.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Unique name, used in logs and to match listeners across reloads.
    pub name: String,
    /// Address to bind, e.g. `0.0.0.0:8443` or `[::]:8080`.
    pub bind: String,
    /// Serve TLS on this listener (HTTP/2 is negotiated with ALPN). Without it the listener serves
    /// plaintext HTTP/1.1 and h2c with prior knowledge.
    #[serde(default)]
    pub tls: Option<ServerTlsConfig>,
    /// Accept HTTP/2 (ALPN `h2` over TLS, prior-knowledge h2c on plaintext).
    #[serde(default = "default_true")]
    pub http2: bool,
    /// Also serve HTTP/3 (QUIC, UDP) on the same address with the listener's certificates
    /// (experimental; TLS listeners only): `true`, or a mapping with its settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http3: Option<Http3Setting>,
    /// Protective limits against oversize and slow clients.
    #[serde(default)]
    pub limits: ListenerLimits,
    /// Response compression for the routes served here that have no `compression` of their own.
    /// Absent: responses are sent as the upstream sent them.
    #[serde(default)]
    pub compression: Option<CompressionConfig>,
}

impl ListenerConfig {
    /// The HTTP/3 settings when HTTP/3 is switched on.
    pub fn http3(&self) -> Option<Http3Config> {
        match self.http3.as_ref()? {
            Http3Setting::Enabled(true) => Some(Http3Config::default()),
            Http3Setting::Enabled(false) => None,
            Http3Setting::Config(config) => config.enabled.then(|| config.clone()),
        }
    }
}

/// `http3: true` or `http3: {enabled, advertise_max_age, max_streams}`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Http3Setting {
    Enabled(bool),
    Config(Http3Config),
}

impl<'de> Deserialize<'de> for Http3Setting {
    // hand-written instead of `untagged` so that a mistake in the long form reports its field
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Http3Setting;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`true`, `false` or {enabled, advertise_max_age, max_streams}")
            }
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Self::Value, E> {
                Ok(Http3Setting::Enabled(value))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                Http3Config::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Http3Setting::Config)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// HTTP/3 on a TLS listener.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Http3Config {
    /// Serve HTTP/3 (the long form's switch, so the settings can stay while it is off).
    pub enabled: bool,
    /// `ma` of the `Alt-Svc` header the TCP listener sends: how long clients may remember that
    /// HTTP/3 is offered. `0s`: no `Alt-Svc` (clients must be told some other way).
    pub advertise_max_age: HumanDuration,
    /// Requests one QUIC connection may have in flight at once (QUIC bidirectional streams).
    pub max_streams: u32,
}

impl Default for Http3Config {
    fn default() -> Self {
        Self {
            enabled: true,
            advertise_max_age: HumanDuration::from_secs(86_400),
            max_streams: 100,
        }
    }
}

/// Limits applied to every connection on a listener.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerLimits {
    /// Largest request head (request line plus headers); larger gets 431.
    pub max_header_bytes: ByteSize,
    /// Most header fields in one request; more gets 431.
    pub max_headers: usize,
    /// Largest request body; larger gets 413. Routes may set a lower `max_body`.
    pub max_body: ByteSize,
    /// Time a client has to send a complete request head; slower gets 408 and the connection closes.
    pub header_timeout: HumanDuration,
    /// A connection with no request in flight and no bytes for this long is closed.
    pub idle_timeout: HumanDuration,
    /// Most concurrent connections on this listener; further ones are closed at once.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_header_bytes: ByteSize::kib(16),
            max_headers: 100,
            max_body: ByteSize::mib(10),
            header_timeout: HumanDuration::from_secs(10),
            idle_timeout: HumanDuration::from_secs(60),
            max_connections: 10_000,
        }
    }
}

/// TLS for a listener: one or more certificates, chosen by SNI.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// Certificates; the first is the default when SNI matches none (or is absent).
    pub certificates: Vec<CertificateConfig>,
    /// Lowest TLS version accepted: `"1.2"` or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Ask clients for a certificate, verified against a CA (for `authentication.mtls` and
    /// certificate-bound tokens).
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
}

/// Client certificates on a TLS listener.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    /// PEM bundle of the CAs that issue client certificates.
    pub ca: PathBuf,
    /// Refuse the TLS handshake without a valid certificate. `false`: a certificate is
    /// requested, verified when presented, and optional (routes decide).
    #[serde(default)]
    pub required: bool,
}

/// Authentication by a verified TLS client certificate.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MtlsConfig {
    /// Unique name (shared namespace with the other methods).
    pub name: String,
    /// Which certificate field becomes the subject.
    #[serde(default)]
    pub identity_from: CertificateIdentity,
    /// Accepted identities: exact, or a prefix ending in `*` (`spiffe://prod.example/*`).
    /// Empty: any certificate the listener's CA verified.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Roles per identity.
    #[serde(default)]
    pub roles: std::collections::BTreeMap<String, Vec<String>>,
}

/// The certificate field an identity is taken from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CertificateIdentity {
    /// The first URI SAN (e.g. a SPIFFE ID).
    #[default]
    UriSan,
    /// The first DNS SAN.
    DnsSan,
    /// The subject's common name.
    CommonName,
}

/// A PEM certificate chain and its private key.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// PEM file with the certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names this certificate serves (`api.example.com`, `*.example.com`). Empty: only the default.
    #[serde(default)]
    pub server_names: Vec<String>,
}

/// Lowest TLS version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// A named pool of backend targets.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name that routes refer to.
    pub name: String,
    /// Targets as URLs: `http://host:port` (HTTP/1.1), `h2c://host:port` (HTTP/2 prior knowledge),
    /// `https://host:port` (TLS; HTTP/2 or HTTP/1.1 by ALPN). All targets share one scheme.
    pub targets: Vec<TargetConfig>,
    /// How a target is picked for each request.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Active health checks: unhealthy targets get no traffic until they pass again.
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Passive outlier ejection from real traffic.
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetectionConfig>,
    /// Connect, per-try and total timeouts.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Retries of idempotent requests.
    #[serde(default)]
    pub retries: RetryConfig,
    /// TLS settings for `https` targets.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
    /// Idle keep-alive connections kept per target and worker.
    #[serde(default = "default_pool_idle")]
    pub max_idle_connections: usize,
    /// How long an idle pooled connection is kept.
    #[serde(default = "default_pool_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Requests in flight to this upstream at most (over all routes); more are refused with 503,
    /// so a backend stays within its capacity.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
}

/// One backend target.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `http://host:port`, `h2c://host:port` or `https://host:port`.
    pub url: String,
    /// Relative share of traffic (1-1000).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Load-balancing policy.
///
/// The field-less policies are written as empty structs so that serde rejects unknown fields
/// next to `policy:` (a unit variant would silently ignore them).
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, tag = "policy", rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Weighted round robin.
    RoundRobin {},
    /// Power of two random choices, preferring the target with fewer requests in flight per weight.
    LeastRequest {},
    /// A ring of target points; the same key goes to the same target while it is healthy.
    ConsistentHash {
        /// What to hash: `{header: NAME}`, `{cookie: NAME}` or `client_ip`.
        hash_on: HashOn,
    },
}

/// The key for consistent hashing.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HashOn {
    /// A request header's value.
    Header(String),
    /// A cookie's value.
    Cookie(String),
    /// The client's IP address (after trusted-proxy resolution).
    ClientIp,
}

/// Active HTTP health checks.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    /// Path requested with GET; a 2xx or 3xx answer is a pass.
    pub path: String,
    /// Time between checks of one target.
    pub interval: HumanDuration,
    /// A check that takes longer fails.
    pub timeout: HumanDuration,
    /// Consecutive passes that make an unhealthy target healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy target unhealthy.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/healthz".into(),
            interval: HumanDuration::from_secs(5),
            timeout: HumanDuration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

/// Passive outlier ejection.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetectionConfig {
    /// Consecutive failures (connect errors, timeouts, protocol errors or 5xx answers) that eject a target.
    pub consecutive_failures: u32,
    /// How long an ejected target gets no traffic.
    pub ejection_time: HumanDuration,
    /// Never eject more than this share of an upstream's targets (percent, rounded down: with
    /// one target and 50%, nothing is ever ejected).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetectionConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            ejection_time: HumanDuration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

/// Upstream timeouts.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Establishing a TCP connection (and, separately, its TLS handshake).
    pub connect: HumanDuration,
    /// One attempt, until the response head arrives; exceeded gives 504.
    pub per_try: HumanDuration,
    /// All attempts together, until the response head arrives; exceeded gives 504.
    pub total: HumanDuration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect: HumanDuration::from_secs(2),
            per_try: HumanDuration::from_secs(15),
            total: HumanDuration::from_secs(30),
        }
    }
}

/// Retries for idempotent requests without a body, on connect failure or a 502/503 answer.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after the first attempt (0 disables retries).
    pub max_retries: u32,
    /// Retries may add at most this share of the upstream's retryable requests (percent) ...
    pub budget_percent: u32,
    /// ... plus this many retries per second, so low traffic can still retry.
    pub min_retries_per_second: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 1,
            budget_percent: 20,
            min_retries_per_second: 10,
        }
    }
}

/// TLS towards `https` targets. The server is always verified.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM bundle of CAs to trust instead of the built-in web roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Server name to send (SNI) and verify, instead of the target's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM client certificate chain, for upstreams that require mTLS.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key for `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
}

/// A route: which requests it matches, what guards it, where it goes.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in logs.
    pub name: String,
    /// What a request must look like to take this route.
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    /// Serve without authentication. Zero trust: a route must either declare authentication or
    /// say `public: true` explicitly.
    #[serde(default)]
    pub public: bool,
    /// Authentication methods (names from `authentication`); a request passes if any verifies it.
    #[serde(default)]
    pub auth: Vec<String>,
    /// The upstream (by name) that receives the request.
    pub upstream: String,
    /// Changes to the request before it is forwarded.
    #[serde(default)]
    pub rewrite: Option<RewriteConfig>,
    /// Largest request body on this route (at most the listener's `max_body`).
    #[serde(default)]
    pub max_body: Option<ByteSize>,
    /// Listeners (by name) that serve this route. Empty: all listeners.
    #[serde(default)]
    pub listeners: Vec<String>,
    /// Who may use the route once authenticated. Absent: the roles' permissions decide.
    #[serde(default)]
    pub authorization: Option<RouteAuthorizationConfig>,
    /// Rate-limit rules (by name) for this route, besides the global ones.
    #[serde(default)]
    pub rate_limits: Vec<String>,
    /// Requests in flight on this route at most; more are refused with 503 (load shedding).
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Put (the first bytes of) request and response bodies in the access log, redacted.
    #[serde(default)]
    pub capture_payload: Option<CapturePayloadConfig>,
    /// Serve `GET` responses from the cache (see `docs/caching.md`).
    #[serde(default)]
    pub cache: Option<RouteCacheConfig>,
    /// Answer with one JSON response composed of several upstream calls instead of forwarding
    /// the request (see `docs/composition.md`).
    #[serde(default)]
    pub compose: Option<ComposeConfig>,
    /// Translate gRPC-Web requests (`application/grpc-web[-text]`, over HTTP/1.1 or HTTP/2) to
    /// gRPC for the upstream, which must speak HTTP/2 (`h2c://` or `https://` targets).
    #[serde(default)]
    pub grpc_web: bool,
    /// Let WebSocket upgrades (HTTP/1.1 `Upgrade: websocket`) through to the upstream, which must
    /// speak HTTP/1.1. Off (the default): the upgrade headers of a request are removed like any
    /// other hop-by-hop header, so the upstream sees a plain request and no tunnel can open.
    /// Every policy of the route runs on the upgrade request.
    #[serde(default)]
    pub websocket: bool,
    /// A WebSocket tunnel with no byte in either direction for this long is closed (needs
    /// `websocket: true`). Default: 5m.
    #[serde(default)]
    pub websocket_idle_timeout: Option<HumanDuration>,
    /// Response compression on this route, replacing the listener's `compression` as a whole
    /// (`enabled: false` turns a listener's compression off here). Absent: the listener's.
    #[serde(default)]
    pub compression: Option<CompressionConfig>,
}

/// Request composition: upstream calls made in parallel (or after the calls whose JSON they
/// use), merged into one JSON response.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComposeConfig {
    /// The calls (at most 16). A call whose path uses another call's JSON runs after it; the
    /// others run in parallel.
    pub calls: Vec<ComposeCallConfig>,
    /// `sections` (the default): `{"<call name>": <its JSON>, ...}`; `object`: the calls' JSON
    /// objects merged into one, later calls winning on equal keys.
    #[serde(default)]
    pub merge: ComposeMerge,
    /// When a call fails: `fail` (the default) answers 502 `composition_failed`; `partial`
    /// answers 200 with what succeeded, the failed calls as `null` sections, their reasons under
    /// `"_errors"` and their names in the `x-compose-partial` header.
    #[serde(default)]
    pub on_failure: ComposeFailure,
    /// The sum of the calls' response bodies at most; more fails the whole request (502).
    #[serde(default = "default_compose_max_response")]
    pub max_response_size: ByteSize,
}

fn default_compose_max_response() -> ByteSize {
    ByteSize(1 << 20)
}

/// How composed results are put together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComposeMerge {
    #[default]
    Sections,
    Object,
}

/// What a failed call does to the composed response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ComposeFailure {
    #[default]
    Fail,
    Partial,
}

/// One upstream call of a composed response.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComposeCallConfig {
    /// Names the call's section and lets later calls use its JSON (`{name.field}`).
    pub name: String,
    /// The upstream (by name); absent: the route's.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Path and query sent, with placeholders: `{param}` (the route's path parameters),
    /// `{subject}` (the authenticated subject), `{call.field.0.name}` (a field of an earlier
    /// call's JSON). Values are percent-encoded.
    pub path: String,
    /// `GET` (the default) or another method without a body.
    #[serde(default = "default_compose_method")]
    pub method: String,
    /// How long the call may take; absent: the upstream's total timeout.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
}

fn default_compose_method() -> String {
    "GET".to_owned()
}

/// Response compression by the client's `Accept-Encoding`. Off unless configured: compressing
/// responses that mix secrets with attacker-chosen text over TLS can leak the secrets (BREACH),
/// so it is a decision per route or listener.
///
/// Never compressed: responses that already have a `Content-Encoding`, 1xx/204/206/304, answers
/// to `HEAD` and `Range` requests, `Cache-Control: no-transform`, gRPC, content types outside
/// `content_types`, and bodies of known length below `min_size`.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Compress (the default when the section is present); `false` turns it off.
    pub enabled: bool,
    /// The algorithms offered, in the gateway's order of preference, which decides between
    /// algorithms the client weighs equally. Default: `[zstd, br, gzip]`.
    pub algorithms: Vec<CompressionAlgorithm>,
    /// Responses whose `Content-Length` is below this are sent as they are (compressing them
    /// saves little and costs a frame of headers). Streamed bodies of unknown length are
    /// compressed. Default: 1KiB.
    pub min_size: ByteSize,
    /// Content types compressed (parameters such as `charset` are ignored): exact
    /// (`application/json`), a whole type (`text/*`) or a structured-syntax suffix
    /// (`application/*+json`). Default: text and the common JSON, XML, JavaScript, SVG and
    /// WebAssembly types; images, audio, video, fonts and archives are already compressed.
    pub content_types: Vec<String>,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            algorithms: vec![
                CompressionAlgorithm::Zstd,
                CompressionAlgorithm::Br,
                CompressionAlgorithm::Gzip,
            ],
            min_size: ByteSize::kib(1),
            content_types: [
                "text/*",
                "application/json",
                "application/*+json",
                "application/javascript",
                "application/xml",
                "application/*+xml",
                "application/wasm",
                "image/svg+xml",
            ]
            .into_iter()
            .map(Into::into)
            .collect(),
        }
    }
}

/// A content coding the gateway can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CompressionAlgorithm {
    /// Zstandard (RFC 8878): fast, with a ratio close to brotli's.
    Zstd,
    /// Brotli (RFC 7932).
    Br,
    /// gzip (RFC 1952): understood by every client.
    Gzip,
}

/// Request matching. All given conditions must hold.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Hosts: exact (`api.example.com`) or one leading wildcard label (`*.example.com`). Empty: any host.
    pub hosts: Vec<String>,
    /// Path pattern: exact (`/health`), template (`/users/{id}/orders`), single-segment wildcard
    /// (`/files/*`), or a trailing `/**` for a prefix (`/api/**`, and `/**` for everything).
    pub path: String,
    /// Methods (`GET`, `POST`, ...). Empty: any method.
    pub methods: Vec<String>,
    /// Headers that must be present, optionally with an exact value.
    pub headers: Vec<HeaderMatchConfig>,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            hosts: Vec::new(),
            path: "/**".into(),
            methods: Vec::new(),
            headers: Vec::new(),
        }
    }
}

/// A header condition.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    /// Header name (case-insensitive).
    pub name: String,
    /// Exact value; absent means "present with any value".
    #[serde(default)]
    pub value: Option<String>,
}

/// Request rewrites applied before forwarding.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RewriteConfig {
    /// Remove this prefix from the path (`/api` turns `/api/users` into `/users`).
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Then put this prefix in front (with `strip_prefix`, a prefix replacement).
    #[serde(default)]
    pub add_prefix: Option<String>,
    /// A fixed `Host` to send upstream. Absent: the client's `Host` is kept (and always sent as
    /// `X-Forwarded-Host`).
    #[serde(default)]
    pub host: Option<String>,
    /// Send the chosen target's `host:port` as `Host` (for upstreams that route on it).
    #[serde(default)]
    pub host_from_target: bool,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        Self::RoundRobin {}
    }
}

fn default_true() -> bool {
    true
}

fn default_weight() -> u32 {
    1
}

fn default_pool_idle() -> usize {
    64
}

fn default_pool_idle_timeout() -> HumanDuration {
    HumanDuration::from_secs(90)
}
