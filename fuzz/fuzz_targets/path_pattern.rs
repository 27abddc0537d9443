//! `portcullis::route::PathPattern::parse` on arbitrary text, then matching against normalised paths
//! derived from the input.
//!
//! Properties (from `src/route/pattern.rs`):
//! - for every normalised path, `captures(path).is_some() == matches(path)`, and a capture list
//!   names the pattern's `{params}` in order, each bound to one non-empty segment of the path;
//! - the pattern's own instance (`{x}` and `*` filled in, `/**` dropped) is a normal path that the
//!   pattern matches, with a trailing slash too (not significant);
//! - one extra segment below the instance matches exactly when the pattern ends in `/**`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::route::{normalize_path, PathPattern};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(pattern) = PathPattern::parse(text) else {
        return;
    };

    // what the pattern is made of, read independently of the parser
    let body = &text[1..]; // parse accepted it, so it starts with `/`
    let mut parts: Vec<&str> = body.split('/').collect();
    if parts.last() == Some(&"") {
        parts.pop();
    }
    let prefix = parts.last() == Some(&"**");
    if prefix {
        parts.pop();
    }
    let params: Vec<&str> = parts
        .iter()
        .filter(|p| p.starts_with('{'))
        .map(|p| &p[1..p.len() - 1])
        .collect();

    // the instance: every `{x}` becomes `v<i>`, every `*` becomes `w`
    let mut instance = String::new();
    let mut values = Vec::new();
    for part in &parts {
        instance.push('/');
        if part.starts_with('{') {
            let value = format!("v{}", values.len());
            instance.push_str(&value);
            values.push(value);
        } else if *part == "*" {
            instance.push('w');
        } else {
            instance.push_str(part);
        }
    }
    if instance.is_empty() {
        instance.push('/');
    }
    let normal = normalize_path(&instance)
        .unwrap_or_else(|e| panic!("instance {instance:?} of accepted {text:?} is refused: {e}"));
    assert_eq!(
        normal, instance,
        "instance of {text:?} is not a normal path"
    );

    let expected: Vec<(&str, &str)> = params
        .iter()
        .copied()
        .zip(values.iter().map(String::as_str))
        .collect();
    for path in [
        instance.clone(),
        format!("{}/", instance.trim_end_matches('/')),
    ] {
        let path = if path.is_empty() {
            "/".to_owned()
        } else {
            path
        };
        assert!(
            pattern.matches(&path),
            "{text:?} does not match its instance {path:?}"
        );
        assert_eq!(
            pattern.captures(&path).as_deref(),
            Some(&expected[..]),
            "{text:?} on {path:?}"
        );
    }
    let below = format!("{}/extra", instance.trim_end_matches('/'));
    assert_eq!(
        pattern.matches(&below),
        prefix,
        "{text:?} on {below:?}: one segment more matches only a `/**` pattern"
    );

    // consistency on assorted normalised paths
    let mut candidates = vec![
        "/".to_owned(),
        text.to_owned(),
        instance.clone(),
        below,
        format!("{text}/x"),
        text.replace(['{', '}', '*'], ""),
    ];
    if let Some((parent, _)) = instance.trim_end_matches('/').rsplit_once('/') {
        candidates.push(format!("/{parent}"));
    }
    for candidate in candidates {
        let Ok(path) = normalize_path(&candidate) else {
            continue;
        };
        check_consistent(&pattern, text, &path, &params);
    }
});

fn check_consistent(pattern: &PathPattern, text: &str, path: &str, params: &[&str]) {
    let matched = pattern.matches(path);
    let captures = pattern.captures(path);
    assert_eq!(
        captures.is_some(),
        matched,
        "{text:?} on {path:?}: matches={matched} but captures={captures:?}"
    );
    if let Some(captures) = captures {
        let names: Vec<&str> = captures.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, params, "{text:?} on {path:?}: captured names");
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for (name, value) in &captures {
            assert!(
                !value.is_empty() && !value.contains('/') && segments.contains(value),
                "{text:?} on {path:?}: {name} = {value:?} is not a segment of the path"
            );
        }
    }
}
