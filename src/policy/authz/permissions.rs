//! Permissions compiled for lookup: a method bit set, a path pattern, conditions, and the roles
//! that hold the permission; and an index that finds the permissions whose pattern matches a
//! path without looking at the others (a trie over path segments).

use std::{fmt, ops::ControlFlow, sync::Arc};

use http::Method;

use super::conditions::Condition;
use crate::route::{PathPattern, PatternSegment};

/// A set of HTTP methods as bits; extension methods only in [`MethodSet::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodSet(u16);

const KNOWN: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
    Method::CONNECT,
    Method::TRACE,
];

impl MethodSet {
    /// Every method, extension methods included (`*`).
    pub const ALL: Self = Self(u16::MAX);
    pub const NONE: Self = Self(0);

    fn bit(method: &Method) -> u16 {
        KNOWN
            .iter()
            .position(|known| known == method)
            .map_or(1 << 15, |i| 1 << i)
    }

    /// Parses `GET,HEAD` or `*` (and a list of names, as the long form writes them).
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let names: Vec<&str> = names.into_iter().map(str::trim).collect();
        if names.contains(&"*") {
            return if names.len() == 1 {
                Ok(Self::ALL)
            } else {
                Err("`*` means every method: write it alone".into())
            };
        }
        let mut bits = 0;
        for name in names {
            let method = KNOWN
                .iter()
                .find(|m| m.as_str() == name)
                .ok_or_else(|| format!("`{name}` is not a method (GET, POST, ... or `*`)"))?;
            bits |= Self::bit(method);
        }
        if bits == 0 {
            return Err("no methods: name some, or `*` for all".into());
        }
        Ok(Self(bits))
    }

    /// The methods a route's `match.methods` accepts (empty: all).
    pub fn of_route(methods: &[Method]) -> Self {
        if methods.is_empty() {
            return Self::ALL;
        }
        Self(methods.iter().fold(0, |bits, m| bits | Self::bit(m)))
    }

    pub fn contains(self, method: &Method) -> bool {
        self.0 & Self::bit(method) != 0
    }

    pub fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }
}

/// A compiled permission.
#[derive(Debug)]
pub struct Permission {
    /// As written in the config (`GET,HEAD /orders/**`), for decisions and `explain`.
    pub text: Arc<str>,
    /// The role that lists it.
    pub role: Arc<str>,
    pub methods: MethodSet,
    pub path: PathPattern,
    pub conditions: Box<[Condition]>,
    /// Sorted ids of the roles that hold it: its role and every role that includes that one.
    pub held_by: Box<[u32]>,
    /// `(role index, permission index)` in the config, for findings.
    pub source: (usize, usize),
}

impl Permission {
    /// Whether one of `roles` (ids, any order) holds this permission.
    pub fn held_by_any(&self, roles: &[u32]) -> bool {
        roles
            .iter()
            .any(|id| self.held_by.binary_search(id).is_ok())
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Finds the permissions whose path pattern matches a path.
#[derive(Debug, Default)]
pub struct PermissionIndex {
    root: Node,
}

#[derive(Debug, Default)]
struct Node {
    /// Sorted by segment text, for binary search.
    literals: Vec<(Box<str>, Node)>,
    /// `{param}` and `*` alike: any one segment.
    wildcard: Option<Box<Node>>,
    /// Patterns that end exactly here.
    exact: Vec<u32>,
    /// Patterns that end here with `/**`.
    prefix: Vec<u32>,
}

impl PermissionIndex {
    pub fn insert(&mut self, pattern: &PathPattern, id: u32) {
        let mut node = &mut self.root;
        for segment in pattern.segments() {
            node = match segment {
                PatternSegment::Literal(text) => {
                    let at = match node.literals.binary_search_by(|(t, _)| (**t).cmp(text)) {
                        Ok(at) => at,
                        Err(at) => {
                            node.literals.insert(at, (text.into(), Node::default()));
                            at
                        }
                    };
                    &mut node.literals[at].1
                }
                PatternSegment::Wildcard(_) => node.wildcard.get_or_insert_with(Box::default),
            };
        }
        if pattern.is_prefix() {
            node.prefix.push(id);
        } else {
            node.exact.push(id);
        }
    }

    /// Calls `visit` with the id of every permission whose pattern matches the normalised
    /// `path`, most specific first (literal before wildcard, deeper before shallower), until it
    /// breaks.
    pub fn for_each_match<B>(
        &self,
        path: &str,
        visit: &mut impl FnMut(u32) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        Self::walk(&self.root, path.split('/').filter(|s| !s.is_empty()), visit)
    }

    fn walk<'p, B>(
        node: &Node,
        rest: impl Iterator<Item = &'p str> + Clone,
        visit: &mut impl FnMut(u32) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        let mut next = rest.clone();
        match next.next() {
            None => {
                for &id in &node.exact {
                    visit(id)?;
                }
            }
            Some(segment) => {
                if let Ok(at) = node
                    .literals
                    .binary_search_by(|(text, _)| (**text).cmp(segment))
                {
                    Self::walk(&node.literals[at].1, next.clone(), visit)?;
                }
                if let Some(child) = &node.wildcard {
                    Self::walk(child, next, visit)?;
                }
            }
        }
        for &id in &node.prefix {
            visit(id)?;
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(index: &PermissionIndex, path: &str) -> Vec<u32> {
        let mut found = Vec::new();
        let _ = index.for_each_match::<()>(path, &mut |id| {
            found.push(id);
            ControlFlow::Continue(())
        });
        found
    }

    #[test]
    fn the_index_finds_exactly_what_the_patterns_match() {
        let patterns = [
            "/orders/**",
            "/orders/{id}",
            "/orders/{id}/items/*",
            "/orders/7",
            "/**",
            "/tenants/{t}/**",
            "/health",
        ];
        let mut index = PermissionIndex::default();
        let compiled: Vec<PathPattern> = patterns
            .iter()
            .map(|p| PathPattern::parse(p).unwrap())
            .collect();
        for (id, pattern) in compiled.iter().enumerate() {
            index.insert(pattern, id as u32);
        }
        for path in [
            "/",
            "/orders",
            "/orders/7",
            "/orders/8/",
            "/orders/7/items/3",
            "/orders/7/items",
            "/tenants/a/x/y",
            "/tenants",
            "/health",
            "/healthz",
        ] {
            let mut expected: Vec<u32> = compiled
                .iter()
                .enumerate()
                .filter(|(_, p)| p.matches(path))
                .map(|(id, _)| id as u32)
                .collect();
            let mut found = matches(&index, path);
            expected.sort_unstable();
            found.sort_unstable();
            assert_eq!(found, expected, "{path}");
        }
        // most specific first
        assert_eq!(matches(&index, "/orders/7"), vec![3, 1, 0, 4]);
    }

    #[test]
    fn method_sets_parse_and_match() {
        let set = MethodSet::parse(["GET", "HEAD"]).unwrap();
        assert!(set.contains(&Method::GET) && set.contains(&Method::HEAD));
        assert!(!set.contains(&Method::POST));
        assert!(!set.contains(&Method::from_bytes(b"PURGE").unwrap()));
        assert!(MethodSet::ALL.contains(&Method::from_bytes(b"PURGE").unwrap()));
        assert!(MethodSet::parse(["get"]).is_err());
        assert!(MethodSet::parse(["*", "FETCH"]).is_err());
        assert!(MethodSet::parse(std::iter::empty()).is_err());
    }
}
