//! The access log: one JSON line per request, secrets redacted, written by a dedicated thread.
//!
//! The request path formats its line and hands it to a bounded channel with `try_send`: when the
//! writer falls behind (a slow disk, a blocked stdout pipe) lines are dropped and counted
//! (`portcullis_access_log_dropped_total`), and no request ever waits for the log.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicI64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
        Arc,
    },
};

use http::{HeaderMap, HeaderName};
use serde::Serialize;

use super::{metrics::Metrics, redact};
use crate::{config::model::AccessLogConfig, pipeline::RequestCtx};

/// What goes into a line, compiled from the config (per snapshot: changes apply on reload).
#[derive(Debug)]
pub struct AccessLogPolicy {
    pub enabled: bool,
    sample_success: f64,
    /// Query parameters redacted besides the built-in secret names (normalised).
    redact_query: Vec<String>,
    request_headers: Vec<(HeaderName, bool)>,
    response_headers: Vec<(HeaderName, bool)>,
}

impl AccessLogPolicy {
    /// `credential_headers` are never logged in the clear (authorization, cookies, API-key and
    /// token headers); `token_params` are the query parameters tokens are read from.
    pub fn compile(
        config: &AccessLogConfig,
        credential_headers: &[String],
        token_params: &[String],
    ) -> Result<Self, String> {
        let redact_query: Vec<String> = config
            .redact_query
            .iter()
            .chain(token_params)
            .map(|p| redact::normalize(p))
            .collect();
        let headers = |names: &[String], secret: &dyn Fn(&str) -> bool| {
            names
                .iter()
                .map(|name| {
                    let header = HeaderName::from_bytes(name.as_bytes())
                        .map_err(|_| format!("`{name}` is not a header name"))?;
                    let redact = secret(header.as_str());
                    Ok((header, redact))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        // configured credential headers, and any header whose name says secret (`x-auth-token`)
        let is_credential = |name: &str| {
            credential_headers.iter().any(|c| c == name) || redact::is_secret(name, &[])
        };
        Ok(Self {
            enabled: config.enabled,
            sample_success: config.sample_success.clamp(0.0, 1.0),
            redact_query,
            request_headers: headers(&config.request_headers, &is_credential)?,
            response_headers: headers(&config.response_headers, &|name| {
                name == "set-cookie" || is_credential(name)
            })?,
        })
    }

    /// Off, for tests and tools that build a snapshot without a config.
    pub fn disabled() -> Self {
        Self {
            enabled: false,
            sample_success: 0.0,
            redact_query: Vec::new(),
            request_headers: Vec::new(),
            response_headers: Vec::new(),
        }
    }

    /// Whether the request's request headers are needed at all (most configs select none).
    pub fn wants_request_headers(&self) -> bool {
        self.enabled && !self.request_headers.is_empty()
    }

    pub fn wants_response_headers(&self) -> bool {
        self.enabled && !self.response_headers.is_empty()
    }

    /// The selected request headers, redacted, for the record.
    pub fn pick_request_headers(&self, headers: &HeaderMap) -> Vec<(HeaderName, String)> {
        pick(&self.request_headers, headers)
    }

    pub fn pick_response_headers(&self, headers: &HeaderMap) -> Vec<(HeaderName, String)> {
        pick(&self.response_headers, headers)
    }

    /// Whether this request gets a line: every error and denial, successes as sampled.
    pub fn should_log(&self, ctx: &RequestCtx) -> bool {
        if !self.enabled {
            return false;
        }
        let failed = ctx.status >= 400
            || ctx.status == 0
            || ctx.error.is_some()
            || ctx.response_aborted
            || ctx.authorization.as_ref().is_some_and(|d| !d.allowed);
        failed || self.sample_success >= 1.0 || fastrand::f64() < self.sample_success
    }

    /// The query string with secret parameters' values replaced.
    pub fn redact_query(&self, query: &str) -> String {
        redact::redact_pairs(query, &self.redact_query)
    }

    /// The JSON line for a finished request (with the trailing newline).
    pub fn format(&self, ctx: &RequestCtx) -> Vec<u8> {
        let timestamp = timestamp_now();
        let query = ctx.query.as_deref().map(|q| self.redact_query(q));
        let trace_id = ctx.trace.as_ref().map(|t| t.trace_id_buf());
        let line = Line {
            timestamp: &timestamp,
            log: "access",
            request_id: ctx.request_id.to_str().unwrap_or_default(),
            trace_id: trace_id
                .as_ref()
                .and_then(|hex| std::str::from_utf8(hex).ok()),
            client_ip: ctx.client_ip,
            peer: ctx.peer,
            listener: &ctx.listener,
            method: ctx.method.as_str(),
            host: &ctx.host,
            path: &ctx.path,
            query: query.as_deref(),
            protocol: version_name(ctx.version),
            status: ctx.status,
            bytes_in: ctx.bytes_in,
            bytes_out: ctx.bytes_out,
            duration_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
            upstream_ms: ctx.upstream_latency.map(|d| d.as_secs_f64() * 1000.0),
            route: ctx.route.as_deref(),
            upstream: ctx.upstream.as_deref(),
            upstream_target: ctx.target.as_deref(),
            retries: ctx.retries,
            cache: ctx.cache.map(crate::cache::CacheStatus::as_str),
            error: ctx.error,
            aborted: ctx.response_aborted,
            auth_subject: ctx.identity.as_ref().map(|i| &*i.subject),
            auth_method: ctx.identity.as_ref().map(|i| i.method),
            auth_provider: ctx.identity.as_ref().map(|i| &*i.provider),
            auth_failure: ctx.auth_failure,
            authz: ctx
                .authorization
                .as_ref()
                .map(|d| if d.allowed { "allow" } else { "deny" }),
            authz_reason: ctx.authorization.as_ref().map(|d| d.reason.to_string()),
            ratelimit: ctx.rate_limit.outcome.as_ref().map(|o| {
                if o.refused {
                    "refuse"
                } else {
                    "allow"
                }
            }),
            ratelimit_rule: ctx.rate_limit.outcome.as_ref().map(|o| &*o.rule.name),
            ratelimit_shadow_refusal: ctx.rate_limit.shadow_refusal.as_deref(),
            tls_version: ctx.tls_version,
            client_cert_subject: ctx.client_cert_subject.as_deref(),
            user_agent: ctx.user_agent.as_ref().and_then(|v| v.to_str().ok()),
            request_headers: HeaderList(&ctx.logged_request_headers),
            response_headers: HeaderList(&ctx.logged_response_headers),
            request_body: ctx.capture.as_ref().and_then(|policy| {
                let capture = ctx.request_capture.as_ref()?;
                let capture = capture.lock().unwrap_or_else(|e| e.into_inner());
                (capture.total > 0).then(|| policy.render(&capture))
            }),
            response_body: ctx
                .capture
                .as_ref()
                .zip(ctx.response_capture.as_deref())
                .filter(|(_, capture)| capture.total > 0)
                .map(|(policy, capture)| policy.render(capture)),
        };
        let mut out = Vec::with_capacity(640);
        if serde_json::to_writer(&mut out, &line).is_ok() {
            out.push(b'\n');
        }
        out
    }
}

fn pick(selected: &[(HeaderName, bool)], headers: &HeaderMap) -> Vec<(HeaderName, String)> {
    selected
        .iter()
        .filter_map(|(name, redact)| {
            let mut values = headers.get_all(name).iter();
            let first = values.next()?;
            let value = if *redact {
                redact::REDACTED.to_owned()
            } else {
                // every value, as a repeated header is evidence worth keeping
                let mut joined = String::from_utf8_lossy(first.as_bytes()).into_owned();
                for value in values {
                    joined.push_str(", ");
                    joined.push_str(&String::from_utf8_lossy(value.as_bytes()));
                }
                joined
            };
            Some((name.clone(), value))
        })
        .collect()
}

/// Now, as RFC 3339 in UTC with microseconds (`2026-11-25T06:00:00.123456Z`). The date and time
/// of day are formatted once per second per thread; each line only adds the microseconds.
fn timestamp_now() -> String {
    use std::cell::RefCell;
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let second = since_epoch.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            let at = time::OffsetDateTime::from_unix_timestamp(second as i64)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let format =
                time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
            *cached = (second, at.format(&format).unwrap_or_default());
        }
        let mut out = String::with_capacity(28);
        out.push_str(&cached.1);
        let micros = since_epoch.subsec_micros();
        let _ = std::fmt::Write::write_fmt(&mut out, format_args!(".{micros:06}Z"));
        out
    })
}

fn version_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

#[derive(Serialize)]
struct Line<'a> {
    timestamp: &'a str,
    log: &'static str,
    request_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<&'a str>,
    client_ip: std::net::IpAddr,
    peer: std::net::SocketAddr,
    listener: &'a str,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
    protocol: &'static str,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    bytes_in: Option<u64>,
    bytes_out: u64,
    duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_target: Option<&'a str>,
    retries: u32,
    /// What the response cache did (routes with a cache only).
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    aborted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_method: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_provider: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    auth_failure: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authz: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authz_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratelimit: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratelimit_rule: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratelimit_shadow_refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_version: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_cert_subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
    #[serde(skip_serializing_if = "HeaderList::is_empty")]
    request_headers: HeaderList<'a>,
    #[serde(skip_serializing_if = "HeaderList::is_empty")]
    response_headers: HeaderList<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_body: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_body: Option<serde_json::Value>,
}

/// Selected headers as a JSON object.
struct HeaderList<'a>(&'a [(HeaderName, String)]);

impl HeaderList<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for HeaderList<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(name.as_str(), value)?;
        }
        map.end()
    }
}

/// Where lines go: a bounded channel to the writer thread. Lives as long as the gateway.
#[derive(Debug)]
pub struct AccessLogSink {
    sender: Option<SyncSender<Vec<u8>>>,
    backlog: Arc<Backlog>,
    capacity: usize,
}

impl AccessLogSink {
    /// Starts the writer thread for `output` (`stdout` or a file path).
    pub fn start(config: &AccessLogConfig, metrics: Arc<Metrics>) -> io::Result<Self> {
        let capacity = config.buffer.max(1);
        let (sender, receiver) = mpsc::sync_channel(capacity);
        let backlog = Arc::new(Backlog::default());
        let output = match config.output.as_str() {
            "stdout" | "-" => Output::Stdout,
            path => Output::File(RotatingFile::open(
                PathBuf::from(path),
                config.max_file_size.0,
                config.max_files,
            )?),
        };
        metrics.log_capacity.set(capacity as i64);
        let writer_backlog = backlog.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(receiver, output, writer_backlog, metrics))?;
        Ok(Self {
            sender: Some(sender),
            backlog,
            capacity,
        })
    }

    /// A sink that takes nothing (access log off at start).
    pub fn disabled() -> Self {
        Self {
            sender: None,
            backlog: Arc::default(),
            capacity: 1,
        }
    }

    /// Hands a line to the writer; never waits. False when it was dropped.
    pub fn send(&self, line: Vec<u8>, metrics: &Metrics) -> bool {
        let Some(sender) = &self.sender else {
            return false;
        };
        self.backlog.queued.fetch_add(1, Ordering::Relaxed);
        self.backlog.unwritten.fetch_add(1, Ordering::Relaxed);
        match sender.try_send(line) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.backlog.queued.fetch_sub(1, Ordering::Relaxed);
                self.backlog.unwritten.fetch_sub(1, Ordering::Relaxed);
                metrics.log_dropped.inc();
                false
            }
        }
    }

    /// Waits (up to `within`) until the writer has taken every queued line and written it.
    pub async fn flush(&self, within: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while self.backlog.unwritten.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Fill of the buffer, 0–1.
    pub fn fill(&self) -> f64 {
        self.queued() as f64 / self.capacity as f64
    }

    /// Lines in the queue (not yet taken by the writer).
    pub fn queued(&self) -> i64 {
        self.backlog.queued.load(Ordering::Relaxed).max(0)
    }
}

enum Output {
    Stdout,
    File(RotatingFile),
}

/// How long the writer sleeps when it found nothing to write. The writer polls rather than
/// waiting on the channel, so a request's `try_send` never has a sleeping thread to wake (a
/// futex call and a context switch per line, measured at a third of the throughput).
const IDLE_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// Lines written per batch at most.
const MAX_BATCH: usize = 1024;

/// Lines on their way: in the queue (its fill), and not yet written (what `flush` waits for).
#[derive(Debug, Default)]
struct Backlog {
    queued: AtomicI64,
    unwritten: AtomicI64,
}

fn write_lines(
    receiver: Receiver<Vec<u8>>,
    mut output: Output,
    backlog: Arc<Backlog>,
    metrics: Arc<Metrics>,
) {
    let mut written = 0u64;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let mut closed = false;
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(line) => batch.push(line),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if batch.is_empty() {
            if closed {
                return;
            }
            std::thread::sleep(IDLE_POLL);
            continue;
        }
        backlog
            .queued
            .fetch_sub(batch.len() as i64, Ordering::Relaxed);
        // a whole batch per write, flushed: a line is never left in a buffer while the writer
        // sleeps
        let result = match &mut output {
            Output::Stdout => {
                let stdout = io::stdout();
                let mut lock = stdout.lock();
                batch
                    .iter()
                    .try_for_each(|line| lock.write_all(line))
                    .and_then(|_| lock.flush())
            }
            Output::File(file) => file.write_batch(&batch),
        };
        match result {
            Ok(()) => {
                metrics.log_lines.inc_by(batch.len() as u64);
                written += batch.len() as u64;
            }
            Err(error) => {
                metrics.log_dropped.inc_by(batch.len() as u64);
                tracing::warn!(%error, written, "access log write failed; lines dropped");
            }
        }
        // counted out once written (or dropped), so `flush` knows when everything is out
        backlog
            .unwritten
            .fetch_sub(batch.len() as i64, Ordering::Release);
        batch.clear();
    }
}

/// A log file rotated by size: `name` → `name.1` → … → `name.<max_files>` (then deleted).
struct RotatingFile {
    path: PathBuf,
    file: BufWriter<File>,
    size: u64,
    max_size: u64,
    max_files: u32,
}

impl RotatingFile {
    fn open(path: PathBuf, max_size: u64, max_files: u32) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            file: BufWriter::with_capacity(64 * 1024, file),
            size,
            max_size: max_size.max(1024),
            max_files,
        })
    }

    fn write_batch(&mut self, batch: &[Vec<u8>]) -> io::Result<()> {
        for line in batch {
            if self.size > 0 && self.size + line.len() as u64 > self.max_size {
                if let Err(error) = self.rotate() {
                    // keep logging into the current file; try again after another max_size
                    tracing::warn!(%error, path = %self.path.display(), "access log rotation failed");
                    self.size = 0;
                }
            }
            self.file.write_all(line)?;
            self.size += line.len() as u64;
        }
        self.file.flush()
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file.flush()?;
        for n in (1..self.max_files).rev() {
            let from = numbered(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, numbered(&self.path, n + 1))?;
            }
        }
        if self.max_files > 0 {
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.file = BufWriter::with_capacity(64 * 1024, file);
        self.size = 0;
        Ok(())
    }
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> AccessLogPolicy {
        AccessLogPolicy::compile(
            &AccessLogConfig {
                redact_query: vec!["session".into()],
                request_headers: vec![
                    "x-tenant".into(),
                    "authorization".into(),
                    "x-api-key".into(),
                ],
                response_headers: vec!["set-cookie".into(), "content-type".into()],
                ..AccessLogConfig::default()
            },
            &["authorization".into(), "cookie".into(), "x-api-key".into()],
            &["jwt".into()],
        )
        .unwrap()
    }

    #[test]
    fn query_secrets_are_redacted() {
        let p = policy();
        assert_eq!(
            p.redact_query("page=2&access_token=abc&Session=s1&jwt=eyJ&flag"),
            "page=2&access_token=[redacted]&Session=[redacted]&jwt=[redacted]&flag"
        );
        assert_eq!(
            p.redact_query("access%5Ftoken=abc"),
            "access%5Ftoken=[redacted]"
        );
        assert_eq!(p.redact_query("API_KEY=abc"), "API_KEY=[redacted]");
    }

    #[test]
    fn credential_headers_are_redacted() {
        let p = policy();
        let mut headers = HeaderMap::new();
        headers.insert("x-tenant", "acme".parse().unwrap());
        headers.insert("authorization", "Bearer secret".parse().unwrap());
        headers.insert("x-api-key", "k-secret".parse().unwrap());
        let picked = p.pick_request_headers(&headers);
        let text = format!("{picked:?}");
        assert!(text.contains("acme"));
        assert!(!text.contains("secret"), "{text}");
        let mut response = HeaderMap::new();
        response.insert("set-cookie", "sid=secret".parse().unwrap());
        response.insert("content-type", "text/plain".parse().unwrap());
        let text = format!("{:?}", p.pick_response_headers(&response));
        assert!(
            text.contains("text/plain") && !text.contains("secret"),
            "{text}"
        );
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let stamp = timestamp_now();
        let parsed =
            time::OffsetDateTime::parse(&stamp, &time::format_description::well_known::Rfc3339)
                .unwrap();
        assert_eq!(stamp.len(), 27, "{stamp}");
        assert!(stamp.ends_with('Z'));
        let now = time::OffsetDateTime::now_utc();
        assert!((now - parsed).whole_seconds().abs() <= 1, "{stamp}");
    }

    #[test]
    fn files_rotate_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut file = RotatingFile::open(path.clone(), 1024, 2).unwrap();
        let line = vec![b'x'; 300];
        for _ in 0..12 {
            file.write_batch(std::slice::from_ref(&line)).unwrap();
        }
        assert!(numbered(&path, 1).exists());
        assert!(numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists(), "only max_files are kept");
        assert!(std::fs::metadata(&path).unwrap().len() <= 1024);
    }
}
