//! Config loading: YAML text → span index → `${ENV}` interpolation → typed model → semantic checks.
//!
//! Every stage collects *all* its errors (each with file, line, column and field path) instead of
//! stopping at the first, so `portcullis validate` can show everything that is wrong in one run.
//! Compiling the model into the request-path structures lives in `crate::proxy::snapshot`, which
//! reports through the same [`ErrorSink`].

mod error;
pub mod model;
mod observability;
mod source;
pub mod units;
mod validate;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_yaml::Value;

pub use error::{ConfigError, ConfigErrors, ConfigWarning};
pub use model::Config;
pub use source::SpanIndex;
pub use validate::{credential_headers, credential_query_params, parse_cidr, parse_target_url};

/// A parsed, structurally valid config with what is needed to report errors against its text.
#[derive(Debug)]
pub struct LoadedConfig {
    /// Where it came from (shown in errors); `<demo>` for the embedded demo config.
    pub file: PathBuf,
    pub config: Config,
    pub index: SpanIndex,
    /// Paths of values that took something from the environment: redacted wherever the config
    /// is shown.
    pub secret_paths: Vec<String>,
    /// Directory that relative paths in the config are resolved against.
    pub base_dir: PathBuf,
    /// Findings that do not stop the config from loading (e.g. an unused upstream).
    pub warnings: Vec<ConfigWarning>,
}

impl LoadedConfig {
    /// `server.upgrade_socket`, resolved against the config file's directory.
    pub fn upgrade_socket(&self) -> Option<PathBuf> {
        self.config
            .server
            .upgrade_socket
            .as_ref()
            .map(|path| self.base_dir.join(path))
    }
}

/// The effective config as JSON for display: values that came from the environment, and fields
/// whose names say they hold secrets, are replaced by `[redacted]`.
pub fn redacted_json(loaded: &LoadedConfig) -> serde_json::Value {
    fn walk(value: &mut serde_json::Value, path: &str, secret_paths: &[String]) {
        if secret_paths.iter().any(|p| p == path) {
            *value = serde_json::Value::String("[redacted]".into());
            return;
        }
        match value {
            serde_json::Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    walk(item, &format!("{path}[{i}]"), secret_paths);
                }
            }
            serde_json::Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    let lower = key.to_ascii_lowercase();
                    let secret_name = ["secret", "password", "token", "credential"]
                        .iter()
                        .any(|w| lower.contains(w));
                    // only strings hold secrets (`forward_token: true` is not one)
                    if secret_name && item.is_string() {
                        *item = serde_json::Value::String("[redacted]".into());
                    } else {
                        let child = if path.is_empty() {
                            key.clone()
                        } else {
                            format!("{path}.{key}")
                        };
                        walk(item, &child, secret_paths);
                    }
                }
            }
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&loaded.config).unwrap_or_default();
    walk(&mut value, "", &loaded.secret_paths);
    // a Redis URL may carry a password even when written inline (`user:pass@` or `?pass=`)
    if let Some(url) = value.pointer_mut("/redis/url") {
        if url
            .as_str()
            .is_some_and(|u| u.contains('@') || u.contains('?'))
        {
            *url = serde_json::Value::String("[redacted]".into());
        }
    }
    value
}

/// Collects errors and warnings, locating each by its field path.
pub struct ErrorSink<'a> {
    file: &'a Path,
    index: &'a SpanIndex,
    /// For lists where some items failed to parse: the original index of each parsed item, so
    /// that errors about `routes[1]` of the parsed list point at the right item in the file.
    remap: Vec<(&'static str, Vec<usize>)>,
    pub errors: Vec<ConfigError>,
    pub warnings: Vec<ConfigWarning>,
}

impl<'a> ErrorSink<'a> {
    pub fn new(loaded: &'a LoadedConfig) -> Self {
        Self {
            file: &loaded.file,
            index: &loaded.index,
            remap: Vec::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn make(&self, path: &str, message: String, at_key: bool) -> ConfigError {
        let remapped = self.original_path(path);
        let path = remapped.as_deref().unwrap_or(path);
        let (line, column) = if at_key {
            self.index.locate_key(path)
        } else {
            self.index.locate(path)
        };
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            path: path.to_owned(),
            message,
        }
    }

    fn original_path(&self, path: &str) -> Option<String> {
        for (section, originals) in &self.remap {
            let Some(rest) = path.strip_prefix(section).and_then(|r| r.strip_prefix('[')) else {
                continue;
            };
            let (number, tail) = rest.split_once(']')?;
            let original = originals.get(number.parse::<usize>().ok()?)?;
            return Some(format!("{section}[{original}]{tail}"));
        }
        None
    }

    /// Records an error at the value of `path`.
    pub fn error(&mut self, path: impl AsRef<str>, message: impl Into<String>) {
        let error = self.make(path.as_ref(), message.into(), false);
        self.errors.push(error);
    }

    /// Records a warning at the value of `path`.
    pub fn warn(&mut self, path: impl AsRef<str>, message: impl Into<String>) {
        let warning = self.make(path.as_ref(), message.into(), false);
        self.warnings.push(ConfigWarning(warning));
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Errors sorted by position, as `validate` prints them.
    pub fn into_errors(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|e| (e.line, e.column));
        self.errors.dedup();
        ConfigErrors(self.errors)
    }
}

/// Reads and parses a config file. Relative paths inside it resolve against its directory.
pub fn load_file(path: &Path) -> Result<LoadedConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read config file: {error}"),
        }])
    })?;
    let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
    load_str(&text, path, base_dir, &|name| std::env::var(name).ok())
}

/// Parses config text; `lookup` resolves `${NAME}` references (the process environment in production).
pub fn load_str(
    text: &str,
    file: &Path,
    base_dir: PathBuf,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<LoadedConfig, ConfigErrors> {
    let single = |line, column, path: &str, message: String| {
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            line,
            column,
            path: path.to_owned(),
            message,
        }])
    };
    let index = SpanIndex::build(text).map_err(|(line, column, message)| {
        single(line, column, "", format!("invalid YAML: {message}"))
    })?;
    let mut root: Value = serde_yaml::from_str(text).map_err(|error| {
        let (line, column) = error
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((1, 1));
        single(line, column, "", format!("invalid YAML: {error}"))
    })?;
    if root.is_null() {
        root = Value::Mapping(Default::default());
    }

    let mut loaded = LoadedConfig {
        file: file.to_owned(),
        config: Config::default(),
        index,
        secret_paths: Vec::new(),
        base_dir,
        warnings: Vec::new(),
    };
    let mut interpolation = source::Interpolation::default();
    source::interpolate_env(&mut root, "", lookup, &loaded.index, &mut interpolation);
    loaded.secret_paths = interpolation.secret_paths;

    let mut sink = ErrorSink::new(&loaded);
    for (path, message) in interpolation.errors {
        sink.error(path, message);
    }
    let declared = validate::Declared::from_raw(&root);
    let config = deserialize_sections(root, &mut sink);
    // semantic checks run even when some items failed to parse, against the names declared in the
    // text, so one broken upstream does not turn every route that uses it into a second error
    validate::check(&config, &declared, &mut sink);
    let warnings = std::mem::take(&mut sink.warnings);
    if sink.has_errors() {
        return Err(sink.into_errors());
    }
    loaded.config = config;
    loaded.warnings = warnings;
    Ok(loaded)
}

/// Deserialises each section, and each list item on its own, so one bad route does not hide the
/// errors in the next one.
fn deserialize_sections(root: Value, sink: &mut ErrorSink<'_>) -> Config {
    let mut config = Config::default();
    let Value::Mapping(mut map) = root else {
        sink.error(
            "",
            "the config must be a mapping with `listeners`, `upstreams`, `routes`, ...",
        );
        return config;
    };
    if let Some(value) = map.remove("server") {
        if let Some(server) = typed(value, "server", sink) {
            config.server = server;
        }
    }
    if let Some(value) = map.remove("admin") {
        if let Some(admin) = typed(value, "admin", sink) {
            config.admin = admin;
        }
    }
    if let Some(value) = map.remove("authentication") {
        if let Some(authentication) = typed(value, "authentication", sink) {
            config.authentication = authentication;
        }
    }
    if let Some(value) = map.remove("authorization") {
        if let Some(authorization) = typed(value, "authorization", sink) {
            config.authorization = authorization;
        }
    }
    if let Some(value) = map.remove("rate_limits") {
        if let Some(rate_limits) = typed(value, "rate_limits", sink) {
            config.rate_limits = rate_limits;
        }
    }
    if let Some(value) = map.remove("redis") {
        config.redis = typed(value, "redis", sink);
    }
    if let Some(value) = map.remove("observability") {
        if let Some(observability) = typed(value, "observability", sink) {
            config.observability = observability;
        }
    }
    if let Some(value) = map.remove("cache") {
        if let Some(cache) = typed(value, "cache", sink) {
            config.cache = cache;
        }
    }
    config.listeners = typed_list(map.remove("listeners"), "listeners", sink);
    config.upstreams = typed_list(map.remove("upstreams"), "upstreams", sink);
    config.routes = typed_list(map.remove("routes"), "routes", sink);
    for (key, _) in map {
        let key = key.as_str().unwrap_or("?").to_owned();
        let error = sink.make(
            &key,
            format!("unknown field `{key}`, expected one of `server`, `admin`, `listeners`, `upstreams`, `routes`, `authentication`, `authorization`, `rate_limits`, `redis`, `observability`, `cache`"),
            true,
        );
        sink.errors.push(error);
    }
    config
}

fn typed_list<T: DeserializeOwned>(
    value: Option<Value>,
    path: &'static str,
    sink: &mut ErrorSink<'_>,
) -> Vec<T> {
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(items)) => {
            let total = items.len();
            let mut parsed = Vec::with_capacity(total);
            let mut originals = Vec::with_capacity(total);
            for (i, item) in items.into_iter().enumerate() {
                if let Some(typed) = typed(item, &format!("{path}[{i}]"), sink) {
                    parsed.push(typed);
                    originals.push(i);
                }
            }
            if originals.len() != total {
                sink.remap.push((path, originals));
            }
            parsed
        }
        Some(_) => {
            sink.error(path, "expected a list");
            Vec::new()
        }
    }
}

fn typed<T: DeserializeOwned>(value: Value, path: &str, sink: &mut ErrorSink<'_>) -> Option<T> {
    // through JSON's data model: serde_yaml's `Value` only takes enums as YAML tags (`!secret x`),
    // while the config writes them as one-key maps (`secret: x`), which JSON's accepts
    let value = match serde_json::to_value(value) {
        Ok(value) => value,
        Err(error) => {
            sink.error(path, format!("unsupported YAML value: {error}"));
            return None;
        }
    };
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(typed) => Some(typed),
        Err(error) => {
            let inner = error.path().to_string();
            let mut full = path.to_owned();
            if inner != "." && !inner.is_empty() {
                if !inner.starts_with('[') {
                    full.push('.');
                }
                full.push_str(&inner);
            }
            let message = error.into_inner().to_string();
            // serde names an unknown field only in the message: point at that key
            if let Some(field) = unknown_field_name(&message) {
                let key_path = if full.ends_with(&format!(".{field}")) {
                    full
                } else {
                    format!("{full}.{field}")
                };
                let located = sink.make(&key_path, message, true);
                sink.errors.push(located);
            } else {
                sink.error(full, message);
            }
            None
        }
    }
}

fn unknown_field_name(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<LoadedConfig, ConfigErrors> {
        load_str(text, Path::new("test.yaml"), PathBuf::new(), &|name| {
            (name == "TOKEN").then(|| "tok-123".to_owned())
        })
    }

    const VALID: &str = "\
listeners:
  - name: main
    bind: 127.0.0.1:0
upstreams:
  - name: app
    targets:
      - url: http://127.0.0.1:9000
routes:
  - name: all
    public: true
    upstream: app
";

    #[test]
    fn a_minimal_config_loads() {
        let loaded = load(VALID).unwrap();
        assert_eq!(loaded.config.routes[0].matcher.path, "/**");
    }

    #[test]
    fn the_upgrade_socket_is_resolved_against_the_config_directory_and_length_checked() {
        let with_socket = |path: &str| format!("server:\n  upgrade_socket: {path}\n{VALID}");
        let text = with_socket("run/upgrade.sock");
        let loaded = load_str(
            &text,
            Path::new("/etc/pc/gw.yaml"),
            "/etc/pc".into(),
            &|_| None,
        )
        .unwrap();
        assert_eq!(
            loaded.upgrade_socket(),
            Some(PathBuf::from("/etc/pc/run/upgrade.sock"))
        );
        let absolute = load(&with_socket("/run/portcullis.sock")).unwrap();
        assert_eq!(
            absolute.upgrade_socket(),
            Some(PathBuf::from("/run/portcullis.sock"))
        );
        assert_eq!(load(VALID).unwrap().upgrade_socket(), None);
        let errors = load(&with_socket(&format!("/{}", "s".repeat(107))))
            .unwrap_err()
            .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "server.upgrade_socket");
        assert!(
            errors[0].message.contains("at most 107 bytes"),
            "{errors:?}"
        );
        let errors = load(&with_socket("\"\"")).unwrap_err().0;
        assert_eq!(errors[0].path, "server.upgrade_socket");
    }

    #[test]
    fn unknown_fields_are_reported_at_the_key() {
        let text = VALID.replace("    public: true", "    public: true\n    upsteam: app");
        let errors = load(&text).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "routes[0].upsteam");
        assert_eq!((errors[0].line, errors[0].column), (11, 5));
        assert!(errors[0].message.contains("unknown field `upsteam`"));
    }

    #[test]
    fn http3_takes_a_switch_or_a_mapping_and_reports_its_mistakes_at_the_field() {
        let with = |http3: &str| {
            VALID.replace(
                "    bind: 127.0.0.1:0\n",
                &format!("    bind: 127.0.0.1:0\n    http3: {http3}\n"),
            )
        };
        // without `tls`: only the validation error, whatever the form
        for form in ["true", "{ advertise_max_age: 1h }"] {
            let errors = load(&with(form)).unwrap_err().0;
            assert_eq!(errors.len(), 1, "{form}: {errors:?}");
            assert_eq!(errors[0].path, "listeners[0].http3");
            assert_eq!(errors[0].line, 4);
        }
        for off in ["false", "{ enabled: false }"] {
            let loaded = load(&with(off)).unwrap();
            assert!(loaded.config.listeners[0].http3().is_none(), "{off}");
        }
        let errors = load(&with("{ max_stream: 10 }")).unwrap_err().0;
        assert_eq!(
            errors[0].path, "listeners[0].http3.max_stream",
            "{errors:?}"
        );
        let errors = load(&with("{ max_streams: 0 }")).unwrap_err().0;
        assert!(
            errors
                .iter()
                .any(|e| e.path == "listeners[0].http3.max_streams"),
            "{errors:?}"
        );
        let errors = load(&with("maybe")).unwrap_err().0;
        assert_eq!(errors[0].path, "listeners[0].http3", "{errors:?}");
    }

    #[test]
    fn every_error_is_reported_not_just_the_first() {
        let text = "\
listeners:
  - name: main
    bind: 127.0.0.1:0
    limits:
      header_timeout: 10 seconds
upstreams:
  - name: app
    targets: []
routes:
  - name: a
    upstream: nowhere
  - name: a
    public: true
    upstream: app
    max_body: lots
";
        let errors = load(text).unwrap_err();
        let printed = errors.to_string();
        assert!(
            printed.contains("test.yaml:5:23: listeners[0].limits.header_timeout:"),
            "{printed}"
        );
        assert!(printed.contains("routes[1].max_body"), "{printed}");
    }

    #[test]
    fn errors_after_an_unparsable_item_point_at_the_right_item() {
        let text = VALID.replace(
            "routes:\n",
            "routes:\n  - name: broken\n    public: maybe\n    upstream: app\n  - name: second\n    public: true\n    upstream: nowhere\n",
        );
        let errors = load(&text).unwrap_err().0;
        let unknown = errors
            .iter()
            .find(|e| e.message.contains("unknown upstream"))
            .expect("reported");
        assert_eq!(unknown.path, "routes[1].upstream");
        assert_eq!(unknown.line, 14, "{errors:?}");
    }

    #[test]
    fn unquoted_whole_references_are_typed_and_quoted_ones_stay_strings() {
        let lookup = |name: &str| match name {
            "WORKERS" => Some("3".to_owned()),
            "KEY" => Some("12345".to_owned()),
            _ => None,
        };
        let text = format!(
            "server:\n  workers: ${{WORKERS}}\n{}",
            VALID.replace(
                "    public: true",
                "    public: true\n    match:\n      headers: [{ name: x-key, value: \"${KEY}\" }]"
            )
        );
        let loaded = load_str(&text, Path::new("t.yaml"), PathBuf::new(), &lookup).unwrap();
        assert_eq!(loaded.config.server.workers, Some(3));
        assert_eq!(
            loaded.config.routes[0].matcher.headers[0].value.as_deref(),
            Some("12345")
        );
        // defaults written in the file are not secrets
        let defaults = VALID.replace("127.0.0.1:0", "${BIND:-127.0.0.1:0}");
        let loaded = load_str(&defaults, Path::new("t.yaml"), PathBuf::new(), &lookup).unwrap();
        assert!(loaded.secret_paths.is_empty());
        assert!(redacted_json(&loaded).to_string().contains("127.0.0.1:0"));
    }

    #[test]
    fn a_redis_password_written_inline_is_not_shown() {
        let text = format!("{VALID}redis:\n  url: redis://:hunter2@10.0.0.5:6379/0\n");
        let shown = redacted_json(&load(&text).unwrap()).to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        let text = format!("{VALID}redis:\n  url: \"redis+unix:///run/redis.sock?pass=hunter2\"\n");
        let shown = redacted_json(&load(&text).unwrap()).to_string();
        assert!(!shown.contains("hunter2"), "{shown}");
        let text = format!("{VALID}redis:\n  url: redis://10.0.0.5:6379/0\n");
        let shown = redacted_json(&load(&text).unwrap()).to_string();
        assert!(shown.contains("redis://10.0.0.5:6379/0"), "{shown}");
    }

    #[test]
    fn env_values_are_substituted_and_remembered_as_secrets() {
        let text = VALID.replace(
            "    public: true",
            "    public: true\n    match:\n      headers: [{ name: x-key, value: \"k-${TOKEN}\" }]",
        );
        let loaded = load(&text).unwrap();
        assert_eq!(
            loaded.config.routes[0].matcher.headers[0].value.as_deref(),
            Some("k-tok-123")
        );
        let shown = redacted_json(&loaded).to_string();
        assert!(
            !shown.contains("tok-123") && shown.contains("\"value\":\"[redacted]\""),
            "{shown}"
        );
        assert_eq!(
            loaded.secret_paths,
            vec!["routes[0].match.headers[0].value".to_owned()]
        );
        let missing = VALID.replace("app\n    targets", "${NOPE}\n    targets");
        let errors = load(&missing).unwrap_err().0;
        assert!(
            errors[0].message.contains("`NOPE` is not set"),
            "{errors:?}"
        );
    }
}
