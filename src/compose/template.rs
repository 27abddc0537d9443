//! Call paths with placeholders, parsed once at config load and filled per request. Every value
//! is percent-encoded, so a path parameter or a JSON field cannot add segments (`../admin`), a
//! query (`?x=`) or a fragment to the call.

use std::fmt::Write as _;

/// A parsed call path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Literal(Box<str>),
    /// A path parameter of the route's pattern.
    Param(Box<str>),
    /// The authenticated subject.
    Subject,
    /// A field of an earlier call's JSON: the call's index and the path inside its JSON.
    Field {
        call: usize,
        path: Vec<Box<str>>,
    },
}

/// What a placeholder may name, for parsing.
pub struct Names<'a> {
    pub params: &'a dyn Fn(&str) -> bool,
    pub calls: &'a [&'a str],
}

/// Where a filled value came from, when it could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillError {
    #[error("`{0}` has no value in this request")]
    Missing(String),
    #[error("`{0}` is not a string, number or boolean")]
    NotScalar(String),
    /// Empty, `.` or `..`: it would make an empty or a dot segment of the call's path.
    #[error("`{0}` would make an empty or dot segment")]
    DotSegment(String),
}

impl Template {
    /// Parses `path`; placeholders must name a route parameter, `subject` or `call.field...`.
    pub fn parse(path: &str, names: &Names<'_>) -> Result<Self, String> {
        if !path.starts_with('/') {
            return Err(format!("`{path}` must start with `/`"));
        }
        let mut pieces = Vec::new();
        let mut rest = path;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].into()));
            }
            let Some(close) = rest[open..].find('}') else {
                return Err(format!("`{path}`: `{{` without `}}`"));
            };
            let name = &rest[open + 1..open + close];
            pieces.push(Self::placeholder(name, names)?);
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("`{path}`: `}}` without `{{`"));
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.into()));
        }
        if pieces
            .iter()
            .any(|p| matches!(p, Piece::Literal(l) if l.contains('#') || l.contains(char::is_whitespace)))
        {
            return Err(format!("`{path}`: no fragments or spaces"));
        }
        Ok(Self { pieces })
    }

    fn placeholder(name: &str, names: &Names<'_>) -> Result<Piece, String> {
        let mut parts = name.split('.');
        let head = parts.next().unwrap_or_default();
        let path: Vec<Box<str>> = parts.map(Into::into).collect();
        if path.is_empty() {
            if (names.params)(head) {
                return Ok(Piece::Param(head.into()));
            }
            if head == "subject" {
                return Ok(Piece::Subject);
            }
            return Err(format!(
                "`{{{name}}}` is neither a path parameter of the route nor `subject`"
            ));
        }
        let Some(call) = names.calls.iter().position(|c| *c == head) else {
            return Err(format!("`{{{name}}}`: no call named `{head}`"));
        };
        if path.iter().any(|p| p.is_empty()) {
            return Err(format!("`{{{name}}}`: empty field name"));
        }
        Ok(Piece::Field { call, path })
    }

    /// The calls whose JSON this template uses.
    pub fn dependencies(&self) -> impl Iterator<Item = usize> + '_ {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Field { call, .. } => Some(*call),
            _ => None,
        })
    }

    /// The path and query for one request.
    pub fn fill(
        &self,
        params: &[(&str, &str)],
        subject: Option<&str>,
        results: &[Option<serde_json::Value>],
    ) -> Result<String, FillError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Literal(text) => out.push_str(text),
                Piece::Param(name) => {
                    let value = params
                        .iter()
                        .find(|(n, _)| *n == &**name)
                        .map(|(_, v)| *v)
                        .ok_or_else(|| FillError::Missing(name.to_string()))?;
                    // the matched path keeps escapes such as `%2F`: decoded once here, so they
                    // are encoded once, not twice
                    put_value(&mut out, &percent_decode(value), name)?;
                }
                Piece::Subject => put_value(
                    &mut out,
                    subject
                        .ok_or(FillError::Missing("subject".into()))?
                        .as_bytes(),
                    "subject",
                )?,
                Piece::Field { call, path } => {
                    let label = || path.join(".");
                    let mut value = results
                        .get(*call)
                        .and_then(Option::as_ref)
                        .ok_or_else(|| FillError::Missing(label()))?;
                    for key in path {
                        value = match value {
                            serde_json::Value::Object(map) => map.get(&**key),
                            serde_json::Value::Array(items) => {
                                key.parse::<usize>().ok().and_then(|i| items.get(i))
                            }
                            _ => None,
                        }
                        .ok_or_else(|| FillError::Missing(label()))?;
                    }
                    let text = match value {
                        serde_json::Value::String(text) => text.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        serde_json::Value::Bool(b) => b.to_string(),
                        _ => return Err(FillError::NotScalar(label())),
                    };
                    put_value(&mut out, text.as_bytes(), &label())?;
                }
            }
        }
        Ok(out)
    }
}

/// Appends `value` percent-encoded; refuses values that would be an empty or dot segment.
fn put_value(out: &mut String, value: &[u8], label: &str) -> Result<(), FillError> {
    if matches!(value, b"" | b"." | b"..") {
        return Err(FillError::DotSegment(label.to_owned()));
    }
    encode_into(out, value);
    Ok(())
}

/// Decodes `%XX` escapes (invalid ones are kept as they are).
fn percent_decode(value: &str) -> Vec<u8> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_into(out: &mut String, value: &[u8]) {
    for &byte in value {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str) -> Result<Template, String> {
        Template::parse(
            path,
            &Names {
                params: &|name| name == "id",
                calls: &["user", "orders"],
            },
        )
    }

    #[test]
    fn placeholders_are_filled_and_encoded() {
        let template = parse("/users/{id}/feed?owner={subject}&cat={user.profile.tags.1}").unwrap();
        assert_eq!(template.dependencies().collect::<Vec<_>>(), vec![0]);
        let user = serde_json::json!({"profile": {"tags": ["a", "b c/../d?x=1#f"]}});
        let filled = template
            .fill(
                &[("id", "42")],
                Some("alice@example.com"),
                &[Some(user), None],
            )
            .unwrap();
        assert_eq!(
            filled,
            "/users/42/feed?owner=alice%40example.com&cat=b%20c%2F..%2Fd%3Fx%3D1%23f"
        );
    }

    #[test]
    fn values_that_cannot_be_used_fail_the_call() {
        let template = parse("/x/{user.id}").unwrap();
        assert_eq!(
            template.fill(
                &[],
                None,
                &[Some(serde_json::json!({"id": {"a": 1}})), None]
            ),
            Err(FillError::NotScalar("id".into()))
        );
        assert_eq!(
            template.fill(&[], None, &[Some(serde_json::json!({})), None]),
            Err(FillError::Missing("id".into()))
        );
        assert_eq!(
            template.fill(&[], None, &[None, None]),
            Err(FillError::Missing("id".into()))
        );
        let subject = parse("/by/{subject}").unwrap();
        assert!(subject.fill(&[], None, &[]).is_err(), "anonymous request");
        let number = parse("/n/{orders.count}").unwrap();
        assert_eq!(
            number
                .fill(&[], None, &[None, Some(serde_json::json!({"count": 3}))])
                .unwrap(),
            "/n/3"
        );
    }

    #[test]
    fn dot_segments_and_double_encoding_are_prevented() {
        let template = parse("/users/{id}/orders/{user.name}").unwrap();
        let fill = |id: &str, name: &str| {
            template.fill(
                &[("id", id)],
                None,
                &[Some(serde_json::json!({ "name": name })), None],
            )
        };
        assert_eq!(
            fill("a%2Fb", "x").unwrap(),
            "/users/a%2Fb/orders/x",
            "decoded once, encoded once"
        );
        assert_eq!(fill("..", "x"), Err(FillError::DotSegment("id".into())));
        assert_eq!(fill("%2E%2E", "x"), Err(FillError::DotSegment("id".into())));
        assert_eq!(fill("1", "."), Err(FillError::DotSegment("name".into())));
        assert_eq!(fill("1", ""), Err(FillError::DotSegment("name".into())));
        assert_eq!(fill("1", "..."), Ok("/users/1/orders/...".into()));
        assert_eq!(fill("%zz%4", "x").unwrap(), "/users/%25zz%254/orders/x");
    }

    #[test]
    fn bad_templates_are_refused() {
        assert!(parse("users/{id}").is_err());
        assert!(parse("/users/{nope}").is_err());
        assert!(parse("/users/{other.id}").is_err());
        assert!(parse("/users/{id").is_err());
        assert!(parse("/users/id}").is_err());
        assert!(parse("/users/{user.}").is_err());
        assert!(parse("/users#frag").is_err());
    }
}
