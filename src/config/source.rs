//! The config file as text: where every field sits (line and column) and `${ENV_VAR}` interpolation.
//!
//! serde reports *what* is wrong and at which path; this index says *where*, so that every error,
//! including the semantic ones found after deserialising, can be printed as `FILE:LINE:COL`.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// Line and column (1-based) of every path in a YAML document.
#[derive(Debug, Default)]
pub struct SpanIndex {
    values: HashMap<String, (usize, usize)>,
    keys: HashMap<String, (usize, usize)>,
    /// Paths of unquoted scalar values.
    plain: std::collections::HashSet<String>,
}

impl SpanIndex {
    /// Builds the index; a YAML syntax error is returned with its position.
    pub fn build(text: &str) -> Result<Self, (usize, usize, String)> {
        let mut builder = IndexBuilder::default();
        let mut parser = Parser::new_from_str(text);
        parser.load(&mut builder, false).map_err(|error| {
            let marker = error.marker();
            (marker.line(), marker.col() + 1, error.info().to_owned())
        })?;
        Ok(builder.index)
    }

    /// Position of the value at `path`, falling back to the nearest parent that has one.
    pub fn locate(&self, path: &str) -> (usize, usize) {
        let mut path = path;
        loop {
            if let Some(position) = self.values.get(path) {
                return *position;
            }
            match parent(path) {
                Some(p) => path = p,
                None => return (1, 1),
            }
        }
    }

    /// Whether the value at `path` was written without quotes.
    pub fn is_plain(&self, path: &str) -> bool {
        self.plain.contains(path)
    }

    /// Position of the key at `path` (for "unknown field" errors), else of its value.
    pub fn locate_key(&self, path: &str) -> (usize, usize) {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.locate(path))
    }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

enum Frame {
    Map {
        key: Option<String>,
        path: String,
        keys_seen: usize,
    },
    Seq {
        index: usize,
        path: String,
    },
}

#[derive(Default)]
struct IndexBuilder {
    index: SpanIndex,
    stack: Vec<Frame>,
}

impl IndexBuilder {
    /// The path of the node that is about to start, or `None` if it is a mapping key.
    fn next_path(&mut self) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map {
                key: Some(key),
                path,
                ..
            }) => {
                let key = std::mem::take(key);
                let joined = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                if let Some(Frame::Map { key, .. }) = self.stack.last_mut() {
                    *key = None;
                }
                Some(joined)
            }
            Some(Frame::Seq { index, path }) => {
                let joined = format!("{path}[{index}]");
                *index += 1;
                Some(joined)
            }
        }
    }

    fn record(&mut self, path: String, mark: Marker) {
        self.index
            .values
            .entry(path)
            .or_insert((mark.line(), mark.col() + 1));
    }
}

impl MarkedEventReceiver for IndexBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(text, style, ..) => match self.next_path() {
                Some(path) => {
                    if style == yaml_rust2::scanner::TScalarStyle::Plain {
                        self.index.plain.insert(path.clone());
                    }
                    self.record(path, mark)
                }
                None => {
                    // a mapping key: remember it and where it stands
                    if let Some(Frame::Map {
                        key,
                        path,
                        keys_seen,
                    }) = self.stack.last_mut()
                    {
                        let position = (mark.line(), mark.col() + 1);
                        if *keys_seen == 0 {
                            // a block mapping "starts" where its first key does
                            self.index.values.insert(path.clone(), position);
                        }
                        *keys_seen += 1;
                        let full = if path.is_empty() {
                            text.clone()
                        } else {
                            format!("{path}.{text}")
                        };
                        self.index.keys.entry(full).or_insert(position);
                        *key = Some(text);
                    }
                }
            },
            Event::Alias(_) => {
                if let Some(path) = self.next_path() {
                    self.record(path, mark);
                }
            }
            Event::MappingStart(..) => {
                let path = self.next_path().unwrap_or_default();
                self.record(path.clone(), mark);
                self.stack.push(Frame::Map {
                    key: None,
                    path,
                    keys_seen: 0,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.next_path().unwrap_or_default();
                self.record(path.clone(), mark);
                self.stack.push(Frame::Seq { index: 0, path });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

/// Where interpolation took values from the environment (their paths are redacted on display).
#[derive(Debug, Default)]
pub struct Interpolation {
    pub secret_paths: Vec<String>,
    pub errors: Vec<(String, String)>,
}

/// Replaces `${NAME}` (and `${NAME:-default}`) in every string of `value`.
///
/// Like Docker Compose: an *unquoted* value that is exactly one reference (`workers: ${WORKERS}`)
/// takes the type the expansion reads as in YAML (a number, a boolean); a quoted one
/// (`value: "${API_KEY}"`) always stays a string.
pub fn interpolate_env(
    value: &mut serde_yaml::Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    index: &SpanIndex,
    out: &mut Interpolation,
) {
    match value {
        serde_yaml::Value::String(text) if text.contains("${") => {
            let whole_reference =
                text.starts_with("${") && text.ends_with('}') && text.matches("${").count() == 1;
            match expand(text, lookup) {
                Ok((expanded, from_environment)) => {
                    if from_environment {
                        out.secret_paths.push(path.to_owned());
                    }
                    let typed = (whole_reference && index.is_plain(path))
                        .then(|| serde_yaml::from_str::<serde_yaml::Value>(&expanded).ok())
                        .flatten()
                        .filter(|v| v.is_number() || v.is_bool());
                    match typed {
                        Some(typed) => *value = typed,
                        None => *text = expanded,
                    }
                }
                Err(message) => out.errors.push((path.to_owned(), message)),
            }
        }
        serde_yaml::Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_env(item, &format!("{path}[{i}]"), lookup, index, out);
            }
        }
        serde_yaml::Value::Mapping(map) => {
            for (key, item) in map.iter_mut() {
                let key = key.as_str().unwrap_or("?");
                let child = if path.is_empty() {
                    key.to_owned()
                } else {
                    format!("{path}.{key}")
                };
                interpolate_env(item, &child, lookup, index, out);
            }
        }
        _ => {}
    }
}

/// Expands `${NAME}` / `${NAME:-default}`; `$${` escapes a literal `${`. Also says whether any
/// value came from the environment (rather than from a default written in the file).
fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(text.len());
    let mut from_environment = false;
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated `${` in value".to_owned())?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{inner}}}` is not a valid environment variable reference"
            ));
        }
        let value = match (lookup(name), default) {
            (Some(value), _) => {
                from_environment = true;
                value
            }
            (None, Some(default)) => default.to_owned(),
            (None, None) => return Err(format!("environment variable `{name}` is not set")),
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok((out, from_environment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_knows_where_nested_fields_are() {
        let text = "listeners:\n  - name: a\n    bind: x\nroutes:\n  - name: r\n    match:\n      path: /x\n";
        let index = SpanIndex::build(text).unwrap();
        assert_eq!(index.locate("listeners[0].bind"), (3, 11));
        assert_eq!(index.locate("routes[0].match.path"), (7, 13));
        assert_eq!(index.locate_key("routes[0].match"), (6, 5));
        // unknown paths fall back to their nearest parent
        assert_eq!(
            index.locate("routes[0].match.nope"),
            index.locate("routes[0].match")
        );
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let (line, _, _) = SpanIndex::build("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(line >= 1);
    }

    #[test]
    fn env_references_expand_and_missing_ones_are_errors() {
        let lookup = |name: &str| (name == "SECRET").then(|| "s3cr3t".to_owned());
        assert_eq!(
            expand("a-${SECRET}-b", &lookup).unwrap(),
            ("a-s3cr3t-b".into(), true)
        );
        assert_eq!(
            expand("${MISSING:-dflt}", &lookup).unwrap(),
            ("dflt".into(), false)
        );
        assert_eq!(expand("$${SECRET}", &lookup).unwrap().0, "${SECRET}");
        assert!(expand("${MISSING}", &lookup)
            .unwrap_err()
            .contains("MISSING"));
        assert!(expand("${BAD NAME}", &lookup).is_err());
        assert!(expand("${OPEN", &lookup).is_err());
    }
}
