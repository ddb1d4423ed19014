//! Structured logging.

use std::io::IsTerminal;

use tracing_subscriber::{fmt, EnvFilter};

/// `filter` uses `RUST_LOG` syntax (`info`, `bio_operator=debug,kube=warn`, ...).
pub fn init(filter: &str, json: bool) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only help on a terminal; in `kubectl logs` they are noise.
    let builder = fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_ansi(std::io::stdout().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
