use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::routing::{get, post};
use k8s_openapi::serde_json::{self, json, Value};

use super::*;

// ------------------------------------------------------------------ helpers ----

const SCRAPER: &str = "scraper-token";
const NOBODY: &str = "nobody-token";

fn scraper() -> User {
    User {
        name: "system:serviceaccount:mon:scraper".into(),
        uid: "uid-scraper".into(),
        groups: vec![
            "system:serviceaccounts".into(),
            "system:serviceaccounts:mon".into(),
            "system:authenticated".into(),
        ],
        extra: BTreeMap::from([(
            "authentication.kubernetes.io/pod-name".into(),
            vec!["prometheus-0".into()],
        )]),
    }
}

fn nobody() -> User {
    User {
        name: "system:serviceaccount:mon:nobody".into(),
        uid: "uid-nobody".into(),
        groups: vec!["system:authenticated".into()],
        extra: BTreeMap::new(),
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Mode {
    #[default]
    Up,
    /// Both reviews fail (API server answers 500).
    Down,
    /// TokenReview works, SubjectAccessReview fails.
    AccessDown,
    /// Neither review ever answers.
    Hang,
}

/// Scripted reviewer: knows SCRAPER (allowed to get /metrics) and NOBODY (no rights); counts calls.
#[derive(Default)]
struct Fake {
    mode: Mutex<Mode>,
    token_calls: AtomicUsize,
    access_calls: AtomicUsize,
    access_seen: Mutex<Vec<(User, NonResourceRequest)>>,
}

impl Fake {
    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }
    fn calls(&self) -> (usize, usize) {
        (
            self.token_calls.load(Ordering::SeqCst),
            self.access_calls.load(Ordering::SeqCst),
        )
    }
}

fn api_failure(review: Review) -> ReviewError {
    ReviewError::Status {
        review,
        code: 500,
        reason: "InternalError".into(),
        message: "etcdserver: request timed out".into(),
    }
}

impl Reviewer for Arc<Fake> {
    async fn token_review(&self, token: &str) -> Result<Authentication, ReviewError> {
        self.token_calls.fetch_add(1, Ordering::SeqCst);
        match self.mode() {
            Mode::Down => return Err(api_failure(Review::Token)),
            Mode::Hang => std::future::pending::<()>().await,
            Mode::Up | Mode::AccessDown => {}
        }
        Ok(match token {
            SCRAPER => Authentication::Authenticated(scraper()),
            NOBODY => Authentication::Authenticated(nobody()),
            _ => Authentication::Rejected {
                reason: "invalid bearer token".into(),
            },
        })
    }

    async fn access_review(
        &self,
        user: &User,
        request: &NonResourceRequest,
    ) -> Result<Authorization, ReviewError> {
        self.access_calls.fetch_add(1, Ordering::SeqCst);
        self.access_seen
            .lock()
            .unwrap()
            .push((user.clone(), request.clone()));
        match self.mode() {
            Mode::Down | Mode::AccessDown => return Err(api_failure(Review::Access)),
            Mode::Hang => std::future::pending::<()>().await,
            Mode::Up => {}
        }
        if user.name == scraper().name && request.path == "/metrics" && request.verb == "get" {
            Ok(Authorization::Allowed)
        } else {
            Ok(Authorization::Denied {
                reason: "no RBAC policy matched".into(),
            })
        }
    }
}

const METRICS_BODY: &str = "# TYPE ebpf_bio_req_latency histogram\n";

/// The router the way http.rs wires it: only /metrics behind the middleware.
fn app<R: Reviewer>(auth: Arc<KubeAuth<R>>) -> Router {
    let scrape = Router::new().route("/metrics", get(|| async { METRICS_BODY }));
    Router::new()
        .merge(protect(scrape, auth))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }))
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One raw HTTP/1.1 request, so headers can be as malformed as a test needs.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[&[u8]]) -> Reply {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n")
        .into_bytes();
    for h in headers {
        raw.extend_from_slice(h);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.write_all(&raw).unwrap();
        let mut out = Vec::new();
        stream.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_owned(),
        }
    })
    .await
    .unwrap()
}

async fn get_with(addr: SocketAddr, path: &str, token: &str) -> Reply {
    let header = format!("Authorization: Bearer {token}");
    request(addr, "GET", path, &[header.as_bytes()]).await
}

async fn setup_fake(config: AuthConfig) -> (Arc<Fake>, SocketAddr) {
    let fake = Arc::new(Fake::default());
    let auth = Arc::new(KubeAuth::new(fake.clone(), config));
    (fake, serve(app(auth)).await)
}

fn assert_401(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 401, "{what}: {}", reply.body);
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: WWW-Authenticate {challenge:?}"
    );
    assert!(!reply.body.contains(METRICS_BODY), "{what}: metrics leaked");
}

// -------------------------------------------------------------- pure parts ----

fn headers(values: &[&[u8]]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for v in values {
        map.append(header::AUTHORIZATION, HeaderValue::from_bytes(v).unwrap());
    }
    map
}

#[test]
fn bearer_token_parsing() {
    assert!(matches!(
        bearer_token(&headers(&[])),
        Err(AuthError::MissingToken)
    ));
    for ok in [
        &b"Bearer abc.def-ghi_j="[..],
        b"bearer abc.def-ghi_j=",
        b"BEARER abc.def-ghi_j=",
        b"  Bearer   abc.def-ghi_j=  ",
        b"Bearer\tabc.def-ghi_j=",
    ] {
        assert_eq!(
            bearer_token(&headers(&[ok])).unwrap(),
            "abc.def-ghi_j=",
            "{}",
            String::from_utf8_lossy(ok)
        );
    }
    for bad in [
        &b""[..],
        b"Bearer",
        b"Bearer ",
        b"Bearer    ",
        b"Basic dXNlcjpwYXNz",
        b"Token abc",
        b"Bearerabc",
        b"Bearer abc def",
        b"Bearer t\xc3\xb6ken",
    ] {
        assert!(
            matches!(
                bearer_token(&headers(&[bad])),
                Err(AuthError::MalformedHeader(_))
            ),
            "{:?} must be malformed",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(matches!(
        bearer_token(&headers(&[b"Bearer a", b"Bearer b"])),
        Err(AuthError::MalformedHeader(_))
    ));
    let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
    assert!(matches!(
        bearer_token(&headers(&[long.as_bytes()])),
        Err(AuthError::MalformedHeader(_))
    ));
}

#[test]
fn sha256_matches_known_vectors() {
    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
    assert_eq!(
        hex(&sha256(b"")),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        hex(&sha256(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn cache_key_hides_the_token_and_separates_verbs_and_paths() {
    let token = "a-secret-token-value";
    let key = cache_key("get", "/metrics", token);
    assert!(!key.windows(token.len()).any(|w| w == token.as_bytes()));
    assert_eq!(key, cache_key("get", "/metrics", token));
    assert_ne!(key, cache_key("get", "/metrics", "another-token"));
    assert_ne!(key, cache_key("get", "/other", token));
    assert_ne!(key, cache_key("create", "/metrics", token));
    // The separator keeps field boundaries: ("get", "/a" + "b") is not ("get", "/a", "b").
    assert_ne!(cache_key("get", "/ab", "c"), cache_key("get", "/a", "bc"));
}

#[test]
fn cache_expires_entries() {
    let cache = DecisionCache::new(8);
    let t0 = Instant::now();
    let allowed = Decision::Allowed { user: "u".into() };
    cache.insert([1; 32], allowed.clone(), Duration::from_secs(60), t0);
    assert_eq!(
        cache.get(&[1; 32], t0 + Duration::from_secs(59)),
        Some(allowed)
    );
    assert_eq!(cache.get(&[1; 32], t0 + Duration::from_secs(60)), None);
    assert_eq!(cache.len(), 0, "an expired entry is dropped when met");
    assert_eq!(cache.get(&[2; 32], t0), None);
}

#[test]
fn cache_is_bounded_expired_then_oldest_go_first() {
    let cache = DecisionCache::new(3);
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let d = |n: &str| Decision::Unauthenticated { reason: n.into() };
    cache.insert([1; 32], d("1"), s(100), t0);
    cache.insert([2; 32], d("2"), s(5), t0 + s(1)); // expires first
    cache.insert([3; 32], d("3"), s(100), t0 + s(2));
    // Full; at t0+10 entry 2 has expired: it goes, 1 (the oldest) stays.
    cache.insert([4; 32], d("4"), s(100), t0 + s(10));
    assert_eq!(cache.len(), 3);
    assert!(cache.get(&[1; 32], t0 + s(10)).is_some());
    assert!(cache.get(&[2; 32], t0 + s(10)).is_none());
    // Full with nothing expired: the oldest (1) goes.
    cache.insert([5; 32], d("5"), s(100), t0 + s(11));
    assert_eq!(cache.len(), 3);
    assert!(cache.get(&[1; 32], t0 + s(11)).is_none());
    for k in [3, 4, 5] {
        assert!(cache.get(&[k; 32], t0 + s(11)).is_some(), "entry {k}");
    }
    // Replacing an existing key never evicts another.
    cache.insert([5; 32], d("5b"), s(100), t0 + s(12));
    assert_eq!(cache.len(), 3);
    assert_eq!(cache.get(&[5; 32], t0 + s(12)), Some(d("5b")));
}

#[test]
fn cache_of_capacity_zero_or_zero_ttl_keeps_nothing() {
    let t0 = Instant::now();
    let none = DecisionCache::new(0);
    none.insert(
        [1; 32],
        Decision::Allowed { user: "u".into() },
        Duration::from_secs(60),
        t0,
    );
    assert_eq!(none.len(), 0);
    let some = DecisionCache::new(4);
    some.insert(
        [1; 32],
        Decision::Allowed { user: "u".into() },
        Duration::ZERO,
        t0,
    );
    assert_eq!(some.len(), 0);
}

#[test]
fn verbs_follow_kube_rbac_proxy() {
    assert_eq!(verb_for(&Method::GET), "get");
    assert_eq!(verb_for(&Method::HEAD), "get");
    assert_eq!(verb_for(&Method::POST), "create");
    assert_eq!(verb_for(&Method::PUT), "update");
    assert_eq!(verb_for(&Method::PATCH), "patch");
    assert_eq!(verb_for(&Method::DELETE), "delete");
}

// ------------------------------------------- the middleware, fake reviewer ----

#[tokio::test]
async fn allowed_token_gets_metrics_and_steady_scrapes_cost_no_api_calls() {
    let (fake, addr) = setup_fake(AuthConfig::default()).await;
    let reply = get_with(addr, "/metrics", SCRAPER).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body, METRICS_BODY);
    assert_eq!(fake.calls(), (1, 1));
    for _ in 0..5 {
        assert_eq!(get_with(addr, "/metrics", SCRAPER).await.status, 200);
    }
    assert_eq!(fake.calls(), (1, 1), "cached: no more reviews");
    // HEAD is checked as verb get: same decision, still from the cache.
    let head = request(
        addr,
        "HEAD",
        "/metrics",
        &[b"Authorization: Bearer scraper-token"],
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(fake.calls(), (1, 1));
}

#[tokio::test]
async fn access_review_asks_for_the_reviewed_identity_on_get_metrics() {
    let (fake, addr) = setup_fake(AuthConfig::default()).await;
    assert_eq!(get_with(addr, "/metrics?x=1", SCRAPER).await.status, 200);
    let seen = fake.access_seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![(
            scraper(),
            NonResourceRequest {
                path: "/metrics".into(),
                verb: "get".into()
            }
        )]
    );
}

#[tokio::test]
async fn forbidden_user_gets_403_and_the_denial_is_cached() {
    let (fake, addr) = setup_fake(AuthConfig::default()).await;
    let reply = get_with(addr, "/metrics", NOBODY).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(
        reply.body.contains("system:serviceaccount:mon:nobody"),
        "{}",
        reply.body
    );
    assert!(reply.body.contains("get /metrics"), "{}", reply.body);
    assert!(!reply.body.contains(METRICS_BODY));
    assert_eq!(get_with(addr, "/metrics", NOBODY).await.status, 403);
    assert_eq!(fake.calls(), (1, 1));
}

#[tokio::test]
async fn unknown_token_gets_401_and_the_rejection_is_cached() {
    let (fake, addr) = setup_fake(AuthConfig::default()).await;
    let reply = get_with(addr, "/metrics", "garbage").await;
    assert_401(&reply, "garbage token");
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
    assert!(
        !reply.body.contains("invalid bearer token"),
        "the API's reason stays in the log"
    );
    assert_401(
        &get_with(addr, "/metrics", "garbage").await,
        "garbage again",
    );
    assert_eq!(
        fake.calls(),
        (1, 0),
        "one TokenReview, no SubjectAccessReview"
    );
}

#[tokio::test]
async fn missing_or_malformed_headers_get_401_without_api_calls() {
    let (fake, addr) = setup_fake(AuthConfig::default()).await;
    let none = request(addr, "GET", "/metrics", &[]).await;
    assert_401(&none, "no header");
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    for bad in [
        &b"Authorization: Bearer"[..],
        b"Authorization: Bearer    ",
        b"Authorization: Basic dXNlcjpwYXNz",
        b"Authorization: Bearer a b",
        b"Authorization: scraper-token",
        b"Authorization: Bearer t\xc3\xb6ken",
    ] {
        let reply = request(addr, "GET", "/metrics", &[bad]).await;
        assert_401(&reply, &String::from_utf8_lossy(bad));
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer error=\"invalid_request\"")
        );
    }
    let two = request(
        addr,
        "GET",
        "/metrics",
        &[
            b"Authorization: Bearer scraper-token",
            b"Authorization: Bearer nobody-token",
        ],
    )
    .await;
    assert_401(&two, "two Authorization headers");
    assert_eq!(fake.calls(), (0, 0));
    // The scheme is case-insensitive (RFC 7235), as in Kubernetes' own bearer authenticator.
    let lower = request(
        addr,
        "GET",
        "/metrics",
        &[b"authorization: bearer scraper-token"],
    )
    .await;
    assert_eq!(lower.status, 200, "{}", lower.body);
}

#[tokio::test]
async fn health_endpoints_stay_open() {
    let (fake, addr) = setup_fake(AuthConfig::default()).await;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(request(addr, "GET", path, &[]).await.status, 200, "{path}");
        assert_eq!(get_with(addr, path, "garbage").await.status, 200, "{path}");
    }
    assert_eq!(fake.calls(), (0, 0));
}

#[tokio::test]
async fn api_down_gives_503_for_new_tokens_while_cached_decisions_hold() {
    let (fake, addr) = setup_fake(AuthConfig::default()).await;
    assert_eq!(get_with(addr, "/metrics", SCRAPER).await.status, 200);
    assert_eq!(get_with(addr, "/metrics", NOBODY).await.status, 403);
    assert_eq!(get_with(addr, "/metrics", "garbage").await.status, 401);
    let before = fake.calls();

    fake.set(Mode::Down);
    assert_eq!(get_with(addr, "/metrics", SCRAPER).await.status, 200);
    assert_eq!(get_with(addr, "/metrics", NOBODY).await.status, 403);
    assert_eq!(get_with(addr, "/metrics", "garbage").await.status, 401);
    assert_eq!(fake.calls(), before, "cached decisions need no API");

    let reply = get_with(addr, "/metrics", "new-token").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply.body.contains("TokenReview answered 500"),
        "{}",
        reply.body
    );
    assert!(reply.body.contains("try again later"), "{}", reply.body);
    assert_eq!(reply.header("retry-after"), Some("5"));
    assert!(!reply.body.contains(METRICS_BODY));
    assert_eq!(get_with(addr, "/metrics", "new-token").await.status, 503);
    assert_eq!(fake.calls().0, before.0 + 2, "a failure is never cached");

    fake.set(Mode::Up);
    assert_eq!(get_with(addr, "/metrics", "new-token").await.status, 401);
}

#[tokio::test]
async fn access_review_failure_gives_503_and_is_not_cached() {
    let (fake, addr) = setup_fake(AuthConfig::default()).await;
    fake.set(Mode::AccessDown);
    let reply = get_with(addr, "/metrics", SCRAPER).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("SubjectAccessReview"), "{}", reply.body);
    fake.set(Mode::Up);
    assert_eq!(get_with(addr, "/metrics", SCRAPER).await.status, 200);
    assert_eq!(fake.calls(), (2, 2));
}

#[tokio::test]
async fn hanging_api_times_out_with_503() {
    let config = AuthConfig {
        api_timeout: Duration::from_millis(200),
        ..AuthConfig::default()
    };
    let (fake, addr) = setup_fake(config).await;
    fake.set(Mode::Hang);
    let start = Instant::now();
    let reply = get_with(addr, "/metrics", SCRAPER).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply.body.contains("TokenReview timed out after 200ms"),
        "{}",
        reply.body
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn decisions_expire() {
    let config = AuthConfig {
        allowed_ttl: Duration::from_millis(150),
        denied_ttl: Duration::from_millis(150),
        ..AuthConfig::default()
    };
    let (fake, addr) = setup_fake(config).await;
    assert_eq!(get_with(addr, "/metrics", SCRAPER).await.status, 200);
    assert_eq!(get_with(addr, "/metrics", "garbage").await.status, 401);
    assert_eq!(fake.calls(), (2, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_with(addr, "/metrics", SCRAPER).await.status, 200);
    assert_eq!(get_with(addr, "/metrics", "garbage").await.status, 401);
    assert_eq!(fake.calls(), (4, 2), "expired decisions are reviewed again");
}

#[tokio::test]
async fn many_tokens_keep_the_cache_bounded() {
    let fake = Arc::new(Fake::default());
    let config = AuthConfig {
        cache_capacity: 3,
        ..AuthConfig::default()
    };
    let auth = Arc::new(KubeAuth::new(fake.clone(), config));
    let addr = serve(app(auth.clone())).await;
    for i in 0..10 {
        assert_eq!(
            get_with(addr, "/metrics", &format!("garbage-{i}"))
                .await
                .status,
            401
        );
        assert!(auth.cache.len() <= 3);
    }
    assert_eq!(auth.cache.len(), 3);
    // The latest survive, the oldest were evicted.
    assert_eq!(get_with(addr, "/metrics", "garbage-9").await.status, 401);
    assert_eq!(fake.calls().0, 10);
    assert_eq!(get_with(addr, "/metrics", "garbage-0").await.status, 401);
    assert_eq!(fake.calls().0, 11);
}

// ------------------------------------ KubeReviewer against a fake API server ----

/// A stand-in kube-apiserver on 127.0.0.1 that records review bodies and answers like the real
/// one: "good-token" is the scraper, "denied-token" a user without rights, "nouser-token"
/// authenticated without a name, anything else unauthenticated.
async fn fake_api_server() -> (SocketAddr, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (tr_seen, sar_seen) = (seen.clone(), seen.clone());
    let api = Router::new()
        .route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(move |body: String| {
                let seen = tr_seen.clone();
                async move {
                    let review: Value = serde_json::from_str(&body).unwrap();
                    seen.lock().unwrap().push(review.clone());
                    let status = match review["spec"]["token"].as_str().unwrap() {
                        "good-token" => json!({"authenticated": true, "user": {
                            "username": "system:serviceaccount:mon:scraper", "uid": "uid-scraper",
                            "groups": ["system:serviceaccounts", "system:authenticated"],
                            "extra": {"authentication.kubernetes.io/pod-name": ["prometheus-0"]}}}),
                        "denied-token" => json!({"authenticated": true, "user": {
                            "username": "system:serviceaccount:mon:nobody",
                            "groups": ["system:authenticated"]}}),
                        "nouser-token" => json!({"authenticated": true, "user": {}}),
                        _ => json!({"authenticated": false, "error": "invalid bearer token"}),
                    };
                    let mut answer = review;
                    answer["status"] = status;
                    json_reply(StatusCode::CREATED, &answer)
                }
            }),
        )
        .route(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            post(move |body: String| {
                let seen = sar_seen.clone();
                async move {
                    let review: Value = serde_json::from_str(&body).unwrap();
                    seen.lock().unwrap().push(review.clone());
                    let allowed =
                        review["spec"]["user"] == json!("system:serviceaccount:mon:scraper");
                    let mut answer = review;
                    answer["status"] = if allowed {
                        json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding"})
                    } else {
                        json!({"allowed": false})
                    };
                    json_reply(StatusCode::CREATED, &answer)
                }
            }),
        );
    (serve(api).await, seen)
}

fn json_reply(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn kube_auth_for(api: SocketAddr, config: AuthConfig) -> Arc<KubeAuth> {
    let url = format!("http://{api}").parse().unwrap();
    let client = kube::Client::try_from(kube::Config::new(url)).unwrap();
    Arc::new(KubeAuth::new(KubeReviewer::new(client), config))
}

#[tokio::test]
async fn kube_reviewer_sends_the_reviews_the_api_expects() {
    let (api, seen) = fake_api_server().await;
    let addr = serve(app(kube_auth_for(api, AuthConfig::default()))).await;

    let reply = get_with(addr, "/metrics", "good-token").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reviews = seen.lock().unwrap().clone();
    assert_eq!(reviews.len(), 2, "{reviews:#?}");
    assert_eq!(reviews[0]["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(reviews[0]["kind"], "TokenReview");
    assert_eq!(reviews[0]["spec"], json!({"token": "good-token"}));
    assert_eq!(reviews[1]["apiVersion"], "authorization.k8s.io/v1");
    assert_eq!(reviews[1]["kind"], "SubjectAccessReview");
    assert_eq!(
        reviews[1]["spec"],
        json!({
            "user": "system:serviceaccount:mon:scraper",
            "uid": "uid-scraper",
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "extra": {"authentication.kubernetes.io/pod-name": ["prometheus-0"]},
            "nonResourceAttributes": {"path": "/metrics", "verb": "get"},
        })
    );

    assert_eq!(get_with(addr, "/metrics", "good-token").await.status, 200);
    assert_eq!(seen.lock().unwrap().len(), 2, "cached");

    let denied = get_with(addr, "/metrics", "denied-token").await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    let sar = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        sar["spec"],
        json!({
            "user": "system:serviceaccount:mon:nobody",
            "groups": ["system:authenticated"],
            "nonResourceAttributes": {"path": "/metrics", "verb": "get"},
        })
    );
    assert_401(
        &get_with(addr, "/metrics", "bad-token").await,
        "unauthenticated",
    );
    assert_401(
        &get_with(addr, "/metrics", "nouser-token").await,
        "no user name",
    );
}

#[tokio::test]
async fn kube_reviewer_refused_by_rbac_gives_503_with_the_missing_permission() {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:mon:agent\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
        "reason": "Forbidden",
        "details": {"group": "authentication.k8s.io", "kind": "tokenreviews"},
        "code": 403,
    });
    let api = serve(Router::new().fallback(move || {
        let status = status.clone();
        async move { json_reply(StatusCode::FORBIDDEN, &status) }
    }))
    .await;
    let addr = serve(app(kube_auth_for(api, AuthConfig::default()))).await;
    let reply = get_with(addr, "/metrics", "good-token").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply
            .body
            .contains("needs `create` on tokenreviews.authentication.k8s.io"),
        "{}",
        reply.body
    );
    assert!(
        !reply.body.contains("system:serviceaccount:mon:agent"),
        "{}",
        reply.body
    );
}

#[tokio::test]
async fn kube_reviewer_with_the_api_server_gone_gives_503() {
    // 127.0.0.2, which no other test binds: a port freed on 127.0.0.1 can be taken at once by
    // a server another test starts in parallel, and then the API server is not gone.
    let gone = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let api = gone.local_addr().unwrap();
    drop(gone);
    let addr = serve(app(kube_auth_for(api, AuthConfig::default()))).await;
    let reply = get_with(addr, "/metrics", "good-token").await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(reply.body.contains("unreachable"), "{}", reply.body);
    assert!(
        !reply.body.contains(&api.to_string()),
        "the API address stays in the log"
    );
}
