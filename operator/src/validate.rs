//! Checks the OpenAPI schema cannot express. The agent compiles the device
//! filters with the `regex` crate, so the operator compiles them the same way
//! and reports a bad one as `InvalidSpec` instead of shipping a crash-looping
//! DaemonSet.

use crate::crd::BioMonitorSpec;

/// All problems found, joined into one human-readable message.
pub fn validate_spec(spec: &BioMonitorSpec) -> Result<(), String> {
    let mut problems = Vec::new();
    for (field, patterns) in [
        ("devices.include", &spec.devices.include),
        ("devices.exclude", &spec.devices.exclude),
    ] {
        for (i, pattern) in patterns.iter().enumerate() {
            if let Err(err) = regex::Regex::new(pattern) {
                // The regex crate's messages span several lines with a caret
                // under the error; a condition message reads better on one.
                let detail = err
                    .to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                problems.push(format!(
                    "{field}[{i}] {pattern:?} is not a valid regex: {detail}"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::DeviceFilter;

    fn spec(include: &[&str], exclude: &[&str]) -> BioMonitorSpec {
        BioMonitorSpec {
            devices: DeviceFilter {
                include: include.iter().map(|s| s.to_string()).collect(),
                exclude: exclude.iter().map(|s| s.to_string()).collect(),
            },
            ..BioMonitorSpec::default()
        }
    }

    #[test]
    fn valid_filters_pass() {
        assert_eq!(
            validate_spec(&spec(&["^nvme\\d+n\\d+$", "^sd[a-z]+$"], &["^loop"])),
            Ok(())
        );
        assert_eq!(validate_spec(&BioMonitorSpec::default()), Ok(()));
    }

    #[test]
    fn every_bad_regex_is_named() {
        let err = validate_spec(&spec(&["^nvme", "sd[a-"], &["(loop"])).unwrap_err();
        assert!(err.contains("devices.include[1] \"sd[a-\""), "{err}");
        assert!(err.contains("devices.exclude[0] \"(loop\""), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
