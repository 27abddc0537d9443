//! The process log: `tracing` events as JSON or human-readable lines on stdout. (The access log
//! is separate: see [`super::access_log`].)

use std::sync::OnceLock;

use tracing_subscriber::{fmt, prelude::*, EnvFilter};

use crate::config::model::LogFormat;

static INSTALLED: OnceLock<()> = OnceLock::new();

/// Installs the global subscriber once; `RUST_LOG` overrides the configured level.
/// Logging settings are read at start only (changing them needs a restart).
pub fn init(format: LogFormat, level: &str) {
    INSTALLED.get_or_init(|| {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        let registry = tracing_subscriber::registry().with(filter);
        let result = match format {
            LogFormat::Json => registry
                .with(
                    fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(false)
                        .with_writer(std::io::stdout),
                )
                .try_init(),
            LogFormat::Human => registry
                .with(fmt::layer().with_writer(std::io::stdout))
                .try_init(),
        };
        // a test harness may have installed one already; that is fine
        let _ = result;
    });
}
