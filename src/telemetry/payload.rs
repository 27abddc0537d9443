//! Payload capture for the access log (per route, opt-in): the first `max_bytes` of request and
//! response bodies, shown only in forms whose secrets can be redacted.
//!
//! JSON bodies are parsed and every value under a secret field name (at any depth) is replaced
//! by `[redacted]`; form bodies (`application/x-www-form-urlencoded`) are redacted like query
//! strings. Anything else — other content types, bodies cut off at `max_bytes`, JSON that does
//! not parse — is logged as its size and type only, never as text that might hold a secret.

use serde_json::Value;

use super::redact;
use crate::config::model::CapturePayloadConfig;

/// A route's capture settings, compiled.
#[derive(Debug)]
pub struct CapturePolicy {
    pub request: bool,
    pub response: bool,
    pub max_bytes: usize,
    /// Names redacted besides the built-in secret names (normalised).
    fields: Vec<String>,
}

impl CapturePolicy {
    pub fn compile(config: &CapturePayloadConfig) -> Self {
        let fields = config
            .redact_fields
            .iter()
            .map(|f| redact::normalize(f))
            .collect();
        Self {
            request: config.request,
            response: config.response,
            max_bytes: config.max_bytes.0 as usize,
            fields,
        }
    }

    /// Whether a field (or form parameter) name is secret.
    pub fn is_secret(&self, name: &str) -> bool {
        redact::is_secret(name, &self.fields)
    }

    /// The log's view of a captured body.
    pub fn render(&self, capture: &CapturedBody) -> Value {
        let kind = capture
            .content_type
            .as_deref()
            .map(|t| {
                t.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        let complete = capture.total as usize == capture.data.len();
        let described = || {
            Value::String(format!(
                "[{} bytes{}{}]",
                capture.total,
                if kind.is_empty() {
                    String::new()
                } else {
                    format!(" of {kind}")
                },
                if complete {
                    ""
                } else {
                    ", cut off at the capture limit"
                }
            ))
        };
        if !complete {
            return described();
        }
        if kind == "application/json" || kind.ends_with("+json") {
            return match serde_json::from_slice::<Value>(&capture.data) {
                Ok(mut value) => {
                    self.redact(&mut value);
                    value
                }
                Err(_) => described(),
            };
        }
        if kind == "application/x-www-form-urlencoded" {
            if let Ok(text) = std::str::from_utf8(&capture.data) {
                return Value::String(redact::redact_pairs(text, &self.fields));
            }
        }
        described()
    }

    fn redact(&self, value: &mut Value) {
        match value {
            Value::Object(map) => {
                for (key, item) in map.iter_mut() {
                    if self.is_secret(key) {
                        *item = Value::String(redact::REDACTED.into());
                    } else {
                        self.redact(item);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|item| self.redact(item)),
            _ => {}
        }
    }
}

/// The first bytes of a body, and how long it was.
#[derive(Debug, Default)]
pub struct CapturedBody {
    pub content_type: Option<String>,
    pub data: Vec<u8>,
    /// Bytes seen in all (more than `data` holds when the body was cut off).
    pub total: u64,
    max: usize,
}

impl CapturedBody {
    pub fn new(max: usize, content_type: Option<&http::HeaderValue>) -> Self {
        Self {
            content_type: content_type
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            data: Vec::new(),
            total: 0,
            max,
        }
    }

    /// Keeps what fits of a chunk.
    pub fn append(&mut self, chunk: &[u8]) {
        self.total += chunk.len() as u64;
        let room = self.max.saturating_sub(self.data.len());
        self.data.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

/// A request body's capture, shared with the body as it streams to the upstream.
pub type SharedCapture = std::sync::Arc<std::sync::Mutex<CapturedBody>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::units::ByteSize;

    fn policy() -> CapturePolicy {
        CapturePolicy::compile(&CapturePayloadConfig {
            request: true,
            response: true,
            max_bytes: ByteSize(256),
            redact_fields: vec!["PIN".into()],
        })
    }

    fn captured(content_type: &str, body: &[u8]) -> CapturedBody {
        let value = http::HeaderValue::from_str(content_type).unwrap();
        let mut capture = CapturedBody::new(256, Some(&value));
        capture.append(body);
        capture
    }

    #[test]
    fn json_secrets_are_redacted_at_any_depth() {
        let rendered = policy().render(&captured(
            "application/json; charset=utf-8",
            br#"{"user":"al","Password":"p1","card":{"pin":"1234"},"list":[{"token":"t"}]}"#,
        ));
        let text = rendered.to_string();
        assert_eq!(rendered["user"], "al");
        assert_eq!(rendered["Password"], "[redacted]");
        assert_eq!(rendered["card"]["pin"], "[redacted]");
        assert_eq!(rendered["list"][0]["token"], "[redacted]");
        for secret in ["p1", "1234", "\"t\""] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn what_cannot_be_redacted_is_not_shown() {
        let p = policy();
        let cut = captured("application/json", &[b'{'; 300]);
        assert_eq!(
            p.render(&cut),
            "[300 bytes of application/json, cut off at the capture limit]"
        );
        assert_eq!(
            p.render(&captured("text/plain", b"password=hunter2")),
            "[16 bytes of text/plain]"
        );
        assert_eq!(
            p.render(&captured("application/json", b"{not json password")),
            "[18 bytes of application/json]"
        );
        assert_eq!(
            p.render(&captured(
                "application/x-www-form-urlencoded",
                b"user=al&pass%77ord=x&pin=9"
            )),
            "user=al&pass%77ord=[redacted]&pin=[redacted]"
        );
    }
}
