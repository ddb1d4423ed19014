//! The `BioMonitor` API (bioexporter.io/v1alpha1): the only contract users
//! see, so every field documents itself in the generated schema and the API
//! server rejects what it can before the operator ever sees it.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{ResourceRequirements, Toleration},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The agent's own enums (crate bio-agent-args, feature `crd`): a BioMonitor value is the
/// value the agent's flag takes, and a new variant reaches both or fails to build.
pub use bio_agent_args::{AttachMode, AuthMode, LogLevel};

/// Longest accepted BioMonitor name. Children are called `<name>-agent` and a
/// Service name is a DNS-1035 label (at most 63 characters).
pub const MAX_NAME_LEN: usize = 57;

/// Default port of the node-agent's /metrics endpoint: the agent's own default.
pub const DEFAULT_AGENT_PORT: i32 = bio_agent_args::DEFAULT_PORT as i32;

/// Runs the eBPF block-IO node-agent on a set of nodes and wires its metrics
/// into Prometheus (Service + ServiceMonitor).
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "bioexporter.io",
    version = "v1alpha1",
    kind = "BioMonitor",
    plural = "biomonitors",
    shortname = "biomon",
    category = "bioexporter",
    namespaced,
    status = "BioMonitorStatus",
    derive = "PartialEq",
    doc = "BioMonitor runs the bio-exporter eBPF block-IO node-agent on the selected nodes and exposes its metrics to Prometheus.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        description = "node-agents ready/desired",
        json_path = ".status.nodes"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    // Names flow into Service names (DNS-1035) and label values (<= 63
    // chars); rejecting them here beats a reconcile that can never succeed.
    validation = Rule::new(
        "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 57"
    )
    .message("metadata.name must be a DNS-1035 label of at most 57 characters (lowercase letters, digits, '-', starting with a letter)")
)]
#[serde(rename_all = "camelCase")]
pub struct BioMonitorSpec {
    /// Node labels an agent pod's node must carry (`kubernetes.io/os: linux` is always added).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Tolerations of the agent pods. The default tolerates every taint, like a
    /// node exporter: block devices on tainted nodes are worth watching too.
    #[serde(default = "default_tolerations")]
    pub tolerations: Vec<Toleration>,

    /// Which block devices the agent reports, by kernel name (e.g. `nvme0n1`, `dm-3`).
    /// Device filters are unanchored regexes searched for anywhere in the kernel name, like grep
    /// and node_exporter's `--collector.diskstats.device-exclude`: `^loop` matches loop0 and
    /// loop12 but not xloop0, and `loop1` matches loop1 and loop10; anchor both ends (`^loop1$`)
    /// to name exactly one device. Exclude wins over include.
    #[serde(default)]
    pub devices: DeviceFilter,

    /// How the agent attaches to the block layer. `auto` picks the best the kernel offers.
    #[serde(default)]
    pub attach: AttachMode,

    /// Label series with the PersistentVolume/PVC a device backs (needs the
    /// kubelet directory mounted and read access to PersistentVolumes).
    #[serde(default = "default_true")]
    pub persistent_volume_labels: bool,

    /// The node-agent container.
    #[serde(default)]
    pub agent: AgentSpec,

    /// The Prometheus Operator ServiceMonitor that scrapes the agents.
    #[serde(default)]
    pub service_monitor: ServiceMonitorSpec,

    /// Who may read the agents' /metrics, and over what: TLS and
    /// Kubernetes (TokenReview/SubjectAccessReview) authentication.
    #[serde(default)]
    pub metrics_endpoint: MetricsEndpointSpec,
}

impl Default for BioMonitorSpec {
    fn default() -> Self {
        Self {
            node_selector: BTreeMap::new(),
            tolerations: default_tolerations(),
            devices: DeviceFilter::default(),
            attach: AttachMode::default(),
            persistent_volume_labels: true,
            agent: AgentSpec::default(),
            service_monitor: ServiceMonitorSpec::default(),
            metrics_endpoint: MetricsEndpointSpec::default(),
        }
    }
}

/// The device filters of `spec.devices`, whose description states their semantics.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeviceFilter {
    /// Report only devices whose kernel name matches at least one of these regexes (Rust
    /// `regex` syntax, unanchored: see `devices`). Empty: all devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub include: Vec<String>,

    /// Never report devices whose kernel name matches any of these regexes (unanchored: see
    /// `devices`); wins over include.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 256)))]
    pub exclude: Vec<String>,
}

/// Same values as a container's `imagePullPolicy`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// The node-agent container.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.extraCapabilities) || self.extraCapabilities.all(c, !c.startsWith('CAP_'))",
    "message": "extraCapabilities are named without the CAP_ prefix, e.g. SYS_RESOURCE"
}]))]
pub struct AgentSpec {
    /// Agent image. Empty: the operator's default (its `--agent-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Image pull policy of the agent container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Resources of the agent container. Empty: small requests and a memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Port of /metrics, /healthz and /readyz inside the pod. Ports below 1024
    /// would need CAP_NET_BIND_SERVICE, which the agent does not get.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,

    /// Run the agent as a privileged container. Needed on kernels older than
    /// 5.8, which lack CAP_BPF and CAP_PERFMON.
    #[serde(default)]
    pub privileged: bool,

    /// Linux capabilities added to BPF and PERFMON, without the CAP_ prefix.
    /// Kernels 5.8-5.10 charge BPF maps to RLIMIT_MEMLOCK: add SYS_RESOURCE there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(pattern(r"^[A-Z][A-Z0-9_]*$"), length(max = 32))
    )]
    pub extra_capabilities: Vec<String>,

    /// PriorityClass of the agent pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// Log level of the agent.
    #[serde(default)]
    pub log_level: LogLevel,

    /// seccomp profile of the agent container. `RuntimeDefault`: the
    /// container runtime's default profile (containerd's allows bpf() and
    /// perf_event_open() with CAP_BPF and CAP_PERFMON). `Unconfined`: for
    /// runtimes whose default profile allows them only with CAP_SYS_ADMIN
    /// (older Docker, some CRI-O versions), where the agent exits with
    /// "loading programs (verifier): Operation not permitted (os error 1)".
    #[serde(default)]
    pub seccomp_profile: AgentSeccompProfile,
}

/// seccomp profile of the agent container (`securityContext.seccompProfile.type`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AgentSeccompProfile {
    /// The container runtime's default profile. containerd's allows bpf()
    /// and perf_event_open() to a container holding CAP_BPF and CAP_PERFMON.
    #[default]
    RuntimeDefault,
    /// No syscall filtering. For runtimes whose default profile allows bpf()
    /// and perf_event_open() only with CAP_SYS_ADMIN (older Docker, some
    /// CRI-O versions). Needs a namespace that admits privileged pods, which
    /// the agent's namespace has to be anyway.
    Unconfined,
}

impl AgentSeccompProfile {
    /// The value of a container's `securityContext.seccompProfile.type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RuntimeDefault => "RuntimeDefault",
            Self::Unconfined => "Unconfined",
        }
    }
}

impl Default for AgentSpec {
    fn default() -> Self {
        Self {
            image: None,
            image_pull_policy: None,
            resources: None,
            port: DEFAULT_AGENT_PORT,
            privileged: false,
            extra_capabilities: Vec::new(),
            priority_class_name: None,
            log_level: LogLevel::default(),
            seccomp_profile: AgentSeccompProfile::default(),
        }
    }
}

/// Prometheus Operator ServiceMonitor for the agents.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.interval) || !has(self.scrapeTimeout) || duration(self.scrapeTimeout) <= duration(self.interval)",
    "message": "scrapeTimeout must not be longer than interval"
}]))]
pub struct ServiceMonitorSpec {
    /// Create the ServiceMonitor. It needs the Prometheus Operator's CRDs.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Scrape interval, e.g. `30s` or `1m`. Empty: Prometheus' default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9]+(ms|s|m|h))+$"), length(max = 32))]
    pub interval: Option<String>,

    /// Scrape timeout, at most `interval`. Empty: Prometheus' default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^([0-9]+(ms|s|m|h))+$"), length(max = 32))]
    pub scrape_timeout: Option<String>,

    /// Extra labels on the ServiceMonitor, e.g. what your Prometheus'
    /// `serviceMonitorSelector` matches (`release: prometheus`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Default for ServiceMonitorSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: None,
            scrape_timeout: None,
            labels: BTreeMap::new(),
        }
    }
}

/// How the agents' /metrics endpoint is protected. The default is plain
/// HTTP open to anyone who can reach the pod, as before this field existed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        // A bearer token is a credential for the whole API server (for the
        // default, Prometheus' own ServiceAccount token): never in clear text.
        "rule": "!has(self.auth) || self.auth != 'kubernetes' || (has(self.tls) && has(self.tls.enabled) && self.tls.enabled)",
        "message": "auth: kubernetes needs tls.enabled: true (Prometheus would send its bearer token in clear text)"
    },
    {
        "rule": "!has(self.bearerTokenSecret) || (has(self.auth) && self.auth == 'kubernetes')",
        "message": "bearerTokenSecret is only used with auth: kubernetes"
    }
]))]
pub struct MetricsEndpointSpec {
    /// Serve /metrics, /healthz and /readyz over TLS.
    #[serde(default)]
    pub tls: TlsSpec,

    /// Who may read /metrics. `kubernetes`: a bearer token the API server
    /// authenticates (TokenReview) and authorizes for `get` on the
    /// non-resource URL /metrics (SubjectAccessReview). Needs TLS.
    #[serde(default)]
    pub auth: AuthMode,

    /// Secret (in this BioMonitor's namespace) holding the bearer token the
    /// ServiceMonitor makes Prometheus send. Empty: Prometheus' own
    /// ServiceAccount token (`bearerTokenFile`), whose identity then needs the
    /// chart's metrics-reader ClusterRole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_secret: Option<SecretKeyRef>,
}

impl MetricsEndpointSpec {
    pub fn auth_enabled(&self) -> bool {
        self.auth == AuthMode::Kubernetes
    }
}

/// TLS for the agents' endpoints.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.issuerRef) || (has(self.enabled) && self.enabled)",
    "message": "tls.issuerRef needs tls.enabled: true"
}]))]
pub struct TlsSpec {
    /// Serve over TLS. The certificate comes from the operator's own CA,
    /// or from cert-manager when `issuerRef` is set.
    #[serde(default)]
    pub enabled: bool,

    /// A cert-manager Issuer or ClusterIssuer to issue the serving
    /// certificate. It must put the CA into the Secret's `ca.crt` (the CA,
    /// self-signed and Vault issuers do): Prometheus verifies with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

/// Reference to a cert-manager issuer, as in a cert-manager Certificate.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// Name of the issuer.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// `Issuer` (in this BioMonitor's namespace), `ClusterIssuer`, or the
    /// kind of an external issuer.
    #[serde(default = "default_issuer_kind")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: String,

    /// API group of the issuer.
    #[serde(default = "default_issuer_group")]
    #[schemars(length(min = 1, max = 253))]
    pub group: String,
}

/// A key of a Secret in the BioMonitor's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,

    /// Key in the Secret whose value is the token.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Observed state, written only by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BioMonitorStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `DaemonSetReady`, `ServiceMonitorReady`, `TLSReady` and
    /// `AgentsHealthy` (why agents fail, in their own words).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Nodes that should run an agent (DaemonSet desiredNumberScheduled).
    #[serde(default)]
    pub desired_nodes: i32,

    /// Nodes whose agent is ready (DaemonSet numberReady).
    #[serde(default)]
    pub ready_nodes: i32,

    /// `readyNodes/desiredNodes`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<String>,
}

impl BioMonitorStatus {
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

pub fn default_tolerations() -> Vec<Toleration> {
    vec![Toleration {
        operator: Some("Exists".into()),
        ..Toleration::default()
    }]
}

fn default_true() -> bool {
    true
}

fn default_issuer_kind() -> String {
    "Issuer".into()
}

fn default_issuer_group() -> String {
    "cert-manager.io".into()
}

fn default_port() -> i32 {
    DEFAULT_AGENT_PORT
}

/// File name of the generated CRD, in `crds/` and in the chart's `crds/`.
pub const CRD_FILE_NAME: &str = "biomonitors.bioexporter.io.yaml";

/// The CRD as the operator applies it at start-up.
pub fn crd() -> CustomResourceDefinition {
    BioMonitor::crd()
}

/// The CRD as committed under `crds/`: a header plus YAML.
pub fn crd_yaml() -> String {
    let body = serde_yaml_ng::to_string(&crd()).expect("a CRD always serializes to YAML");
    format!(
        "# Generated from operator/src/crd.rs by `cargo run -p bio-operator --bin crdgen -- --update`.\n\
         # Do not edit by hand: edit the Rust types and regenerate.\n\
         {body}"
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn repo_file(rel: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(rel);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    const REGENERATE: &str = "regenerate with `cargo run -p bio-operator --bin crdgen -- --update`";

    #[test]
    fn committed_crd_is_fresh() {
        assert!(
            repo_file(&format!("crds/{CRD_FILE_NAME}")) == crd_yaml(),
            "crds/{CRD_FILE_NAME} is stale: {REGENERATE}"
        );
    }

    #[test]
    fn chart_ships_the_same_crd() {
        assert!(
            repo_file(&format!("charts/bio-exporter/crds/{CRD_FILE_NAME}"))
                == repo_file(&format!("crds/{CRD_FILE_NAME}")),
            "charts/bio-exporter/crds/{CRD_FILE_NAME} differs from crds/: {REGENERATE}"
        );
    }

    #[test]
    fn names_and_columns_are_the_documented_contract() {
        let crd = crd();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("biomonitors.bioexporter.io")
        );
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, "BioMonitor");
        assert_eq!(crd.spec.names.plural, "biomonitors");
        assert_eq!(crd.spec.names.short_names, Some(vec!["biomon".to_string()]));
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Ready", "Nodes", "Age"]);
    }

    #[test]
    fn omitted_fields_take_documented_defaults() {
        let bm: BioMonitor = serde_json::from_value(serde_json::json!({
            "apiVersion": "bioexporter.io/v1alpha1",
            "kind": "BioMonitor",
            "metadata": {"name": "disks", "namespace": "monitoring"},
            "spec": {}
        }))
        .unwrap();
        assert_eq!(bm.spec, BioMonitorSpec::default());
        assert_eq!(bm.spec.tolerations, default_tolerations());
        assert_eq!(bm.spec.attach, AttachMode::Auto);
        assert!(bm.spec.persistent_volume_labels);
        assert_eq!(bm.spec.agent.port, 9435);
        assert!(!bm.spec.agent.privileged);
        assert_eq!(
            bm.spec.agent.seccomp_profile,
            AgentSeccompProfile::RuntimeDefault
        );
        assert!(bm.spec.service_monitor.enabled);
    }

    #[test]
    fn schema_defaults_match_serde_defaults() {
        // The API server fills defaults from the schema, the operator from
        // serde: both must agree or objects would change meaning on read.
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"];
        assert_eq!(spec["attach"]["default"], "auto");
        assert_eq!(spec["persistentVolumeLabels"]["default"], true);
        assert_eq!(
            spec["tolerations"]["default"],
            serde_json::json!([{"operator": "Exists"}])
        );
        assert_eq!(spec["agent"]["properties"]["port"]["default"], 9435);
        assert_eq!(spec["agent"]["properties"]["port"]["minimum"], 1024.0);
        assert_eq!(spec["agent"]["properties"]["port"]["maximum"], 65535.0);
        let seccomp = &spec["agent"]["properties"]["seccompProfile"];
        assert_eq!(seccomp["default"], "RuntimeDefault");
        assert_eq!(
            seccomp["enum"],
            serde_json::json!(["RuntimeDefault", "Unconfined"])
        );
        assert_eq!(
            spec["serviceMonitor"]["properties"]["enabled"]["default"],
            true
        );
    }

    /// Issue #11 item 2: the device-filter semantics in one wording, which the agent's --help,
    /// this CRD, the README and docs/operator.md all carry.
    const DEVICE_FILTER_SEMANTICS: &str = "Device filters are unanchored regexes searched for \
        anywhere in the kernel name, like grep and node_exporter's \
        `--collector.diskstats.device-exclude`: `^loop` matches loop0 and loop12 but not xloop0, \
        and `loop1` matches loop1 and loop10; anchor both ends (`^loop1$`) to name exactly one \
        device. Exclude wins over include.";

    fn words(s: &str) -> String {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn device_filter_semantics_are_stated_identically_and_their_examples_hold() {
        use clap::CommandFactory;
        let crd = serde_json::to_value(crd()).unwrap();
        let devices = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["devices"]["description"]
            .as_str()
            .unwrap()
            .to_string();
        let help = bio_agent_args::Cli::command()
            .get_arguments()
            .find(|a| a.get_long() == Some(bio_agent_args::flag::DEVICE_INCLUDE))
            .and_then(|a| a.get_long_help())
            .map(ToString::to_string)
            .unwrap();
        let want = words(DEVICE_FILTER_SEMANTICS);
        for (place, text) in [
            ("the CRD's spec.devices", devices),
            ("the agent's --device-include --help", help),
            ("README.md", repo_file("README.md")),
            ("docs/operator.md", repo_file("docs/operator.md")),
        ] {
            assert!(
                words(&text).contains(&want),
                "{place} does not state: {DEVICE_FILTER_SEMANTICS}"
            );
        }

        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let filter = |include: &[&str], exclude: &[&str]| {
            bio_device_filter::DeviceFilter::new(&owned(include), &owned(exclude)).unwrap()
        };
        let exclude_loop = filter(&[], &["^loop"]);
        assert!(!exclude_loop.allows("loop0") && !exclude_loop.allows("loop12"));
        assert!(exclude_loop.allows("xloop0"));
        let loop1 = filter(&["loop1"], &[]);
        assert!(loop1.allows("loop1") && loop1.allows("loop10"));
        let exact = filter(&["^loop1$"], &[]);
        assert!(exact.allows("loop1") && !exact.allows("loop10"));
        assert!(!filter(&["^loop"], &["^loop"]).allows("loop0"));
        // docs/operator.md's examples.
        let example = filter(&[], &["^loop", "^ram"]);
        assert!(!example.allows("loop3") && !example.allows("ram0"));
        assert!(example.allows("zram0") && example.allows("nvme0n1"));
        let two = filter(&["^(sda|nvme0n1)$"], &[]);
        assert!(two.allows("sda") && two.allows("nvme0n1") && !two.allows("nvme0n10"));
        // node_exporter's default exclude pattern, pasted as is (README, docs/operator.md).
        let node_exporter = filter(
            &[],
            &[r"^(z?ram|loop|fd|(h|s|v|xv)d[a-z]|nvme\d+n\d+p)\d+$"],
        );
        for gone in ["ram0", "zram0", "loop7", "fd0"] {
            assert!(!node_exporter.allows(gone), "{gone}");
        }
        for kept in ["sda", "vda", "xvda", "nvme0n1", "dm-0", "md0"] {
            assert!(node_exporter.allows(kept), "{kept}");
        }
    }
}
