//! The bio-operator process: CLI, logging, the HTTP endpoints, leader
//! election, CRD installation and the controller.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use bio_operator::{
    controller, http, install,
    leader::{unique_identity, Fence, LeaderElector, LeaseConfig},
    metrics::Metrics,
    names,
    resources::tls::Lifetimes,
    settings::{
        parse_duration, Settings, DEFAULT_AGENT_AUTH_CLUSTER_ROLE, DEFAULT_AGENT_CHECK_INTERVAL,
        DEFAULT_AGENT_CLUSTER_ROLE, DEFAULT_AGENT_IMAGE, DEFAULT_CA_VALIDITY,
        DEFAULT_CLUSTER_DOMAIN, DEFAULT_CRD_RETRY_INTERVAL, DEFAULT_RESYNC_INTERVAL,
        DEFAULT_SERVING_CERT_VALIDITY,
    },
    telemetry, Error, Result,
};
use clap::{ArgAction, Parser, ValueEnum};
use kube::{runtime::events::Reporter, Client};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Kubernetes operator for bio-exporter: reconciles BioMonitor objects
/// (bioexporter.io/v1alpha1) into node-agent DaemonSets, Services,
/// ServiceMonitors and RBAC.
///
/// Connects with the in-cluster service account, or with $KUBECONFIG /
/// ~/.kube/config outside a cluster.
#[derive(Parser, Debug)]
#[command(name = "bio-operator", version, about, long_about)]
struct Args {
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "BIO_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,

    /// Run the controller only while holding a coordination.k8s.io Lease,
    /// so several replicas can run safely. Disable only for a single replica
    /// or local development.
    #[arg(long, env = "BIO_OPERATOR_LEADER_ELECT", default_value_t = true, action = ArgAction::Set)]
    leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "BIO_OPERATOR_LEASE_NAME", default_value = "bio-operator")]
    lease_name: String,

    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,

    /// How long followers wait after the last renewal before taking over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,

    /// How long the leader keeps reconciling without a successful renewal;
    /// must be shorter than --lease-duration.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    renew_deadline: Duration,

    /// Pause between attempts to acquire or renew the lease.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    retry_period: Duration,

    /// Identity in the Lease; a random suffix is added. Defaults to the pod name.
    #[arg(long, env = "POD_NAME")]
    leader_identity: Option<String>,

    /// Server-side apply the BioMonitor CRD on start-up (the upgrade path,
    /// since Helm never upgrades CRDs). Needs RBAC on that CRD.
    #[arg(long, env = "BIO_OPERATOR_MANAGE_CRD", default_value_t = true, action = ArgAction::Set)]
    manage_crd: bool,

    /// Agent image for BioMonitors that do not set spec.agent.image.
    #[arg(long, env = "BIO_OPERATOR_AGENT_IMAGE", default_value = DEFAULT_AGENT_IMAGE)]
    agent_image: String,

    /// ClusterRole (installed by the chart) that agent ServiceAccounts are bound to.
    #[arg(
        long,
        env = "BIO_OPERATOR_AGENT_CLUSTER_ROLE",
        default_value = DEFAULT_AGENT_CLUSTER_ROLE
    )]
    agent_cluster_role: String,

    /// ClusterRole (installed by the chart) allowing TokenReviews and
    /// SubjectAccessReviews; bound only to agents with `auth: kubernetes`.
    #[arg(
        long,
        env = "BIO_OPERATOR_AGENT_AUTH_CLUSTER_ROLE",
        default_value = DEFAULT_AGENT_AUTH_CLUSTER_ROLE
    )]
    agent_auth_cluster_role: String,

    /// DNS domain of the cluster, for the names in agent serving certificates.
    #[arg(
        long,
        env = "BIO_OPERATOR_CLUSTER_DOMAIN",
        default_value = DEFAULT_CLUSTER_DOMAIN
    )]
    cluster_domain: String,

    /// Lifetime of the serving certificates the operator issues; renewed at 2/3 of it.
    #[arg(long, default_value = DEFAULT_SERVING_CERT_VALIDITY, value_parser = parse_duration)]
    serving_cert_validity: Duration,

    /// Lifetime of the per-BioMonitor CA the operator creates; replaced at
    /// 4/5 of it (the old one stays trusted until it expires).
    #[arg(long, default_value = DEFAULT_CA_VALIDITY, value_parser = parse_duration)]
    ca_validity: Duration,

    /// Periodic full re-reconcile of every BioMonitor.
    #[arg(long, default_value = DEFAULT_RESYNC_INTERVAL, value_parser = parse_duration)]
    resync_interval: Duration,

    /// Retry period while the ServiceMonitor CRD is not installed.
    #[arg(long, default_value = DEFAULT_CRD_RETRY_INTERVAL, value_parser = parse_duration)]
    crd_retry_interval: Duration,

    /// While a BioMonitor's DaemonSet is not ready, how often (at most) its
    /// agent pods are listed to report failing agents in its status.
    #[arg(long, default_value = DEFAULT_AGENT_CHECK_INTERVAL, value_parser = parse_duration)]
    agent_check_interval: Duration,

    /// Log filter, RUST_LOG syntax (e.g. `info` or `bio_operator=debug,kube=info`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,

    /// Log output format.
    #[arg(
        long,
        env = "BIO_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
}

/// The operator's settings from its command line.
fn settings(args: &Args) -> Settings {
    Settings {
        agent_image: args.agent_image.clone(),
        agent_cluster_role: args.agent_cluster_role.clone(),
        resync_interval: args.resync_interval,
        crd_missing_retry: args.crd_retry_interval,
        agent_check_interval: args.agent_check_interval,
        agent_auth_cluster_role: args.agent_auth_cluster_role.clone(),
        cluster_domain: args.cluster_domain.clone(),
        cert_lifetimes: Lifetimes {
            ca: args.ca_validity,
            serving: args.serving_cert_validity,
        },
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    telemetry::init(&args.log_level, matches!(args.log_format, LogFormat::Json));
    if let Err(err) = run(args).await {
        tracing::error!(error = %err, "bio-operator stopped");
        std::process::exit(1);
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(args: Args) -> Result<()> {
    let settings = settings(&args);
    if settings.cert_lifetimes.serving > settings.cert_lifetimes.ca {
        return Err(Error::Config(
            "--serving-cert-validity must not be longer than --ca-validity".into(),
        ));
    }
    let base_identity = args
        .leader_identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "bio-operator".into());
    let lease = if args.leader_elect {
        let cfg = LeaseConfig {
            name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone().ok_or_else(|| {
                Error::Config(
                    "--lease-namespace (or POD_NAMESPACE) is required with --leader-elect".into(),
                )
            })?,
            identity: unique_identity(&base_identity),
            lease_duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        };
        cfg.validate()?;
        Some(cfg)
    } else {
        None
    };

    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let http_state = http::HttpState {
        registry: Arc::new(registry),
        ready: ready.clone(),
    };
    let addr = args.metrics_addr;
    let listener = tokio::spawn(async move {
        if let Err(err) = http::serve(addr, http_state).await {
            tracing::error!(error = %err, %addr, "HTTP server failed");
            std::process::exit(1);
        }
    });

    let client = Client::try_default().await?;
    let version = client.apiserver_version().await?;
    tracing::info!(
        apiserver = %format!("{}.{}", version.major, version.minor),
        agent_image = %settings.agent_image,
        "connected to the API server"
    );
    ready.store(true, std::sync::atomic::Ordering::Relaxed);

    let reporter = Reporter {
        controller: names::FIELD_MANAGER.into(),
        instance: Some(base_identity),
    };
    let work = {
        let client = client.clone();
        let metrics = metrics.clone();
        let manage_crd = args.manage_crd;
        move |fence: Fence| {
            let client = client.clone();
            let settings = settings.clone();
            let metrics = metrics.clone();
            let reporter = reporter.clone();
            async move {
                if manage_crd {
                    fence.check()?;
                    install::apply_crd(client.clone(), Duration::from_secs(60)).await?;
                }
                controller::run(client, settings, metrics, reporter, fence).await
            }
        }
    };

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let result = match lease {
        None => {
            metrics.leader.set(1);
            tokio::select! {
                res = work(Fence::open()) => res,
                _ = &mut shutdown => Ok(()),
            }
        }
        Some(cfg) => {
            let mut elector = LeaderElector::new(client.clone(), cfg);
            tracing::info!(identity = %elector.identity(), "leader election enabled");
            // Lost leadership sends the replica back to standing by (with
            // fresh caches next time); only a signal or a fatal error ends it.
            elector
                .lead(work, &mut shutdown, |leading| {
                    metrics.leader.set(i64::from(leading));
                })
                .await
        }
    };
    listener.abort();
    result
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn command_line_defaults_are_the_settings_defaults() {
        let args = Args::try_parse_from(["bio-operator"]).unwrap();
        assert_eq!(settings(&args), Settings::default());
    }

    #[test]
    fn a_bad_duration_names_the_flag() {
        let err = Args::try_parse_from(["bio-operator", "--resync-interval", "soon"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--resync-interval") && msg.contains("\"soon\""),
            "{msg}"
        );
    }

    #[test]
    fn boolean_flags_can_be_turned_off() {
        let args =
            Args::try_parse_from(["bio-operator", "--leader-elect=false", "--manage-crd=false"])
                .unwrap();
        assert!(!args.leader_elect);
        assert!(!args.manage_crd);
        assert_eq!(args.metrics_addr.port(), 8080);
    }
}
