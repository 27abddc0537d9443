//! `portcullis::config::load_str` on arbitrary text (bytes read as lossy UTF-8), with an
//! environment in which no variable is set.
//!
//! Properties (from `src/config/mod.rs`, `error.rs`, `source.rs`):
//! - it never panics;
//! - on `Err` there is at least one error, each names the file it was given, and the errors are in
//!   file order (sorted by line, then column: `ErrorSink::into_errors`);
//! - every error has a place: `load_str` locates sink errors through `SpanIndex::locate`, which
//!   falls back to (1, 1), and syntax errors carry the parser's 1-based position. Line `0` is only
//!   used by `load_file` for a file that cannot be read (empty field path), never by `load_str`;
//!   so here line >= 1 and column >= 1, and the line is within the text (at most the line after
//!   its last line, where yaml-rust2 reports the end of the stream);
//! - on `Ok` nothing came from the environment (the lookup never answers), so no path is marked
//!   secret, and the redacted JSON view can be built.

#![no_main]

use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use portcullis::config::{load_str, redacted_json};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let file = Path::new("fuzz.yaml");
    match load_str(&text, file, PathBuf::new(), &|_| None) {
        Ok(loaded) => {
            assert_eq!(loaded.file, file);
            assert!(
                loaded.secret_paths.is_empty(),
                "secret paths without any environment: {:?}",
                loaded.secret_paths
            );
            for warning in &loaded.warnings {
                assert_eq!(warning.0.file, file);
                assert!(warning.0.line >= 1, "warning without a line: {warning}");
            }
            let _ = redacted_json(&loaded);
        }
        Err(errors) => {
            let errors = errors.0;
            assert!(!errors.is_empty(), "Err without any error");
            // YAML line breaks: LF, CR, CRLF, and (for libyaml, behind serde_yaml) NEL, LS, PS
            let breaks = text
                .replace("\r\n", "\n")
                .matches(['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'])
                .count();
            for error in &errors {
                assert_eq!(error.file, file, "{error}");
                assert!(
                    error.line >= 1 || (error.line == 0 && error.path.is_empty()),
                    "error at line 0 with a field path: {error}"
                );
                assert!(
                    error.line >= 1 && error.column >= 1,
                    "load_str error without a position: {error:?}"
                );
                // yaml-rust2 puts the end of the stream on a fresh line when the text does not
                // end in a line break, so a syntax error at the end can sit one line further
                assert!(
                    error.line <= breaks + 2,
                    "error on line {} of a text with {} line breaks: {error}",
                    error.line,
                    breaks
                );
            }
            assert!(
                errors
                    .windows(2)
                    .all(|w| (w[0].line, w[0].column) <= (w[1].line, w[1].column)),
                "errors not in file order: {errors:?}"
            );
        }
    }
});
