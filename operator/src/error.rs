//! One error type for the crate, so reconcile failures can be counted by kind.

use kube::runtime::finalizer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),

    #[error("finalizer handling failed: {0}")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),

    #[error("object is missing {0}")]
    MissingField(&'static str),

    #[error("could not serialize object: {0}")]
    Serialize(#[from] serde_json::Error),

    #[error("leadership lost: {0}")]
    LeadershipLost(String),

    #[error("timed out waiting for {0}")]
    Timeout(String),

    #[error("configuration error: {0}")]
    Config(String),

    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    #[error("agent certificates: {0}")]
    Tls(#[from] crate::resources::tls::TlsError),

    #[error("listing the agent pods failed: {0}")]
    AgentPods(#[source] kube::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Low-cardinality label for the reconcile-error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Finalizer(inner) => match inner.as_ref() {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
            Self::MissingField(_) => "missing_field",
            Self::Serialize(_) => "serialize",
            Self::LeadershipLost(_) => "leadership",
            Self::Timeout(_) => "timeout",
            Self::Config(_) => "config",
            Self::Io(_) => "io",
            Self::Tls(_) => "tls",
            Self::AgentPods(_) => "agent_pods",
        }
    }
}

/// True when the API server answered 404: the object, or its whole resource
/// type (an uninstalled CRD), does not exist.
pub fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 404)
}

/// True when a guarded patch (a JSON patch `test`, a resourceVersion
/// precondition) failed because the object changed since it was read: 409
/// Conflict, or 422 Invalid for a failed `test` operation.
pub fn is_stale_write(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.code == 409 || status.code == 422)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("test", "Test")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn classifies_api_errors() {
        assert!(is_not_found(&api_error(404)));
        assert!(!is_not_found(&api_error(409)));
        assert!(is_stale_write(&api_error(409)));
        assert!(is_stale_write(&api_error(422)));
        assert!(!is_stale_write(&api_error(403)));
        assert!(!is_stale_write(&api_error(404)));
    }
}
