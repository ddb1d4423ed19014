//! Structured logging.

use tracing_subscriber::{fmt, EnvFilter};

/// `filter` uses `RUST_LOG` syntax (`info`, `bio_operator=debug,kube=warn`, ...).
pub fn init(filter: &str, json: bool) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_target(true);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
