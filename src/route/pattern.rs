//! The pattern language shared by routes and permissions: host patterns and path patterns.
//!
//! Paths: `/exact/path`, templates `/users/{id}/orders` (`{name}` matches one segment), `*` (one
//! segment, unnamed) and a trailing `/**` (zero or more segments, so `/api/**` matches `/api` and
//! everything below it). A trailing slash is not significant for matching.

use std::cmp::Ordering;

/// One piece of a path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    Param(Box<str>),
    Any,
}

/// A compiled path pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathPattern {
    segments: Box<[Segment]>,
    /// Ends in `/**`.
    prefix: bool,
}

impl PathPattern {
    /// Parses a pattern; the error says what is wrong with it.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let Some(body) = pattern.strip_prefix('/') else {
            return Err(format!("path pattern `{pattern}` must start with `/`"));
        };
        let mut segments = Vec::new();
        let mut prefix = false;
        let parts: Vec<&str> = body.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            match *part {
                "" if last => {}
                "" => {
                    return Err(format!(
                        "path pattern `{pattern}` has an empty segment (`//`)"
                    ))
                }
                "**" if last => prefix = true,
                "**" => return Err(format!("`**` may only end a path pattern (in `{pattern}`)")),
                "*" => segments.push(Segment::Any),
                "." | ".." => {
                    return Err(format!(
                    "path pattern `{pattern}` has a dot segment; patterns match normalised paths"
                ))
                }
                part if part.starts_with('{') && part.ends_with('}') => {
                    let name = &part[1..part.len() - 1];
                    if name.is_empty()
                        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(format!("parameter `{part}` in `{pattern}` needs a name of letters, digits and `_`"));
                    }
                    if segments
                        .iter()
                        .any(|s| matches!(s, Segment::Param(n) if &**n == name))
                    {
                        return Err(format!(
                            "parameter `{{{name}}}` appears twice in `{pattern}`"
                        ));
                    }
                    segments.push(Segment::Param(name.into()));
                }
                part if part.contains(['{', '}', '*', '?', '#', '%', '\\']) => {
                    return Err(format!("segment `{part}` of `{pattern}` mixes literal text with `{{`, `}}`, `*`, `?`, `#`, `%` or `\\`"));
                }
                part => segments.push(Segment::Literal(part.into())),
            }
        }
        Ok(Self {
            segments: segments.into(),
            prefix,
        })
    }

    /// Matches a normalised path (as produced by `normalize_path`).
    pub fn matches(&self, path: &str) -> bool {
        self.match_with(path, |_, _| {})
    }

    /// Matches and reports each named parameter with its value.
    pub fn captures<'p>(&self, path: &'p str) -> Option<Vec<(&str, &'p str)>> {
        let mut params = Vec::new();
        self.match_with(path, |name, value| params.push((name, value)))
            .then_some(params)
    }

    fn match_with<'s, 'p>(
        &'s self,
        path: &'p str,
        mut on_param: impl FnMut(&'s str, &'p str),
    ) -> bool {
        let mut parts = path.split('/').filter(|s| !s.is_empty());
        for segment in self.segments.iter() {
            let Some(part) = parts.next() else {
                return false;
            };
            match segment {
                Segment::Literal(literal) if **literal != *part => return false,
                Segment::Param(name) => on_param(name, part),
                _ => {}
            }
        }
        self.prefix || parts.next().is_none()
    }

    /// Orders patterns from most to least specific: literal > `{param}` > `*` > end of an exact
    /// pattern > `/**`, compared segment by segment.
    pub fn specificity_cmp(&self, other: &Self) -> Ordering {
        self.rank().cmp(other.rank())
    }

    fn rank(&self) -> impl Iterator<Item = u8> + '_ {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(_) => 4,
                Segment::Param(_) => 3,
                Segment::Any => 2,
            })
            .chain(std::iter::once(if self.prefix { 0 } else { 1 }))
    }

    /// The literal prefix before the first wildcard (e.g. `/api/v1` for `/api/v1/{x}/**`).
    pub fn literal_prefix(&self) -> String {
        let mut out = String::new();
        for segment in self.segments.iter() {
            match segment {
                Segment::Literal(literal) => {
                    out.push('/');
                    out.push_str(literal);
                }
                _ => break,
            }
        }
        out
    }
}

/// One piece of a path pattern, as indexes over patterns (the permission index) see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternSegment<'a> {
    Literal(&'a str),
    /// `{name}` or `*`: any one segment.
    Wildcard(Option<&'a str>),
}

impl PathPattern {
    /// The segments before any trailing `/**`.
    pub fn segments(&self) -> impl Iterator<Item = PatternSegment<'_>> {
        self.segments.iter().map(|s| match s {
            Segment::Literal(text) => PatternSegment::Literal(text),
            Segment::Param(name) => PatternSegment::Wildcard(Some(name)),
            Segment::Any => PatternSegment::Wildcard(None),
        })
    }

    /// Ends in `/**` (matches its segments and anything below).
    pub fn is_prefix(&self) -> bool {
        self.prefix
    }

    /// `/**`: every path.
    pub fn matches_everything(&self) -> bool {
        self.prefix && self.segments.is_empty()
    }

    /// Whether the pattern names parameter `{name}`.
    pub fn has_param(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Param(n) if &**n == name))
    }

    /// Whether some path matches both patterns (exact: the languages have no other way to
    /// differ than literal segments and length).
    pub fn overlaps(&self, other: &Self) -> bool {
        let literals_agree = self
            .segments
            .iter()
            .zip(other.segments.iter())
            .all(|pair| !matches!(pair, (Segment::Literal(a), Segment::Literal(b)) if a != b));
        literals_agree
            && match self.segments.len().cmp(&other.segments.len()) {
                Ordering::Equal => true,
                Ordering::Less => self.prefix,
                Ordering::Greater => other.prefix,
            }
    }
}

/// A host pattern: any host, an exact name, or `*.suffix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Exact(Box<str>),
    /// `*.example.com`, stored as `.example.com`; matches any name ending in it.
    Suffix(Box<str>),
}

impl HostPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let lower = pattern.to_ascii_lowercase();
        let valid = |name: &str| {
            !name.is_empty()
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        };
        if let Some(suffix) = lower.strip_prefix("*.") {
            if valid(suffix) {
                return Ok(Self::Suffix(format!(".{suffix}").into()));
            }
        } else if valid(&lower) {
            return Ok(Self::Exact(lower.into()));
        }
        Err(format!("host `{pattern}` must be a DNS name such as `api.example.com` or `*.example.com` (no port)"))
    }

    /// `host` must already be lower-case and without a port.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => **name == *host,
            Self::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(&**suffix),
        }
    }

    /// Exact beats wildcard; a longer wildcard beats a shorter one.
    pub fn rank(&self) -> (u8, usize) {
        match self {
            Self::Exact(_) => (2, 0),
            Self::Suffix(suffix) => (1, suffix.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_exact_for_the_pattern_language() {
        let p = |s| PathPattern::parse(s).unwrap();
        for (a, b, expected) in [
            ("/orders/**", "/orders/{id}", true),
            ("/orders/{id}", "/orders/7/items", false),
            ("/orders/*/items", "/orders/7/items", true),
            ("/orders", "/orders/**", true),
            ("/orders/7", "/orders/8", false),
            ("/a/**", "/b/**", false),
            ("/**", "/anything/at/all", true),
            ("/x/{y}", "/x", false),
        ] {
            assert_eq!(p(a).overlaps(&p(b)), expected, "{a} vs {b}");
            assert_eq!(p(b).overlaps(&p(a)), expected, "{b} vs {a}");
        }
    }

    fn p(s: &str) -> PathPattern {
        PathPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_template_and_prefix_patterns_match() {
        assert!(p("/health").matches("/health"));
        assert!(p("/health").matches("/health/"));
        assert!(!p("/health").matches("/health/x"));
        assert!(p("/").matches("/"));
        assert!(!p("/").matches("/x"));
        assert!(p("/**").matches("/"));
        assert!(p("/**").matches("/a/b/c"));
        assert!(p("/api/**").matches("/api"));
        assert!(p("/api/**").matches("/api/v1/x"));
        assert!(!p("/api/**").matches("/apix"));
        assert!(p("/users/{id}/orders").matches("/users/7/orders"));
        assert!(!p("/users/{id}/orders").matches("/users/orders"));
        assert!(p("/files/*").matches("/files/a"));
        assert!(!p("/files/*").matches("/files/a/b"));
    }

    #[test]
    fn captures_report_named_parameters() {
        let pattern = p("/tenants/{tenant}/users/{id}");
        let caps = pattern.captures("/tenants/acme/users/9").unwrap();
        assert_eq!(caps, vec![("tenant", "acme"), ("id", "9")]);
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for bad in [
            "health",
            "/a//b",
            "/a/**/b",
            "/a/{}",
            "/a/{x}/{x}",
            "/a/x{y}",
            "/a/../b",
            "/a%2f",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn more_specific_patterns_rank_higher() {
        use Ordering::Greater;
        assert_eq!(p("/users/{id}").specificity_cmp(&p("/users/**")), Greater);
        assert_eq!(p("/users/me").specificity_cmp(&p("/users/{id}")), Greater);
        assert_eq!(p("/users").specificity_cmp(&p("/users/**")), Greater);
        assert_eq!(p("/api/v1/**").specificity_cmp(&p("/api/**")), Greater);
        assert_eq!(p("/users/{id}").specificity_cmp(&p("/users/*")), Greater);
    }

    #[test]
    fn host_patterns() {
        let wild = HostPattern::parse("*.Example.com").unwrap();
        assert!(wild.matches("api.example.com"));
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
        assert!(HostPattern::parse("api.example.com")
            .unwrap()
            .matches("api.example.com"));
        assert!(HostPattern::parse("api.example.com:80").is_err());
        assert!(HostPattern::parse("*").is_err());
    }
}
