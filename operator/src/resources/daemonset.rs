//! The node-agent DaemonSet: one agent per selected node.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use bio_agent_args::{flag, BpfArgs, DeviceArgs, ServeArgs, VolumeArgs};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet},
        core::v1::{
            Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
            HostPathVolumeSource, ObjectFieldSelector, PodSpec, PodTemplateSpec, Probe,
            ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
            VolumeMount,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use super::child_meta;
use crate::{
    crd::{AgentSpec, BioMonitor, BioMonitorSpec},
    names,
    settings::Settings,
    Result,
};

/// Where the agent finds the kubelet's volume directories (host and container path): the
/// agent's default.
pub const KUBELET_ROOT: &str = bio_agent_args::DEFAULT_KUBELET_ROOT;
/// The container's variable holding its node's name (from the downward API).
const NODE_NAME_ENV: &str = "NODE_NAME";
/// tracefs; classic tracepoint ids are read from here.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Where the serving certificate Secret is mounted. The kubelet updates a
/// Secret volume by swapping a symlink; the agent follows it and reloads.
pub const TLS_DIR: &str = "/etc/bio-exporter/tls";

/// The node label every agent node must have: the agent is a Linux binary.
const OS_LABEL: (&str, &str) = ("kubernetes.io/os", "linux");

pub fn daemonset(bm: &BioMonitor, settings: &Settings) -> Result<DaemonSet> {
    let spec = &bm.spec;
    let selector = names::selector_labels(bm);
    let (volumes, volume_mounts) = volumes(bm);
    let probe_scheme = if spec.metrics_endpoint.tls.enabled {
        "HTTPS"
    } else {
        "HTTP"
    };

    let container = Container {
        name: names::AGENT_CONTAINER.into(),
        image: Some(
            spec.agent
                .image
                .clone()
                .unwrap_or_else(|| settings.agent_image.clone()),
        ),
        image_pull_policy: spec.agent.image_pull_policy.map(|p| p.as_str().into()),
        args: Some(agent_args(spec)),
        env: Some(vec![EnvVar {
            name: NODE_NAME_ENV.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "spec.nodeName".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some(names::METRICS_PORT_NAME.into()),
            container_port: spec.agent.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        // Ready only once BPF programs are attached, so a rollout stops on a
        // node where attaching fails instead of replacing every agent.
        // The kubelet does not verify certificates of HTTPS probes, and
        // /readyz and /healthz need no token.
        readiness_probe: Some(http_probe("/readyz", probe_scheme, 5, 10)),
        liveness_probe: Some(http_probe("/healthz", probe_scheme, 10, 20)),
        resources: Some(resources(&spec.agent)),
        security_context: Some(security_context(&spec.agent)),
        volume_mounts: (!volume_mounts.is_empty()).then_some(volume_mounts),
        // A BPF load failure is usually the last thing the agent logs.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Container::default()
    };

    let mut pod_labels = names::common_labels(bm);
    pod_labels.extend(selector.clone());

    Ok(DaemonSet {
        metadata: child_meta(bm, names::child_name(bm))?,
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    // A surge pod would attach a second copy of the BPF
                    // programs on the node and export every series twice.
                    max_surge: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(names::child_name(bm)),
                    // The token is only used to look up PersistentVolumes
                    // and to send TokenReviews/SubjectAccessReviews.
                    automount_service_account_token: Some(
                        spec.persistent_volume_labels || spec.metrics_endpoint.auth_enabled(),
                    ),
                    // Service links add env vars for every Service in the
                    // namespace; the agent reads none of them.
                    enable_service_links: Some(false),
                    containers: vec![container],
                    node_selector: Some(effective_node_selector(spec)),
                    tolerations: Some(spec.tolerations.clone()),
                    priority_class_name: spec.agent.priority_class_name.clone(),
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DaemonSetSpec::default()
        },
        status: None,
    })
}

/// The node selector the pods get; the conflict rule evaluates the same one.
pub fn effective_node_selector(spec: &BioMonitorSpec) -> BTreeMap<String, String> {
    let mut selector = BTreeMap::from([(OS_LABEL.0.to_string(), OS_LABEL.1.to_string())]);
    selector.extend(spec.node_selector.clone());
    selector
}

/// The node-agent's settings for a BioMonitor; the agent's own defaults for the rest.
pub fn agent_settings(spec: &BioMonitorSpec) -> ServeArgs {
    // The schema bounds the port to 1024..=65535; were it bypassed, the API server refuses the
    // same number as the containerPort, so this fallback never reaches a pod.
    let port = u16::try_from(spec.agent.port).unwrap_or(0);
    let tls_file = |key: &str| {
        spec.metrics_endpoint
            .tls
            .enabled
            .then(|| Path::new(TLS_DIR).join(key))
    };
    ServeArgs {
        listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        node_name: Some(format!("$({NODE_NAME_ENV})")),
        devices: DeviceArgs {
            include: spec.devices.include.clone(),
            exclude: spec.devices.exclude.clone(),
        },
        bpf: BpfArgs {
            attach: spec.attach,
        },
        volumes: VolumeArgs {
            pv_labels: spec.persistent_volume_labels,
            kubelet_root: KUBELET_ROOT.into(),
            host_kubelet_root: None,
        },
        tls_cert_file: tls_file(super::tls::TLS_CERT_KEY),
        tls_key_file: tls_file(super::tls::TLS_KEY_KEY),
        auth: spec.metrics_endpoint.auth,
        log_level: spec.agent.log_level.as_str().into(),
        ..ServeArgs::default()
    }
}

/// The container's args: [`agent_settings`] as the agent's command line. The kubelet expands
/// `$(VAR)` in args and turns `$$` into `$`, so every `$` is doubled (a regex such as
/// `^sd[a-z]$` arrives unchanged), except in the node name, the one value it is meant to
/// expand.
pub fn agent_args(spec: &BioMonitorSpec) -> Vec<String> {
    agent_settings(spec)
        .flags()
        .into_iter()
        .map(|mut arg| {
            if arg.flag != flag::NODE_NAME {
                arg.value = arg.value.map(|v| v.replace('$', "$$"));
            }
            arg.to_string()
        })
        .collect()
}

/// Least privilege that still loads and attaches BPF programs.
pub fn security_context(agent: &AgentSpec) -> SecurityContext {
    // seccomp: containerd's default profile allows bpf() and
    // perf_event_open() to a container holding CAP_BPF/CAP_PERFMON. Runtimes
    // whose profile allows them only with CAP_SYS_ADMIN (older Docker, some
    // CRI-O versions) fail them with EPERM: those need the Unconfined opt-in.
    let seccomp = Some(SeccompProfile {
        type_: agent.seccomp_profile.as_str().into(),
        ..SeccompProfile::default()
    });
    // Capabilities only take effect for uid 0 in the container (no ambient
    // capabilities for other users), so the agent runs as root, without the
    // ability to gain more.
    if agent.privileged {
        // Opt-in for kernels < 5.8, where CAP_BPF/CAP_PERFMON do not exist and
        // only CAP_SYS_ADMIN (i.e. effectively privileged) can load programs.
        // allowPrivilegeEscalation must stay unset: the API rejects false
        // together with privileged.
        return SecurityContext {
            privileged: Some(true),
            read_only_root_filesystem: Some(true),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            seccomp_profile: seccomp,
            ..SecurityContext::default()
        };
    }
    let mut add = vec!["BPF".to_string(), "PERFMON".to_string()];
    for cap in &agent.extra_capabilities {
        if !add.contains(cap) {
            add.push(cap.clone());
        }
    }
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_user: Some(0),
        run_as_non_root: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: Some(add),
        }),
        seccomp_profile: seccomp,
        ..SecurityContext::default()
    }
}

/// Host paths the agent needs, and nothing else: /sys (BTF, the block
/// devices) is already readable in the container. Plus the serving
/// certificate with TLS.
pub fn volumes(bm: &BioMonitor) -> (Vec<Volume>, Vec<VolumeMount>) {
    let spec = &bm.spec;
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    if spec.attach.needs_tracefs() {
        volumes.push(host_path_volume("tracefs", TRACEFS));
        mounts.push(VolumeMount {
            name: "tracefs".into(),
            mount_path: TRACEFS.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    if spec.persistent_volume_labels {
        volumes.push(host_path_volume("kubelet", KUBELET_ROOT));
        mounts.push(VolumeMount {
            name: "kubelet".into(),
            mount_path: KUBELET_ROOT.into(),
            read_only: Some(true),
            // Volumes mounted after the agent started must show up too, or
            // new PVs would never get their labels.
            mount_propagation: Some("HostToContainer".into()),
            ..VolumeMount::default()
        });
    }
    if spec.metrics_endpoint.tls.enabled {
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names::tls_secret_name(bm)),
                // Readable by the agent (uid 0) only.
                default_mode: Some(0o400),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

fn host_path_volume(name: &str, path: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some("Directory".into()),
        }),
        ..Volume::default()
    }
}

fn http_probe(path: &str, scheme: &str, initial_delay: i32, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(names::METRICS_PORT_NAME.into()),
            scheme: Some(scheme.into()),
            ..HTTPGetAction::default()
        }),
        initial_delay_seconds: Some(initial_delay),
        period_seconds: Some(period),
        timeout_seconds: Some(5),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The user's resources, or defaults sized for a few dozen devices: BPF map
/// memory is charged to the pod's cgroup on kernels >= 5.11, so the limit
/// leaves headroom above the agent's own heap.
fn resources(agent: &AgentSpec) -> ResourceRequirements {
    agent
        .resources
        .clone()
        .unwrap_or_else(|| ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("32Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("256Mi".into()),
            )])),
            ..ResourceRequirements::default()
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Toleration;

    use super::*;
    use crate::{
        crd::{
            AgentSeccompProfile, AttachMode, AuthMode, BioMonitorSpec, DeviceFilter, LogLevel,
            PullPolicy,
        },
        resources::test_support::{kubelet_expand, monitor},
    };

    fn build(spec: BioMonitorSpec) -> DaemonSet {
        daemonset(&monitor("disks", spec), &Settings::default()).unwrap()
    }

    fn pod_spec(ds: &DaemonSet) -> &PodSpec {
        ds.spec.template.spec.as_ref().unwrap()
    }

    fn container(ds: &DaemonSet) -> &Container {
        &pod_spec(ds).containers[0]
    }

    fn mount_paths(ds: &DaemonSet) -> Vec<&str> {
        container(ds)
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect()
    }

    #[test]
    fn default_security_context_is_unprivileged_with_bpf_and_perfmon() {
        let sc = container(&build(BioMonitorSpec::default()))
            .security_context
            .clone()
            .unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_user, Some(0));
        let caps = sc.capabilities.unwrap();
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(
            caps.add,
            Some(vec!["BPF".to_string(), "PERFMON".to_string()])
        );
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn seccomp_profile_follows_the_spec_privileged_or_not() {
        for privileged in [false, true] {
            for (profile, wanted) in [
                (AgentSeccompProfile::RuntimeDefault, "RuntimeDefault"),
                (AgentSeccompProfile::Unconfined, "Unconfined"),
            ] {
                let mut spec = BioMonitorSpec::default();
                spec.agent.privileged = privileged;
                spec.agent.seccomp_profile = profile;
                let seccomp = container(&build(spec))
                    .security_context
                    .clone()
                    .unwrap()
                    .seccomp_profile
                    .unwrap();
                assert_eq!(seccomp.type_, wanted, "privileged: {privileged}");
                assert_eq!(seccomp.localhost_profile, None);
            }
        }
    }

    #[test]
    fn failing_agents_leave_their_log_tail_in_the_termination_message() {
        let c = container(&build(BioMonitorSpec::default())).clone();
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(c.name, names::AGENT_CONTAINER);
    }

    #[test]
    fn extra_capabilities_are_added_once() {
        let mut spec = BioMonitorSpec::default();
        spec.agent.extra_capabilities = vec!["SYS_RESOURCE".into(), "BPF".into()];
        let caps = container(&build(spec))
            .security_context
            .clone()
            .unwrap()
            .capabilities
            .unwrap();
        assert_eq!(
            caps.add.unwrap(),
            vec!["BPF".to_string(), "PERFMON".into(), "SYS_RESOURCE".into()]
        );
    }

    #[test]
    fn privileged_opt_in_does_not_forbid_escalation() {
        let mut spec = BioMonitorSpec::default();
        spec.agent.privileged = true;
        let sc = container(&build(spec)).security_context.clone().unwrap();
        assert_eq!(sc.privileged, Some(true));
        // The API server rejects privileged with allowPrivilegeEscalation=false.
        assert_eq!(sc.allow_privilege_escalation, None);
        assert_eq!(sc.read_only_root_filesystem, Some(true));
    }

    #[test]
    fn tracefs_is_mounted_only_for_modes_that_can_use_classic_tracepoints() {
        for (mode, wanted) in [
            (AttachMode::Auto, true),
            (AttachMode::Tracepoint, true),
            (AttachMode::TpBtf, false),
            (AttachMode::RawTp, false),
            (AttachMode::Kprobe, false),
        ] {
            let spec = BioMonitorSpec {
                attach: mode,
                persistent_volume_labels: false,
                ..BioMonitorSpec::default()
            };
            let ds = build(spec);
            assert_eq!(mount_paths(&ds).contains(&TRACEFS), wanted, "{mode:?}");
            if wanted {
                let m = &container(&ds).volume_mounts.as_ref().unwrap()[0];
                assert_eq!(m.read_only, Some(true));
            }
        }
    }

    #[test]
    fn kubelet_dir_is_mounted_read_only_with_propagation_only_for_pv_labels() {
        let ds = build(BioMonitorSpec {
            attach: AttachMode::TpBtf,
            ..BioMonitorSpec::default()
        });
        let mounts = container(&ds).volume_mounts.clone().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_path, KUBELET_ROOT);
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(
            mounts[0].mount_propagation.as_deref(),
            Some("HostToContainer")
        );
        let vol = &pod_spec(&ds).volumes.as_ref().unwrap()[0];
        assert_eq!(vol.host_path.as_ref().unwrap().path, KUBELET_ROOT);
        assert_eq!(pod_spec(&ds).automount_service_account_token, Some(true));

        let ds = build(BioMonitorSpec {
            attach: AttachMode::TpBtf,
            persistent_volume_labels: false,
            ..BioMonitorSpec::default()
        });
        assert!(container(&ds).volume_mounts.is_none());
        assert!(pod_spec(&ds).volumes.is_none());
        assert_eq!(pod_spec(&ds).automount_service_account_token, Some(false));
    }

    #[test]
    fn tls_and_auth_mount_the_serving_secret_and_pass_the_flags() {
        let mut spec = BioMonitorSpec {
            attach: AttachMode::TpBtf,
            persistent_volume_labels: false,
            ..BioMonitorSpec::default()
        };
        spec.metrics_endpoint.tls.enabled = true;
        spec.metrics_endpoint.auth = AuthMode::Kubernetes;
        let ds = build(spec.clone());
        let args = container(&ds).args.clone().unwrap();
        assert!(args.ends_with(&[
            "--tls-cert-file=/etc/bio-exporter/tls/tls.crt".to_string(),
            "--tls-key-file=/etc/bio-exporter/tls/tls.key".to_string(),
            "--auth=kubernetes".to_string(),
        ]));
        let vol = &pod_spec(&ds).volumes.as_ref().unwrap()[0];
        let secret = vol.secret.as_ref().unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("disks-agent-tls"));
        assert_eq!(secret.default_mode, Some(0o400));
        assert_eq!(mount_paths(&ds), [TLS_DIR]);
        // Auth needs the token even without PV labels.
        assert_eq!(pod_spec(&ds).automount_service_account_token, Some(true));
        for probe in [
            &container(&ds).readiness_probe,
            &container(&ds).liveness_probe,
        ] {
            let get = probe.clone().unwrap().http_get.unwrap();
            assert_eq!(get.scheme.as_deref(), Some("HTTPS"));
        }

        // cert-manager's Secret instead of the operator's.
        spec.metrics_endpoint.tls.issuer_ref = Some(crate::crd::IssuerRef {
            name: "ca".into(),
            kind: "Issuer".into(),
            group: "cert-manager.io".into(),
        });
        let ds = build(spec);
        let vol = &pod_spec(&ds).volumes.as_ref().unwrap()[0];
        assert_eq!(
            vol.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("disks-agent-cert-manager-tls")
        );
    }

    #[test]
    fn plain_http_probes_and_no_tls_flags_by_default() {
        let ds = build(BioMonitorSpec::default());
        let args = container(&ds).args.clone().unwrap();
        assert!(!args
            .iter()
            .any(|a| a.starts_with("--tls") || a.starts_with("--auth")));
        let get = container(&ds)
            .readiness_probe
            .clone()
            .unwrap()
            .http_get
            .unwrap();
        assert_eq!(get.scheme.as_deref(), Some("HTTP"));
    }

    #[test]
    fn no_host_namespaces() {
        let ds = build(BioMonitorSpec::default());
        let pod = pod_spec(&ds);
        assert_eq!(pod.host_network, None);
        assert_eq!(pod.host_pid, None);
    }

    #[test]
    fn args_follow_the_spec() {
        let mut spec = BioMonitorSpec {
            attach: AttachMode::RawTp,
            devices: DeviceFilter {
                include: vec!["^nvme".into(), "^sd[a-z]$".into()],
                exclude: vec!["^loop".into()],
            },
            persistent_volume_labels: false,
            ..BioMonitorSpec::default()
        };
        spec.agent.port = 9500;
        spec.agent.log_level = LogLevel::Debug;
        assert_eq!(
            container(&build(spec)).args.clone().unwrap(),
            vec![
                "--listen=0.0.0.0:9500",
                "--node-name=$(NODE_NAME)",
                "--attach=raw_tp",
                "--device-include=^nvme",
                "--device-include=^sd[a-z]$$",
                "--device-exclude=^loop",
                "--log-level=debug",
                "--kubelet-root=/var/lib/kubelet",
                "--pv-labels=false",
            ]
        );
    }

    #[test]
    fn node_name_comes_from_the_downward_api() {
        let env = container(&build(BioMonitorSpec::default()))
            .env
            .clone()
            .unwrap();
        assert_eq!(env[0].name, "NODE_NAME");
        let field = env[0].value_from.clone().unwrap().field_ref.unwrap();
        assert_eq!(field.field_path, "spec.nodeName");
    }

    #[test]
    fn port_and_probes_use_the_named_metrics_port() {
        let mut spec = BioMonitorSpec::default();
        spec.agent.port = 9999;
        let ds = build(spec);
        let c = container(&ds);
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(port.name.as_deref(), Some("metrics"));
        assert_eq!(port.container_port, 9999);
        let ready = c.readiness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(ready.port, IntOrString::String("metrics".into()));
        let live = c.liveness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
    }

    #[test]
    fn selector_matches_template_labels_and_rolls_without_surge() {
        let ds = build(BioMonitorSpec::default());
        let spec = &ds.spec;
        let selector = spec.selector.match_labels.clone().unwrap();
        let labels = spec.template.metadata.clone().unwrap().labels.unwrap();
        for (k, v) in &selector {
            assert_eq!(labels.get(k), Some(v));
        }
        assert_eq!(selector.get(names::LABEL_INSTANCE).unwrap(), "disks");
        let strategy = spec.update_strategy.clone().unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        assert_eq!(
            strategy.rolling_update.unwrap().max_surge,
            Some(IntOrString::Int(0))
        );
    }

    #[test]
    fn tolerate_everything_by_default() {
        let ds = build(BioMonitorSpec::default());
        let tolerations = pod_spec(&ds).tolerations.clone().unwrap();
        assert_eq!(
            tolerations,
            vec![Toleration {
                operator: Some("Exists".into()),
                ..Toleration::default()
            }]
        );
    }

    #[test]
    fn node_selector_is_linux_plus_user_labels() {
        let spec = BioMonitorSpec {
            node_selector: BTreeMap::from([("disk".to_string(), "nvme".to_string())]),
            ..BioMonitorSpec::default()
        };
        let selector = pod_spec(&build(spec)).node_selector.clone().unwrap();
        assert_eq!(selector.get("kubernetes.io/os").unwrap(), "linux");
        assert_eq!(selector.get("disk").unwrap(), "nvme");
    }

    #[test]
    fn image_defaults_to_the_operator_setting() {
        let settings = Settings {
            agent_image: "registry.example/agent:1".into(),
            ..Settings::default()
        };
        let ds = daemonset(&monitor("d", BioMonitorSpec::default()), &settings).unwrap();
        assert_eq!(
            container(&ds).image.as_deref(),
            Some("registry.example/agent:1")
        );
        assert_eq!(container(&ds).image_pull_policy, None);

        let mut spec = BioMonitorSpec::default();
        spec.agent.image = Some("mine:2".into());
        spec.agent.image_pull_policy = Some(PullPolicy::Always);
        let ds = daemonset(&monitor("d", spec), &settings).unwrap();
        assert_eq!(container(&ds).image.as_deref(), Some("mine:2"));
        assert_eq!(container(&ds).image_pull_policy.as_deref(), Some("Always"));
    }

    #[test]
    fn service_account_and_priority_class() {
        let mut spec = BioMonitorSpec::default();
        spec.agent.priority_class_name = Some("system-node-critical".into());
        let ds = build(spec);
        assert_eq!(
            pod_spec(&ds).service_account_name.as_deref(),
            Some("disks-agent")
        );
        assert_eq!(
            pod_spec(&ds).priority_class_name.as_deref(),
            Some("system-node-critical")
        );
    }

    #[test]
    fn kubelet_expansion_model() {
        let env = BTreeMap::from([("NODE_NAME", "n1")]);
        for (arg, want) in [
            ("--node-name=$(NODE_NAME)", "--node-name=n1"),
            ("$(OTHER)", "$(OTHER)"),
            ("^sd[a-z]$", "^sd[a-z]$"),
            ("a$$b", "a$b"),
            ("$$(NODE_NAME)", "$(NODE_NAME)"),
            ("$$$", "$$"),
            ("$(x", "$(x"),
            ("$x$", "$x$"),
        ] {
            assert_eq!(kubelet_expand(arg, &env), want, "{arg}");
        }
    }

    fn one_of<T: Clone + std::fmt::Debug + 'static>(
        v: &[T],
    ) -> impl proptest::strategy::Strategy<Value = T> {
        proptest::sample::select(v.to_vec())
    }

    /// Device patterns as users write them, and with what the kubelet would expand: `$` at the
    /// end, `$$`, `$(NODE_NAME)`, a leading `-`.
    fn pattern() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::strategy::Strategy;
        proptest::prop_oneof![
            "[-a-z0-9^$().|\\[\\]]{1,12}",
            "[a-z^]{0,4}\\$(\\(NODE_NAME\\)|\\$|\\(x)?[a-z$]{0,3}",
        ]
        .prop_map(String::from)
    }

    fn spec() -> impl proptest::strategy::Strategy<Value = BioMonitorSpec> {
        use proptest::prelude::*;
        use proptest::strategy::Strategy;
        (
            proptest::collection::vec(pattern(), 0..4),
            proptest::collection::vec(pattern(), 0..4),
            one_of(&[
                AttachMode::Auto,
                AttachMode::TpBtf,
                AttachMode::RawTp,
                AttachMode::Tracepoint,
                AttachMode::Kprobe,
            ]),
            any::<bool>(),
            1024..=65535i32,
            one_of(&[
                LogLevel::Error,
                LogLevel::Warn,
                LogLevel::Info,
                LogLevel::Debug,
                LogLevel::Trace,
            ]),
            any::<bool>(),
            one_of(&[AuthMode::None, AuthMode::Kubernetes]),
        )
            .prop_map(
                |(include, exclude, attach, pv_labels, port, log_level, tls, auth)| {
                    let mut spec = BioMonitorSpec {
                        devices: DeviceFilter { include, exclude },
                        attach,
                        persistent_volume_labels: pv_labels,
                        ..BioMonitorSpec::default()
                    };
                    spec.agent.port = port;
                    spec.agent.log_level = log_level;
                    spec.metrics_endpoint.tls.enabled = tls;
                    spec.metrics_endpoint.auth = auth;
                    spec
                },
            )
    }

    proptest::proptest! {
        /// What the agent parses from the DaemonSet's args, after the kubelet expanded them, is
        /// the BioMonitor's settings, with the agent's defaults for what it does not set.
        #[test]
        fn the_agent_reads_back_the_spec_from_its_args(spec in spec()) {
            let env = BTreeMap::from([(NODE_NAME_ENV, "node-7")]);
            let ds = build(spec.clone());
            let c = container(&ds);
            // The env the kubelet expands with is the container's.
            proptest::prop_assert_eq!(c.env.as_ref().unwrap()[0].name.as_str(), NODE_NAME_ENV);
            let argv: Vec<String> = std::iter::once("node-agent".to_string())
                .chain(c.args.iter().flatten().map(|a| kubelet_expand(a, &env)))
                .collect();
            let cli = <bio_agent_args::Cli as clap::Parser>::try_parse_from(&argv)
                .map_err(|e| proptest::test_runner::TestCaseError::fail(format!("{argv:?}: {e}")))?;
            proptest::prop_assert!(cli.command.is_none());
            let tls_file = |key: &str| {
                spec.metrics_endpoint
                    .tls
                    .enabled
                    .then(|| std::path::PathBuf::from(format!("{TLS_DIR}/{key}")))
            };
            let want = ServeArgs {
                listen: format!("0.0.0.0:{}", spec.agent.port).parse().unwrap(),
                node_name: Some("node-7".into()),
                devices: DeviceArgs {
                    include: spec.devices.include.clone(),
                    exclude: spec.devices.exclude.clone(),
                },
                bpf: BpfArgs { attach: spec.attach },
                volumes: VolumeArgs {
                    pv_labels: spec.persistent_volume_labels,
                    kubelet_root: KUBELET_ROOT.into(),
                    host_kubelet_root: None,
                },
                tls_cert_file: tls_file("tls.crt"),
                tls_key_file: tls_file("tls.key"),
                max_connections: bio_agent_args::DEFAULT_MAX_CONNECTIONS,
                header_timeout: bio_agent_args::DEFAULT_HEADER_TIMEOUT,
                shutdown_timeout: bio_agent_args::DEFAULT_SHUTDOWN_TIMEOUT,
                auth: spec.metrics_endpoint.auth,
                log_level: spec.agent.log_level.as_str().into(),
                log_json: false,
            };
            proptest::prop_assert_eq!(cli.serve, want, "{:?}", argv);
        }
    }
}
