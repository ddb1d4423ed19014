//! Checks the OpenAPI schema cannot express, made before anything is applied.
//! A bad device pattern is judged by the agent's own filter crate
//! (`bio-device-filter`), so the operator rejects exactly what would make
//! every agent exit. Tolerations, node selector and resources are checked
//! with the rules the API server applies to the DaemonSet's pod template,
//! so the user reads the BioMonitor field instead of a DaemonSet path in the
//! operator's log. The API server stays the final judge: what slips through
//! is caught on apply and mapped back by [`rejection`].

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    api::core::v1::{ResourceRequirements, Toleration},
    apimachinery::pkg::api::resource::Quantity,
};

use crate::crd::BioMonitorSpec;

/// One problem, by BioMonitor field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldProblem {
    /// Path in the BioMonitor, e.g. `spec.tolerations[0].operator`.
    pub field: String,
    pub detail: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.detail)
    }
}

/// Every problem found, joined into one line for the condition message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct InvalidSpec(pub Vec<FieldProblem>);

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

pub fn validate_spec(spec: &BioMonitorSpec) -> Result<(), InvalidSpec> {
    let mut problems = Vec::new();
    for bad in bio_device_filter::validate_all(&spec.devices.include, &spec.devices.exclude) {
        problems.push(FieldProblem {
            field: format!("spec.devices.{}[{}]", bad.list, bad.index),
            detail: format!("{:?} is {}", bad.pattern, bad.error),
        });
    }
    for (i, t) in spec.tolerations.iter().enumerate() {
        toleration(&format!("spec.tolerations[{i}]"), t, &mut problems);
    }
    for (key, value) in &spec.node_selector {
        if let Err(why) = qualified_name(key) {
            problems.push(FieldProblem {
                field: "spec.nodeSelector".into(),
                detail: format!("key {key:?} is not a valid label key: {why}"),
            });
        }
        if let Err(why) = label_value(value) {
            problems.push(FieldProblem {
                field: format!("spec.nodeSelector[{key}]"),
                detail: format!("{value:?} is not a valid label value: {why}"),
            });
        }
    }
    if let Some(r) = &spec.agent.resources {
        resources("spec.agent.resources", r, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(InvalidSpec(problems))
    }
}

/// The API server's toleration rules that hold in every version; operators
/// other than Equal and Exists (Lt/Gt, behind a feature gate) are left to it.
fn toleration(path: &str, t: &Toleration, problems: &mut Vec<FieldProblem>) {
    let mut bad = |field: &str, detail: String| {
        problems.push(FieldProblem {
            field: format!("{path}.{field}"),
            detail,
        })
    };
    let key = t.key.as_deref().unwrap_or("");
    let operator = t.operator.as_deref().unwrap_or("");
    let effect = t.effect.as_deref().unwrap_or("");
    let value = t.value.as_deref().unwrap_or("");
    if !key.is_empty() {
        if let Err(why) = qualified_name(key) {
            bad("key", format!("{key:?} is not a valid taint key: {why}"));
        }
    } else if operator != "Exists" {
        bad(
            "operator",
            format!("{operator:?}: must be Exists when key is empty (to tolerate every taint)"),
        );
    }
    match operator {
        "" | "Equal" => {
            if let Err(why) = label_value(value) {
                bad(
                    "value",
                    format!("{value:?} is not a valid taint value: {why}"),
                );
            }
        }
        "Exists" if !value.is_empty() => bad(
            "value",
            format!("{value:?}: must be empty when operator is Exists"),
        ),
        "Exists" | "Lt" | "Gt" => {}
        other => bad(
            "operator",
            format!("unsupported value {other:?}: supported values are \"Equal\", \"Exists\""),
        ),
    }
    match effect {
        "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute" => {}
        other => bad(
            "effect",
            format!(
                "unsupported value {other:?}: supported values are \"NoSchedule\", \"PreferNoSchedule\", \"NoExecute\" (or empty for all)"
            ),
        ),
    }
    if t.toleration_seconds.is_some() && effect != "NoExecute" {
        bad(
            "effect",
            format!("{effect:?}: must be NoExecute when tolerationSeconds is set"),
        );
    }
}

fn resources(path: &str, r: &ResourceRequirements, problems: &mut Vec<FieldProblem>) {
    let parse_all = |kind: &str, map: &Option<BTreeMap<String, Quantity>>| {
        let mut ok = BTreeMap::new();
        let mut bad = Vec::new();
        for (name, q) in map.iter().flatten() {
            match parse_quantity(&q.0) {
                Ok(v) if v.negative => bad.push(FieldProblem {
                    field: format!("{path}.{kind}[{name}]"),
                    detail: format!("{:?}: must not be negative", q.0),
                }),
                Ok(v) => {
                    ok.insert(name.clone(), v);
                }
                Err(why) => bad.push(FieldProblem {
                    field: format!("{path}.{kind}[{name}]"),
                    detail: format!("{:?} is not a quantity: {why}", q.0),
                }),
            }
        }
        (ok, bad)
    };
    let (limits, mut bad_limits) = parse_all("limits", &r.limits);
    let (requests, mut bad_requests) = parse_all("requests", &r.requests);
    problems.append(&mut bad_limits);
    problems.append(&mut bad_requests);
    for (name, request) in &requests {
        if let Some(limit) = limits.get(name) {
            if request.cmp_value(limit) == std::cmp::Ordering::Greater {
                problems.push(FieldProblem {
                    field: format!("{path}.requests[{name}]"),
                    detail: format!(
                        "{:?} is more than the {name} limit {:?}; a request must not exceed its limit",
                        request.text, limit.text
                    ),
                });
            }
        }
    }
}

/// A parsed Kubernetes quantity: `mantissa * 10^exp10 * 2^exp2`, exact.
#[derive(Clone, Debug, PartialEq)]
struct ParsedQuantity {
    text: String,
    negative: bool,
    mantissa: u128,
    exp10: i32,
    exp2: u32,
}

impl ParsedQuantity {
    /// Compares two non-negative quantities; exact unless a value does not fit
    /// in 128 bits, where f64 decides (such values are beyond any limit anyway).
    fn cmp_value(&self, other: &Self) -> std::cmp::Ordering {
        let low = self.exp10.min(other.exp10);
        let scaled = |q: &Self| -> Option<u128> {
            let shift = u32::try_from(q.exp10 - low).ok()?;
            q.mantissa
                .checked_mul(10u128.checked_pow(shift)?)?
                .checked_mul(1u128.checked_shl(q.exp2).filter(|&m| m != 0)?)
        };
        match (scaled(self), scaled(other)) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self
                .approx()
                .partial_cmp(&other.approx())
                .unwrap_or(std::cmp::Ordering::Equal),
        }
    }

    fn approx(&self) -> f64 {
        self.mantissa as f64 * 10f64.powi(self.exp10) * 2f64.powi(self.exp2 as i32)
    }
}

/// The syntax of `resource.Quantity` (its doc in the CRD schema):
/// `[+-]digits[.digits]` then a binary suffix (Ki..Ei), a decimal one
/// (n, u, m, "", k, M, G, T, P, E) or an exponent (`e3`, `E-2`).
fn parse_quantity(s: &str) -> Result<ParsedQuantity, String> {
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err("expected a number such as 128Mi, 0.5 or 100m".into());
    }
    let (exp10, exp2) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        exp if exp.starts_with(['e', 'E']) => {
            let n = &exp[1..];
            let digits = n.strip_prefix(['+', '-']).unwrap_or(n);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("bad exponent {exp:?}"));
            }
            (n.parse::<i32>().map_err(|e| format!("exponent {exp:?}: {e}"))?, 0)
        }
        other => {
            return Err(format!(
                "unknown suffix {other:?} (use Ki, Mi, Gi, Ti, Pi, Ei, n, u, m, k, M, G, T, P, E or an exponent such as e3)"
            ))
        }
    };
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let frac_len = i32::try_from(frac.len()).map_err(|_| "too many digits".to_string())?;
    // More digits than 128 bits hold: keep the leading ones and move the rest
    // into the exponent (only the f64 fallback can compare such values).
    let keep = digits.len().min(38);
    let mantissa = if keep == 0 {
        0
    } else {
        digits[..keep].parse::<u128>().map_err(|e| e.to_string())?
    };
    let dropped = i32::try_from(digits.len() - keep).map_err(|_| "too many digits".to_string())?;
    Ok(ParsedQuantity {
        text: s.to_string(),
        negative: negative && mantissa != 0,
        mantissa,
        exp10: exp10.saturating_sub(frac_len).saturating_add(dropped),
        exp2,
    })
}

/// A label key (or taint key): `[prefix/]name`, the prefix a DNS subdomain.
fn qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        dns_subdomain(prefix).map_err(|why| format!("prefix {prefix:?} {why}"))?;
    }
    if name.is_empty() {
        return Err("the name part must not be empty".into());
    }
    name_part(name).map_err(|why| format!("the name part {why}"))
}

/// A label value: empty, or at most 63 of `[A-Za-z0-9_.-]`, starting and
/// ending alphanumeric.
fn label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    name_part(value)
}

fn name_part(s: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    if s.len() > 63 {
        return Err("must be at most 63 characters".into());
    }
    if !s.starts_with(alnum) || !s.ends_with(alnum) {
        return Err("must start and end with a letter or digit".into());
    }
    if let Some(c) = s
        .chars()
        .find(|&c| !(alnum(c) || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "must consist of letters, digits, '-', '_' and '.' (found {c:?})"
        ));
    }
    Ok(())
}

fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters".into());
    }
    let lower_alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    for label in s.split('.') {
        if !label.starts_with(lower_alnum)
            || !label.ends_with(lower_alnum)
            || !label.chars().all(|c| lower_alnum(c) || c == '-')
        {
            return Err(
                "must be a DNS subdomain (lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit)"
                    .into(),
            );
        }
    }
    Ok(())
}

/// What the DaemonSet fields the spec controls are called in the BioMonitor.
/// Longest prefix first; `None` for fields the operator sets on its own.
const DAEMONSET_TO_SPEC: &[(&str, &str)] = &[
    ("spec.template.spec.tolerations", "spec.tolerations"),
    ("spec.template.spec.nodeSelector", "spec.nodeSelector"),
    (
        "spec.template.spec.priorityClassName",
        "spec.agent.priorityClassName",
    ),
    (
        "spec.template.spec.containers[0].resources",
        "spec.agent.resources",
    ),
    ("spec.template.spec.containers[0].image", "spec.agent.image"),
    (
        "spec.template.spec.containers[0].imagePullPolicy",
        "spec.agent.imagePullPolicy",
    ),
    (
        "spec.template.spec.containers[0].ports[0].containerPort",
        "spec.agent.port",
    ),
    // Indices differ (BPF and PERFMON come first): name the list.
    (
        "spec.template.spec.containers[0].securityContext.capabilities.add",
        "spec.agent.extraCapabilities",
    ),
];

/// The BioMonitor field a DaemonSet field path comes from, if the spec sets it.
pub fn spec_field(daemonset_field: &str) -> Option<String> {
    DAEMONSET_TO_SPEC.iter().find_map(|(ds, spec)| {
        let rest = daemonset_field.strip_prefix(ds)?;
        match rest.chars().next() {
            None | Some('.') | Some('[') if spec.ends_with("extraCapabilities") => {
                Some(spec.to_string())
            }
            None | Some('.') | Some('[') => Some(format!("{spec}{rest}")),
            _ => None,
        }
    })
}

/// How the API server's refusal of the DaemonSet reads on the BioMonitor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// True when every cause maps to a spec field: the user's spec is wrong.
    pub spec_fields_only: bool,
    pub message: String,
}

/// Maps an API error on applying the DaemonSet to a message naming
/// BioMonitor fields: 422 Invalid (with causes), 400 BadRequest, and the 500
/// a server-side apply gets when the object cannot be decoded (an
/// unparseable quantity, as kube-apiserver 1.37 answers). `None` for errors
/// that are not a verdict on the object (conflicts, timeouts, RBAC), which
/// are retried instead.
pub fn rejection(status: &kube::core::Status) -> Option<Rejection> {
    let undecodable = status.code == 500
        && status
            .message
            .contains("unable to convert unstructured object");
    if status.code != 422 && status.code != 400 && !undecodable {
        return None;
    }
    let causes = status
        .details
        .as_ref()
        .map(|d| d.causes.as_slice())
        .unwrap_or_default();
    let mut parts = Vec::new();
    let mut all_mapped = !causes.is_empty();
    for cause in causes {
        match spec_field(&cause.field) {
            Some(field) => parts.push(format!("{field}: {}", cause.message)),
            None => {
                all_mapped = false;
                let field = if cause.field.is_empty() {
                    "DaemonSet".to_string()
                } else {
                    format!("DaemonSet {}", cause.field)
                };
                parts.push(format!("{field}: {}", cause.message));
            }
        }
    }
    if parts.is_empty() {
        // No causes (a decode error): the message names the DaemonSet's
        // field in Go terms; rewrite the paths it contains where it can.
        parts.push(rewrite_paths(&status.message));
    }
    Some(Rejection {
        spec_fields_only: all_mapped,
        message: format!(
            "the API server rejected the agent DaemonSet: {}",
            parts.join("; ")
        ),
    })
}

/// Replaces DaemonSet field paths inside a free-text message.
fn rewrite_paths(message: &str) -> String {
    let mut out = message.to_string();
    for (ds, spec) in DAEMONSET_TO_SPEC {
        out = out.replace(ds, spec);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DeviceFilter;

    fn devices(include: &[&str], exclude: &[&str]) -> BioMonitorSpec {
        BioMonitorSpec {
            devices: DeviceFilter {
                include: include.iter().map(|s| s.to_string()).collect(),
                exclude: exclude.iter().map(|s| s.to_string()).collect(),
            },
            ..BioMonitorSpec::default()
        }
    }

    fn fields(spec: &BioMonitorSpec) -> Vec<String> {
        validate_spec(spec)
            .err()
            .map(|e| e.0.into_iter().map(|p| p.field).collect())
            .unwrap_or_default()
    }

    fn json_spec(v: serde_json::Value) -> BioMonitorSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn valid_specs_pass() {
        assert_eq!(
            validate_spec(&devices(&["^nvme\\d+n\\d+$", "^sd[a-z]+$"], &["^loop"])),
            Ok(())
        );
        assert_eq!(validate_spec(&BioMonitorSpec::default()), Ok(()));
        let spec = json_spec(serde_json::json!({
            "nodeSelector": {"node-role.kubernetes.io/storage": "", "pool": "db-1"},
            "tolerations": [
                {"operator": "Exists"},
                {"key": "example.com/disk", "operator": "Equal", "value": "ssd", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 30},
                {"key": "gpu", "operator": "Gt", "value": "3"}
            ],
            "agent": {"resources": {
                "requests": {"cpu": "100m", "memory": "0.5Gi", "example.com/x": "1"},
                "limits": {"cpu": "0.1", "memory": "512Mi", "ephemeral-storage": "1e9"}
            }}
        }));
        assert_eq!(validate_spec(&spec), Ok(()));
    }

    #[test]
    fn every_bad_regex_is_named() {
        let err = validate_spec(&devices(&["^nvme", "sd[a-"], &["(loop"])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("spec.devices.include[1]: \"sd[a-\""), "{msg}");
        assert!(msg.contains("spec.devices.exclude[0]: \"(loop\""), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }

    /// The four hostile specs from issue 13, each named by field.
    #[test]
    fn schema_valid_specs_the_api_server_rejects() {
        let garbage_toleration = json_spec(serde_json::json!({
            "tolerations": [{"operator": "Exists"}, {"key": "a", "operator": "Garbage", "effect": "Sometimes"}]
        }));
        assert_eq!(
            fields(&garbage_toleration),
            ["spec.tolerations[1].operator", "spec.tolerations[1].effect"]
        );
        let over_limit = json_spec(serde_json::json!({"agent": {"resources": {
            "requests": {"memory": "1Gi", "cpu": "2"}, "limits": {"memory": "256Mi", "cpu": "2000m"}
        }}}));
        assert_eq!(
            fields(&over_limit),
            ["spec.agent.resources.requests[memory]"]
        );
        let msg = validate_spec(&over_limit).unwrap_err().to_string();
        assert!(
            msg.contains("\"1Gi\" is more than the memory limit \"256Mi\""),
            "{msg}"
        );
        let lots =
            json_spec(serde_json::json!({"agent": {"resources": {"limits": {"memory": "lots"}}}}));
        assert_eq!(fields(&lots), ["spec.agent.resources.limits[memory]"]);
        let bad_key = json_spec(serde_json::json!({"nodeSelector": {"bad key!": "x"}}));
        assert_eq!(fields(&bad_key), ["spec.nodeSelector"]);
        let msg = validate_spec(&bad_key).unwrap_err().to_string();
        assert!(
            msg.contains("key \"bad key!\" is not a valid label key"),
            "{msg}"
        );
    }

    #[test]
    fn toleration_rules() {
        let cases: &[(serde_json::Value, &[&str])] = &[
            (serde_json::json!({"operator": "Equal"}), &["operator"]),
            (serde_json::json!({}), &["operator"]),
            (
                serde_json::json!({"key": "k", "operator": "Exists", "value": "v"}),
                &["value"],
            ),
            (
                serde_json::json!({"key": "k", "value": "not ok!"}),
                &["value"],
            ),
            (
                serde_json::json!({"key": "-k", "operator": "Exists"}),
                &["key"],
            ),
            (
                serde_json::json!({"key": "Bad.Prefix/k", "operator": "Exists"}),
                &["key"],
            ),
            (
                serde_json::json!({"key": "k", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 5}),
                &["effect"],
            ),
            (
                serde_json::json!({"key": "k", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 5}),
                &[],
            ),
        ];
        for (t, want) in cases {
            let spec = json_spec(serde_json::json!({ "tolerations": [t] }));
            let want: Vec<String> = want
                .iter()
                .map(|f| format!("spec.tolerations[0].{f}"))
                .collect();
            assert_eq!(fields(&spec), want, "{t}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        for good in ["a", "kubernetes.io/os", "x.y-z/A_b.c", &"a".repeat(63)] {
            assert_eq!(qualified_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "a b",
            "/a",
            "a/",
            "-a",
            "a-",
            "UPPER.example/a",
            "a/b/c",
            &"a".repeat(64),
        ] {
            assert!(qualified_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(label_value(""), Ok(()));
        assert!(label_value("a/b").is_err());
    }

    #[test]
    fn quantities_parse_and_compare_exactly() {
        let q = |s| parse_quantity(s).unwrap();
        for s in [
            "0", "1", "+1", "1.5", ".5", "5.", "100m", "1Ki", "1e3", "1E-2", "12n", "3Ei",
        ] {
            assert!(parse_quantity(s).is_ok(), "{s}");
        }
        for s in [
            "", "lots", "1.2.3", "Mi", "1mi", "1KB", "1e", "1e+", "--1", "1 Gi", ".",
        ] {
            assert!(parse_quantity(s).is_err(), "{s:?}");
        }
        use std::cmp::Ordering::*;
        assert_eq!(q("1Gi").cmp_value(&q("1073741824")), Equal);
        assert_eq!(q("0.1").cmp_value(&q("100m")), Equal);
        assert_eq!(q("1k").cmp_value(&q("1Ki")), Less);
        assert_eq!(q("1e3").cmp_value(&q("1k")), Equal);
        assert_eq!(q("1000001u").cmp_value(&q("1")), Greater);
        assert_eq!(q("8Ei").cmp_value(&q("1E")), Greater);
        assert!(q("-1").negative && !q("-0").negative);
    }

    /// The operator's verdict on a pattern is the agent's: both go through
    /// `bio_device_filter`, the agent via `DeviceFilter::new` at start-up.
    /// And the pattern reaches the agent as written, through the kubelet's
    /// `$(VAR)` / `$$` expansion of the DaemonSet args.
    #[test]
    fn tricky_patterns_get_the_agents_verdict_and_arrive_unchanged() {
        let tricky = [
            "(?x)sda#comment",
            "(?x) sd a # spaced out",
            "^sd[a-z]$",
            "$(NODE_NAME)",
            "$$(NODE_NAME)",
            "a$$b",
            "-sda",
            "--device-include=x",
            "a{1000}{1000}",
            "((a{50}){50}){50}",
            "\\p{Greek}+",
            "\\p{NoSuchClass}",
            "(?P<n>sd)(?P<n>a)",
            "[z-a]",
            "(?i)NVME",
            "(?=sda)",
            "\\1",
        ];
        for p in tricky {
            let agent = bio_device_filter::DeviceFilter::new(&[p.to_string()], &[]);
            let operator = validate_spec(&devices(&[p], &[]));
            assert_eq!(
                agent.is_ok(),
                operator.is_ok(),
                "{p:?}: {agent:?} vs {operator:?}"
            );
            if let Err(e) = &agent {
                let msg = operator.unwrap_err().to_string();
                assert!(msg.contains(&e.error.to_string()), "{p:?}: {msg}");
            }
            let args = crate::resources::daemonset::agent_args(&devices(&[p], &[]));
            let arg = args
                .iter()
                .find(|a| a.starts_with("--device-include="))
                .unwrap();
            assert_eq!(
                crate::resources::test_support::kubelet_expand(
                    arg,
                    &std::collections::BTreeMap::from([("NODE_NAME", "node-1")])
                ),
                format!("--device-include={p}"),
                "{p:?}"
            );
        }
        // The example: accepted by both, and it does filter.
        let f = bio_device_filter::DeviceFilter::new(&["(?x)sda#comment".into()], &[]).unwrap();
        assert!(f.allows("sda") && !f.allows("sdb"));
    }

    fn status(code: u16, causes: &[(&str, &str)], message: &str) -> kube::core::Status {
        let mut s = kube::core::Status::failure(message, "Invalid").with_code(code);
        s.details = Some(kube::core::response::StatusDetails {
            causes: causes
                .iter()
                .map(|(field, message)| kube::core::response::StatusCause {
                    reason: "FieldValueInvalid".into(),
                    message: message.to_string(),
                    field: field.to_string(),
                })
                .collect(),
            name: String::new(),
            group: String::new(),
            kind: String::new(),
            uid: String::new(),
            retry_after_seconds: 0,
        });
        s
    }

    #[test]
    fn daemonset_paths_map_to_spec_fields() {
        let m = |f| spec_field(f);
        assert_eq!(
            m("spec.template.spec.tolerations[0].operator").as_deref(),
            Some("spec.tolerations[0].operator")
        );
        assert_eq!(
            m("spec.template.spec.containers[0].resources.requests[memory]").as_deref(),
            Some("spec.agent.resources.requests[memory]")
        );
        assert_eq!(
            m("spec.template.spec.nodeSelector").as_deref(),
            Some("spec.nodeSelector")
        );
        assert_eq!(
            m("spec.template.spec.containers[0].image").as_deref(),
            Some("spec.agent.image")
        );
        assert_eq!(
            m("spec.template.spec.containers[0].imagePullPolicy").as_deref(),
            Some("spec.agent.imagePullPolicy")
        );
        assert_eq!(
            m("spec.template.spec.containers[0].securityContext.capabilities.add[3]").as_deref(),
            Some("spec.agent.extraCapabilities")
        );
        // Fields the operator sets itself are not the user's.
        assert_eq!(m("spec.template.spec.containers[0].args[2]"), None);
        assert_eq!(m("spec.template.spec.tolerationsX"), None);
        assert_eq!(m("metadata.name"), None);
    }

    #[test]
    fn rejections_name_the_biomonitor_field() {
        let r = rejection(&status(
            422,
            &[
                (
                    "spec.template.spec.tolerations[0].operator",
                    "Unsupported value: \"Garbage\": supported values: \"Equal\", \"Exists\"",
                ),
                (
                    "spec.template.spec.containers[0].resources.requests",
                    "Invalid value: \"1Gi\": must be less than or equal to memory limit of 256Mi",
                ),
            ],
            "DaemonSet.apps \"x-agent\" is invalid: ...",
        ))
        .unwrap();
        assert!(r.spec_fields_only);
        assert!(
            r.message
                .contains("spec.tolerations[0].operator: Unsupported value: \"Garbage\""),
            "{}",
            r.message
        );
        assert!(
            r.message
                .contains("spec.agent.resources.requests: Invalid value"),
            "{}",
            r.message
        );

        // A cause in a field the operator owns: not blamed on the spec.
        let r = rejection(&status(
            422,
            &[("spec.template.spec.containers[0].args[3]", "bad")],
            "x",
        ))
        .unwrap();
        assert!(!r.spec_fields_only);
        assert!(
            r.message
                .contains("DaemonSet spec.template.spec.containers[0].args[3]: bad"),
            "{}",
            r.message
        );

        // A decode error has no causes; its message is kept, paths rewritten.
        let r = rejection(&status(400, &[], "spec.template.spec.containers[0].resources.limits: quantities must match the regular expression")).unwrap();
        assert!(!r.spec_fields_only);
        assert!(
            r.message
                .contains("spec.agent.resources.limits: quantities must match"),
            "{}",
            r.message
        );

        // Server-side apply of an undecodable object (kube-apiserver 1.37's answer).
        let r = rejection(&status(500, &[], "failed to convert new object (ns/x-agent; apps/v1, Kind=DaemonSet) to proper version: unable to convert unstructured object to apps/v1, Kind=DaemonSet: quantities must match the regular expression")).unwrap();
        assert!(!r.spec_fields_only);
        assert!(r.message.contains("quantities must match"), "{}", r.message);

        // Not a verdict on the object: retried, not reported.
        for code in [403, 404, 409, 500, 504] {
            assert_eq!(rejection(&status(code, &[], "x")), None, "{code}");
        }
    }
}
