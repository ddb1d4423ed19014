//! `--auth=kubernetes`: /metrics only for callers the Kubernetes API vouches for, the way
//! kube-rbac-proxy does it, as an axum middleware.
//!
//! A request must carry `Authorization: Bearer <token>`. The token goes to the API server in a
//! TokenReview (authentication.k8s.io/v1); the user it names (with uid, groups and extra) goes in a
//! SubjectAccessReview (authorization.k8s.io/v1) for the non-resource URL of the request (`/metrics`)
//! and the verb `get`. No or malformed header → 401, token not authenticated → 401, not allowed →
//! 403, API unreachable or failing → 503 (never 200). Each decision is cached for a short while
//! (allowed 60 s, denied 10 s) under the SHA-256 of verb, path and token, so a Prometheus scraping
//! every 15 s costs no API call at steady state and no token is kept in clear. API errors are
//! not cached; a cached decision still applies while the API is down.
//!
//! Wire it with [`setup`] and [`protect`] on the /metrics routes only; /healthz and /readyz stay open.
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// How long an allowed decision is reused.
pub const DEFAULT_ALLOWED_TTL: Duration = Duration::from_secs(60);
/// How long a denied or unauthenticated decision is reused.
pub const DEFAULT_DENIED_TTL: Duration = Duration::from_secs(10);
/// Decisions kept at most; the oldest goes first when full.
pub const DEFAULT_CACHE_CAPACITY: usize = 1024;
/// Longest wait for one TokenReview or SubjectAccessReview (Prometheus' scrape timeout is 10 s).
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(5);
/// Longer bearer tokens are refused without asking the API server.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// `--auth`, defined with the rest of the command line, which the operator shares.
pub use bio_agent_args::AuthMode;

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub allowed_ttl: Duration,
    pub denied_ttl: Duration,
    /// 0 disables the cache (every request asks the API server).
    pub cache_capacity: usize,
    pub api_timeout: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            allowed_ttl: DEFAULT_ALLOWED_TTL,
            denied_ttl: DEFAULT_DENIED_TTL,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            api_timeout: DEFAULT_API_TIMEOUT,
        }
    }
}

/// The identity a TokenReview returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What the SubjectAccessReview asks: may the user do `verb` on the non-resource URL `path`?
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonResourceRequest {
    pub path: String,
    pub verb: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    Authenticated(User),
    /// The API server does not vouch for the token; `reason` is its error text, for the log only.
    Rejected {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    Allowed,
    Denied { reason: String },
}

/// The two API calls, abstracted so tests can count and script them.
pub trait Reviewer: Send + Sync + 'static {
    fn token_review(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<Authentication, ReviewError>> + Send;

    fn access_review(
        &self,
        user: &User,
        request: &NonResourceRequest,
    ) -> impl Future<Output = Result<Authorization, ReviewError>> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Review {
    Token,
    Access,
}

impl fmt::Display for Review {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Review::Token => "TokenReview",
            Review::Access => "SubjectAccessReview",
        })
    }
}

/// A review that got no answer: the decision is unknown, so the request is refused with 503.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("{review} timed out after {after:?}")]
    Timeout { review: Review, after: Duration },
    #[error("{review} refused by the API server: {code} {reason}: {message}")]
    Status {
        review: Review,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("{review} failed: {source}")]
    Request {
        review: Review,
        #[source]
        source: kube::Error,
    },
}

impl ReviewError {
    fn from_kube(review: Review, error: kube::Error) -> Self {
        match error {
            kube::Error::Api(status) => ReviewError::Status {
                review,
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            source => ReviewError::Request { review, source },
        }
    }

    /// For the 503 body, sent to callers not yet authenticated: what went wrong, without the API
    /// server's address or the agent's identity (both are in the agent's log).
    fn public_summary(&self) -> String {
        match self {
            ReviewError::Timeout { review, after } => {
                format!("{review} timed out after {after:?}")
            }
            ReviewError::Status {
                review, code: 403, ..
            } => {
                let resource = match review {
                    Review::Token => "tokenreviews.authentication.k8s.io",
                    Review::Access => "subjectaccessreviews.authorization.k8s.io",
                };
                format!(
                    "{review} forbidden to the agent: its identity needs `create` on {resource}"
                )
            }
            ReviewError::Status {
                review,
                code,
                reason,
                ..
            } => format!("{review} answered {code} {reason}"),
            ReviewError::Request { review, .. } => {
                format!("{review} failed: the API server is unreachable or answered unreadably")
            }
        }
    }
}

/// Why a request to a protected path is refused; its response is the refusal.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token: send `Authorization: Bearer <token>`")]
    MissingToken,
    #[error("malformed Authorization header: {0}")]
    MalformedHeader(&'static str),
    #[error("the Kubernetes API did not authenticate the bearer token")]
    Unauthenticated { reason: String },
    #[error("user {user:?} may not {verb} {path}")]
    Forbidden {
        user: String,
        verb: String,
        path: String,
        reason: String,
    },
    #[error("cannot check the bearer token with the Kubernetes API: {0}")]
    Unavailable(#[source] ReviewError),
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let (status, challenge, body) = match &self {
            AuthError::MissingToken => (
                StatusCode::UNAUTHORIZED,
                Some("Bearer"),
                format!("Unauthorized: {self}\n"),
            ),
            AuthError::MalformedHeader(_) => (
                StatusCode::UNAUTHORIZED,
                Some("Bearer error=\"invalid_request\""),
                format!("Unauthorized: {self}\n"),
            ),
            AuthError::Unauthenticated { .. } => (
                StatusCode::UNAUTHORIZED,
                Some("Bearer error=\"invalid_token\""),
                format!("Unauthorized: {self}\n"),
            ),
            AuthError::Forbidden { .. } => {
                (StatusCode::FORBIDDEN, None, format!("Forbidden: {self}\n"))
            }
            AuthError::Unavailable(e) => (
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                format!(
                    "Service Unavailable: cannot check the bearer token with the Kubernetes API ({}); \
                     try again later\n",
                    e.public_summary()
                ),
            ),
        };
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        if let Some(challenge) = challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        response
    }
}

/// `--auth=kubernetes` could not start.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("--auth=kubernetes: no Kubernetes API credentials (in-cluster ServiceAccount or KUBECONFIG): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("--auth=kubernetes: cannot build the Kubernetes API client: {0}")]
    Client(#[from] kube::Error),
}

/// [`Reviewer`] against the real API server.
#[derive(Clone)]
pub struct KubeReviewer {
    tokens: Api<TokenReview>,
    access: Api<SubjectAccessReview>,
}

impl KubeReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            tokens: Api::all(client.clone()),
            access: Api::all(client),
        }
    }
}

impl Reviewer for KubeReviewer {
    async fn token_review(&self, token: &str) -> Result<Authentication, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: None,
            },
            ..Default::default()
        };
        let answer = self
            .tokens
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::from_kube(Review::Token, e))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(Authentication::Rejected {
                reason: status.error.unwrap_or_default(),
            });
        }
        let user = status.user.unwrap_or_default();
        let name = user.username.unwrap_or_default();
        if name.is_empty() {
            return Ok(Authentication::Rejected {
                reason: "authenticated without a user name".into(),
            });
        }
        Ok(Authentication::Authenticated(User {
            name,
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        }))
    }

    async fn access_review(
        &self,
        user: &User,
        request: &NonResourceRequest,
    ) -> Result<Authorization, ReviewError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: (!user.uid.is_empty()).then(|| user.uid.clone()),
                groups: Some(user.groups.clone()),
                extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(request.path.clone()),
                    verb: Some(request.verb.clone()),
                }),
                resource_attributes: None,
            },
            ..Default::default()
        };
        let answer = self
            .access
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError::from_kube(Review::Access, e))?;
        let status = answer.status.unwrap_or_default();
        if status.allowed && status.denied != Some(true) {
            Ok(Authorization::Allowed)
        } else {
            let reason = match (status.reason, status.evaluation_error) {
                (Some(r), Some(e)) if !e.is_empty() => format!("{r} (evaluation error: {e})"),
                (None, Some(e)) => format!("evaluation error: {e}"),
                (r, _) => r.unwrap_or_default(),
            };
            Ok(Authorization::Denied { reason })
        }
    }
}

/// The middleware's state: a reviewer and the decision cache.
pub struct KubeAuth<R = KubeReviewer> {
    reviewer: R,
    config: AuthConfig,
    cache: DecisionCache,
}

impl KubeAuth<KubeReviewer> {
    /// A client from the in-cluster ServiceAccount or KUBECONFIG, like every Kubernetes client.
    pub async fn from_env(config: AuthConfig) -> Result<Self, AuthSetupError> {
        let kube_config = kube::Config::infer().await?;
        tracing::info!(
            api_server = %kube_config.cluster_url,
            "--auth=kubernetes: /metrics needs a bearer token allowed to get /metrics (TokenReview + SubjectAccessReview)"
        );
        let client = kube::Client::try_from(kube_config)?;
        Ok(Self::new(KubeReviewer::new(client), config))
    }
}

impl<R: Reviewer> KubeAuth<R> {
    pub fn new(reviewer: R, config: AuthConfig) -> Self {
        let cache = DecisionCache::new(config.cache_capacity);
        Self {
            reviewer,
            config,
            cache,
        }
    }

    /// Decides one request; `Ok` carries the user name.
    pub async fn check(
        &self,
        headers: &HeaderMap,
        verb: &str,
        path: &str,
    ) -> Result<String, AuthError> {
        let token = bearer_token(headers)?;
        let key = cache_key(verb, path, token);
        if let Some(decision) = self.cache.get(&key, Instant::now()) {
            return decision.into_result(verb, path);
        }
        let user = self
            .bounded(Review::Token, self.reviewer.token_review(token))
            .await?;
        let user = match user {
            Authentication::Authenticated(user) => user,
            Authentication::Rejected { reason } => {
                let decision = Decision::Unauthenticated { reason };
                self.remember(key, &decision);
                return decision.into_result(verb, path);
            }
        };
        let request = NonResourceRequest {
            path: path.to_owned(),
            verb: verb.to_owned(),
        };
        let access = self
            .bounded(Review::Access, self.reviewer.access_review(&user, &request))
            .await?;
        let decision = match access {
            Authorization::Allowed => Decision::Allowed { user: user.name },
            Authorization::Denied { reason } => Decision::Forbidden {
                user: user.name,
                reason,
            },
        };
        self.remember(key, &decision);
        decision.into_result(verb, path)
    }

    /// One review, given at most `api_timeout`; no answer is a 503.
    async fn bounded<T>(
        &self,
        review: Review,
        call: impl Future<Output = Result<T, ReviewError>>,
    ) -> Result<T, AuthError> {
        let after = self.config.api_timeout;
        match tokio::time::timeout(after, call).await {
            Ok(answer) => answer.map_err(AuthError::Unavailable),
            Err(_) => Err(AuthError::Unavailable(ReviewError::Timeout {
                review,
                after,
            })),
        }
    }

    fn remember(&self, key: CacheKey, decision: &Decision) {
        let ttl = match decision {
            Decision::Allowed { .. } => self.config.allowed_ttl,
            _ => self.config.denied_ttl,
        };
        self.cache
            .insert(key, decision.clone(), ttl, Instant::now());
    }
}

/// `--auth` → the state for [`protect`], or `None` when /metrics stays open.
pub async fn setup(mode: AuthMode) -> Result<Option<Arc<KubeAuth>>, AuthSetupError> {
    match mode {
        AuthMode::None => Ok(None),
        AuthMode::Kubernetes => Ok(Some(Arc::new(
            KubeAuth::from_env(AuthConfig::default()).await?,
        ))),
    }
}

/// Puts [`require_metrics_access`] in front of every route `routes` has (and only those: merge
/// the result into the full router after).
pub fn protect<S, R>(routes: Router<S>, auth: Arc<KubeAuth<R>>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    R: Reviewer,
{
    routes.route_layer(axum::middleware::from_fn_with_state(
        auth,
        require_metrics_access::<R>,
    ))
}

/// The axum middleware (`axum::middleware::from_fn_with_state`).
pub async fn require_metrics_access<R: Reviewer>(
    State(auth): State<Arc<KubeAuth<R>>>,
    req: Request,
    next: Next,
) -> Response {
    let verb = verb_for(req.method());
    let path = req.uri().path().to_owned();
    match auth.check(req.headers(), verb, &path).await {
        Ok(user) => {
            tracing::trace!(%path, %user, "allowed");
            next.run(req).await
        }
        Err(e) => {
            match &e {
                AuthError::Unavailable(_) => tracing::warn!(%path, error = %e, "refused with 503"),
                AuthError::Forbidden { reason, .. } => {
                    tracing::debug!(%path, error = %e, %reason, "refused with 403")
                }
                AuthError::Unauthenticated { reason } => {
                    tracing::debug!(%path, error = %e, %reason, "refused with 401")
                }
                _ => tracing::debug!(%path, error = %e, "refused with 401"),
            }
            e.into_response()
        }
    }
}

/// The Kubernetes verb for an HTTP method, as kube-rbac-proxy maps it (HEAD reads like GET).
fn verb_for(method: &Method) -> &'static str {
    match *method {
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

/// The token of the one `Authorization: Bearer <token>` header (scheme case-insensitive, RFC 7235).
fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(AuthError::MissingToken)?;
    if values.next().is_some() {
        return Err(AuthError::MalformedHeader(
            "more than one Authorization header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::MalformedHeader("not visible ASCII"))?
        .trim();
    let (scheme, token) = match value.split_once([' ', '\t']) {
        Some((scheme, rest)) => (scheme, rest.trim()),
        None => (value, ""),
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader("the scheme is not Bearer"));
    }
    if token.is_empty() {
        return Err(AuthError::MalformedHeader("Bearer without a token"));
    }
    if token.contains([' ', '\t']) {
        return Err(AuthError::MalformedHeader("the token contains whitespace"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(AuthError::MalformedHeader(
            "the token is longer than 16 KiB",
        ));
    }
    Ok(token)
}

type CacheKey = [u8; 32];

/// SHA-256 of verb, path and token: the token itself is never stored.
fn cache_key(verb: &str, path: &str, token: &str) -> CacheKey {
    let mut data = Vec::with_capacity(verb.len() + path.len() + token.len() + 2);
    data.extend_from_slice(verb.as_bytes());
    data.push(0);
    data.extend_from_slice(path.as_bytes());
    data.push(0);
    data.extend_from_slice(token.as_bytes());
    sha256(&data)
}

/// SHA-256 from the ring provider rustls already links (no extra dependency).
fn sha256(data: &[u8]) -> [u8; 32] {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite");
    let digest = suite.common.hash_provider.hash(data);
    digest
        .as_ref()
        .try_into()
        .expect("a SHA-256 digest is 32 bytes")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Decision {
    Allowed { user: String },
    Forbidden { user: String, reason: String },
    Unauthenticated { reason: String },
}

impl Decision {
    fn into_result(self, verb: &str, path: &str) -> Result<String, AuthError> {
        match self {
            Decision::Allowed { user } => Ok(user),
            Decision::Forbidden { user, reason } => Err(AuthError::Forbidden {
                user,
                verb: verb.to_owned(),
                path: path.to_owned(),
                reason,
            }),
            Decision::Unauthenticated { reason } => Err(AuthError::Unauthenticated { reason }),
        }
    }
}

struct CacheEntry {
    decision: Decision,
    inserted: Instant,
    expires: Instant,
}

/// Bounded TTL cache; when full, expired entries go first, then the oldest.
struct DecisionCache {
    capacity: usize,
    entries: Mutex<HashMap<CacheKey, CacheEntry>>,
}

impl DecisionCache {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CacheKey, CacheEntry>> {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, key: &CacheKey, now: Instant) -> Option<Decision> {
        let mut entries = self.lock();
        match entries.get(key) {
            Some(entry) if now < entry.expires => Some(entry.decision.clone()),
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&self, key: CacheKey, decision: Decision, ttl: Duration, now: Instant) {
        if self.capacity == 0 || ttl.is_zero() {
            return;
        }
        let mut entries = self.lock();
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            entries.retain(|_, e| now < e.expires);
            while entries.len() >= self.capacity {
                let oldest = entries
                    .iter()
                    .min_by_key(|(_, e)| e.inserted)
                    .map(|(k, _)| *k)
                    .expect("a full cache has entries");
                entries.remove(&oldest);
            }
        }
        entries.insert(
            key,
            CacheEntry {
                decision,
                inserted: now,
                expires: now + ttl,
            },
        );
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests;
