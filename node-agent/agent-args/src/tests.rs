use std::net::{IpAddr, Ipv6Addr};

use clap::CommandFactory;
use proptest::prelude::*;

use super::*;

fn parse(args: &[String]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("node-agent".to_string()).chain(args.iter().cloned()))
}

/// The node name a command line without --node-name parses to: NODE_NAME, if the test runs
/// where it is set (a CI pod).
fn env_node_name() -> Option<String> {
    std::env::var("NODE_NAME").ok()
}

#[test]
fn cli_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn durations() {
    assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
    assert!(parse_duration("0s").is_err());
    assert!(parse_duration("1h").is_err());
    assert!(parse_duration("x").is_err());
}

#[test]
fn no_flags_is_the_default_and_the_seed_port() {
    let cli = parse(&[]).unwrap();
    let want = ServeArgs {
        node_name: env_node_name(),
        ..ServeArgs::default()
    };
    assert_eq!(cli.serve, want);
    assert_eq!(cli.serve.listen.port(), 9435);
    assert_eq!(cli.serve.bpf.attach, AttachMode::Auto);
    assert_eq!(cli.serve.max_connections, 64);
    assert_eq!(cli.serve.header_timeout, Duration::from_secs(10));
    assert_eq!(cli.serve.shutdown_timeout, Duration::from_secs(5));
}

#[test]
fn the_default_writes_the_flags_the_daemonset_always_had() {
    let args = ServeArgs {
        node_name: Some("n1".into()),
        ..ServeArgs::default()
    }
    .to_args();
    assert_eq!(
        args,
        [
            "--listen=0.0.0.0:9435",
            "--node-name=n1",
            "--attach=auto",
            "--log-level=info",
            "--kubelet-root=/var/lib/kubelet",
            "--pv-labels=false",
        ]
    );
}

#[test]
fn a_bare_pv_labels_switches_them_on() {
    let on = parse(&["--pv-labels".into()]).unwrap();
    assert!(on.serve.volumes.pv_labels);
}

#[test]
fn zero_connections_is_refused() {
    let err = parse(&["--max-connections=0".into()]).unwrap_err();
    assert!(err.to_string().contains("--max-connections"), "{err}");
}

#[test]
fn a_regex_that_looks_like_a_flag_stays_a_value() {
    let args = ServeArgs {
        devices: DeviceArgs {
            include: vec!["--log-json".into()],
            exclude: vec!["-x".into()],
        },
        ..ServeArgs::default()
    };
    let back = parse(&args.to_args()).unwrap().serve;
    assert_eq!(back.devices, args.devices);
    assert!(!back.log_json);
}

fn text() -> impl Strategy<Value = String> {
    // Printable text with the characters a shell, clap or the kubelet treat specially.
    prop_oneof!["\\PC{0,12}", "[-=$()a-z0-9^\\[\\] ,.]{0,12}",]
}

/// clap refuses an empty path.
fn path() -> impl Strategy<Value = String> {
    text().prop_filter("a path is not empty", |p| !p.is_empty())
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
        (any::<[u16; 8]>(), any::<u16>())
            .prop_map(|(ip, port)| { SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port) }),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    (1u64..=3_600_000).prop_map(Duration::from_millis)
}

fn serve_args() -> impl Strategy<Value = ServeArgs> {
    let net = (
        socket_addr(),
        proptest::option::of(text()),
        proptest::option::of(path()),
        1u32..=65536,
        duration(),
        duration(),
    );
    let agent = (
        proptest::collection::vec(text(), 0..4),
        proptest::collection::vec(text(), 0..4),
        prop::sample::select(AttachMode::value_variants_vec()),
        any::<bool>(),
        path(),
        proptest::option::of(path()),
        prop::sample::select(vec![AuthMode::None, AuthMode::Kubernetes]),
        text(),
        any::<bool>(),
    );
    (net, agent).prop_map(
        |(
            (listen, node_name, tls, max_connections, header_timeout, shutdown_timeout),
            (include, exclude, attach, pv_labels, kubelet_root, host_root, auth, log_level, json),
        )| ServeArgs {
            listen,
            node_name,
            devices: DeviceArgs { include, exclude },
            bpf: BpfArgs { attach },
            volumes: VolumeArgs {
                pv_labels,
                kubelet_root: kubelet_root.into(),
                host_kubelet_root: host_root.map(Into::into),
            },
            tls_cert_file: tls.as_ref().map(|d| PathBuf::from(format!("{d}/tls.crt"))),
            tls_key_file: tls.map(|d| PathBuf::from(format!("{d}/tls.key"))),
            max_connections,
            header_timeout,
            shutdown_timeout,
            auth,
            log_level,
            log_json: json,
        },
    )
}

impl AttachMode {
    fn value_variants_vec() -> Vec<Self> {
        <Self as clap::ValueEnum>::value_variants().to_vec()
    }
}

proptest! {
    /// Every field reaches the command line and reads back unchanged: a flag renamed, retyped
    /// or left out of `flags()` fails here.
    #[test]
    fn flags_parse_back_to_the_same_settings(args in serve_args()) {
        let line = args.to_args();
        let back = parse(&line).map_err(|e| TestCaseError::fail(format!("{line:?}: {e}")))?;
        prop_assert!(back.command.is_none());
        let want = ServeArgs {
            node_name: args.node_name.clone().or_else(env_node_name),
            ..args
        };
        prop_assert_eq!(back.serve, want, "{:?}", line);
    }
}
