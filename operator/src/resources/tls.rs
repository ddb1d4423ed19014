//! The operator's own certificates for the agents' TLS: one CA per
//! BioMonitor (its key only in the CA Secret) and a serving certificate for
//! the agent Service's DNS names.
//!
//! Issuing is not a pure function of the spec (keys are random, validity
//! depends on the clock), so this is split in two: [`decide`] is pure (what
//! exists, the clock and the lifetimes in; what to issue and when to look
//! again out) and carries the rotation rules the unit tests pin down;
//! [`plan`] reads the existing Secret contents, asks [`decide`] and generates
//! whatever it said.
//!
//! Rotation, without a failed scrape:
//! - the serving certificate is renewed at 2/3 of its lifetime;
//! - the CA is replaced at 4/5 of its lifetime. Prometheus verifies with the
//!   bundle in the serving Secret's `ca.crt`, which keeps every CA that has
//!   not expired, so certificates of the old CA stay trusted;
//! - a renewal waits until the newest CA has been in the bundle for
//!   [`CA_PROPAGATION`], so Prometheus has reloaded it before it is needed
//!   (unless waiting would let the current certificate expire);
//! - no serving certificate outlives the CA that signed it.

use std::{collections::BTreeMap, time::Duration};

use super::child_meta;
use crate::{crd::BioMonitor, names, settings};
use k8s_openapi::{api::core::v1::Secret, ByteString};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// Keys of the CA Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
/// Every CA certificate that has not expired yet, newest first.
pub const CA_BUNDLE_KEY: &str = "bundle.crt";
/// Keys of the serving Secret (the `kubernetes.io/tls` layout plus the CA
/// bundle, as cert-manager writes it).
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";
pub const TLS_CA_KEY: &str = "ca.crt";

/// How long a new CA is in the bundle before a renewal is signed by it:
/// time for the Prometheus Operator to copy the Secret into Prometheus'
/// config and for Prometheus to reload it.
pub const CA_PROPAGATION: i64 = 3600;
/// New certificates start this much in the past, for clocks running behind.
const BACKDATE: i64 = 60;

/// Seconds since the Unix epoch.
pub type UnixTime = i64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub ca: Duration,
    pub serving: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            ca: settings::default_duration(settings::DEFAULT_CA_VALIDITY),
            serving: settings::default_duration(settings::DEFAULT_SERVING_CERT_VALIDITY),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("time {0} is out of range")]
    TimeOutOfRange(UnixTime),
}

/// Validity of one certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: UnixTime,
    pub not_after: UnixTime,
}

impl Validity {
    /// The point `num/den` of the way through the lifetime.
    fn fraction(&self, num: i64, den: i64) -> UnixTime {
        self.not_before + (self.not_after - self.not_before) * num / den
    }

    fn ca_rotation_due(&self) -> UnixTime {
        self.fraction(4, 5)
    }

    fn serving_renewal_due(&self) -> UnixTime {
        self.fraction(2, 3)
    }
}

/// What [`decide`] needs to know about the serving certificate in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingInfo {
    pub validity: Validity,
    pub dns_names: Vec<String>,
    /// Signed by a CA in the current bundle.
    pub trusted: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaAction {
    Keep,
    /// None there, or unusable (unparseable, key does not match).
    Create,
    /// Past 4/5 of its lifetime: a new one joins the bundle.
    Rotate,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IssueReason {
    /// None there, or unusable.
    Missing,
    /// The Service's DNS names are not exactly the certificate's.
    NamesChanged,
    /// Its CA is not in the bundle (e.g. the CA Secret was deleted).
    NotTrusted,
    /// Past 2/3 of its lifetime.
    Renewal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServingAction {
    Keep,
    Issue(IssueReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub ca: CaAction,
    pub serving: ServingAction,
    /// When something will be due; the reconcile is requeued for then.
    pub recheck_at: UnixTime,
}

/// The rotation rules. `ca` is the newest CA, `serving` the certificate in
/// place; `None` for what is missing or unusable.
pub fn decide(
    ca: Option<Validity>,
    serving: Option<&ServingInfo>,
    dns_names: &[String],
    now: UnixTime,
    lifetimes: &Lifetimes,
) -> Decision {
    let ca_action = match ca {
        None => CaAction::Create,
        Some(v) if now >= v.ca_rotation_due() => CaAction::Rotate,
        Some(_) => CaAction::Keep,
    };
    // The CA the next serving certificate would be signed by.
    let signer = match ca_action {
        CaAction::Keep => ca.expect("Keep implies a CA"),
        CaAction::Create | CaAction::Rotate => new_ca_validity(now, lifetimes),
    };
    let signer_usable_at = signer.not_before + BACKDATE + CA_PROPAGATION;

    let mut recheck_at = signer.ca_rotation_due();
    let serving_action = match serving {
        None => ServingAction::Issue(IssueReason::Missing),
        Some(s) if !same_names(&s.dns_names, dns_names) => {
            ServingAction::Issue(IssueReason::NamesChanged)
        }
        Some(s) if ca_action == CaAction::Create || !s.trusted => {
            ServingAction::Issue(IssueReason::NotTrusted)
        }
        Some(s) => {
            let due = s.validity.serving_renewal_due();
            if now < due {
                recheck_at = recheck_at.min(due);
                ServingAction::Keep
            } else if now < signer_usable_at && signer_usable_at < s.validity.not_after {
                // Prometheus may not trust the newest CA yet, and the
                // current certificate is good until then.
                recheck_at = recheck_at.min(signer_usable_at);
                ServingAction::Keep
            } else {
                ServingAction::Issue(IssueReason::Renewal)
            }
        }
    };
    if let ServingAction::Issue(_) = serving_action {
        recheck_at =
            recheck_at.min(new_serving_validity(now, lifetimes, &signer).serving_renewal_due());
    }
    Decision {
        ca: ca_action,
        serving: serving_action,
        recheck_at,
    }
}

fn same_names(have: &[String], want: &[String]) -> bool {
    let mut have = have.to_vec();
    let mut want = want.to_vec();
    have.sort();
    want.sort();
    have == want
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4)
}

fn new_ca_validity(now: UnixTime, lifetimes: &Lifetimes) -> Validity {
    Validity {
        not_before: now - BACKDATE,
        not_after: now.saturating_add(secs(lifetimes.ca)),
    }
}

/// Never past the signer's own expiry: a chain is only valid while every
/// certificate in it is.
fn new_serving_validity(now: UnixTime, lifetimes: &Lifetimes, signer: &Validity) -> Validity {
    Validity {
        not_before: now - BACKDATE,
        not_after: now
            .saturating_add(secs(lifetimes.serving))
            .min(signer.not_after),
    }
}

/// Secret contents after [`plan`]: what to apply.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsPlan {
    pub decision: Decision,
    /// Of the serving certificate that will be in place.
    pub serving_validity: Validity,
    pub ca_data: BTreeMap<String, ByteString>,
    pub serving_data: BTreeMap<String, ByteString>,
}

type SecretData = BTreeMap<String, ByteString>;

/// A CA certificate with its key, as read from the CA Secret.
struct Ca {
    cert_pem: String,
    key: KeyPair,
    validity: Validity,
}

/// Reads the existing Secrets (`None`: absent), decides with [`decide`] and
/// generates what it asks for. `subject` names the BioMonitor in the CA's
/// common name (for humans reading the certificate).
pub fn plan(
    ca_secret: Option<&SecretData>,
    serving_secret: Option<&SecretData>,
    dns_names: &[String],
    subject: &str,
    now: UnixTime,
    lifetimes: &Lifetimes,
) -> Result<TlsPlan, TlsError> {
    let current_ca = ca_secret.and_then(read_ca);
    // The bundle: the newest CA plus every older one that has not expired.
    let mut bundle: Vec<Vec<u8>> = Vec::new();
    for data in ca_secret
        .iter()
        .flat_map(|d| [d.get(CA_CERT_KEY), d.get(CA_BUNDLE_KEY)])
    {
        for der in pem_certs(data.map(|b| b.0.as_slice()).unwrap_or_default()) {
            let alive = X509Certificate::from_der(&der)
                .is_ok_and(|(_, c)| c.validity().not_after.timestamp() > now);
            if alive && !bundle.contains(&der) {
                bundle.push(der);
            }
        }
    }
    if current_ca.is_none() {
        // Nothing can be signed with those any more; start over.
        bundle.clear();
    }
    let serving = serving_secret.and_then(|d| read_serving(d, &bundle));
    let decision = decide(
        current_ca.as_ref().map(|c| c.validity),
        serving.as_ref().map(|(info, _)| info),
        dns_names,
        now,
        lifetimes,
    );

    let ca = match (decision.ca, current_ca) {
        (CaAction::Keep, Some(ca)) => ca,
        _ => {
            let ca = new_ca(subject, now, lifetimes)?;
            bundle.insert(0, pem_to_der(&ca.cert_pem));
            ca
        }
    };
    // LF line endings, as rcgen writes the CA certificate: a bundle of one
    // is byte for byte the CA Secret's ca.crt.
    let lf = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    let bundle_pem: String = bundle
        .iter()
        .map(|der| pem::encode_config(&pem::Pem::new("CERTIFICATE", der.clone()), lf))
        .collect();

    let (serving_validity, (tls_crt, tls_key)) = match (decision.serving, serving) {
        (ServingAction::Keep, Some((info, pair))) => (info.validity, pair),
        _ => (
            new_serving_validity(now, lifetimes, &ca.validity),
            new_serving(&ca, dns_names, now, lifetimes)?,
        ),
    };

    let ca_data = BTreeMap::from([
        (CA_CERT_KEY.to_string(), bytes(&ca.cert_pem)),
        (CA_KEY_KEY.to_string(), bytes(&ca.key.serialize_pem())),
        (CA_BUNDLE_KEY.to_string(), bytes(&bundle_pem)),
    ]);
    let serving_data = BTreeMap::from([
        (TLS_CERT_KEY.to_string(), bytes(&tls_crt)),
        (TLS_KEY_KEY.to_string(), bytes(&tls_key)),
        (TLS_CA_KEY.to_string(), bytes(&bundle_pem)),
    ]);
    Ok(TlsPlan {
        decision,
        serving_validity,
        ca_data,
        serving_data,
    })
}

/// The CA and serving Secrets holding a [`plan`], as the operator applies
/// them. Both owned by the BioMonitor, so they go with it.
pub fn secrets(bm: &BioMonitor, plan: &TlsPlan) -> crate::Result<(Secret, Secret)> {
    let ca = Secret {
        metadata: child_meta(bm, names::ca_secret_name(bm))?,
        type_: Some("Opaque".into()),
        data: Some(plan.ca_data.clone()),
        ..Secret::default()
    };
    let serving = Secret {
        metadata: child_meta(bm, names::serving_secret_name(bm))?,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(plan.serving_data.clone()),
        ..Secret::default()
    };
    Ok((ca, serving))
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn text(data: &SecretData, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

/// DER of every CERTIFICATE block in `pem`; anything unreadable is skipped.
fn pem_certs(pem: &[u8]) -> Vec<Vec<u8>> {
    pem::parse_many(pem)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect()
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    pem_certs(pem.as_bytes())
        .into_iter()
        .next()
        .unwrap_or_default()
}

fn validity_of(cert: &X509Certificate<'_>) -> Validity {
    Validity {
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    }
}

/// True when `key` is the private half of `cert`'s public key.
fn key_matches(cert: &X509Certificate<'_>, key: &KeyPair) -> bool {
    use rcgen::PublicKeyData;
    cert.public_key().raw == key.subject_public_key_info().as_slice()
}

fn read_ca(data: &SecretData) -> Option<Ca> {
    let cert_pem = text(data, CA_CERT_KEY)?;
    let key = KeyPair::from_pem(&text(data, CA_KEY_KEY)?).ok()?;
    let der = pem_to_der(&cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    if !cert.is_ca() || !key_matches(&cert, &key) {
        return None;
    }
    let validity = validity_of(&cert);
    Some(Ca {
        cert_pem,
        key,
        validity,
    })
}

/// The serving certificate's facts and its PEM pair, if cert and key are
/// readable and belong together.
fn read_serving(data: &SecretData, bundle: &[Vec<u8>]) -> Option<(ServingInfo, (String, String))> {
    let cert_pem = text(data, TLS_CERT_KEY)?;
    let key_pem = text(data, TLS_KEY_KEY)?;
    let key = KeyPair::from_pem(&key_pem).ok()?;
    let der = pem_to_der(&cert_pem);
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    if !key_matches(&cert, &key) {
        return None;
    }
    let dns_names = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    // Each CA has its own subject (its common name carries its creation
    // time), so the issuer name tells which CA signed the certificate.
    let trusted = bundle.iter().any(|ca| {
        X509Certificate::from_der(ca)
            .is_ok_and(|(_, ca)| ca.subject().as_raw() == cert.issuer().as_raw())
    });
    let info = ServingInfo {
        validity: validity_of(&cert),
        dns_names,
        trusted,
    };
    Some((info, (cert_pem, key_pem)))
}

fn offset(t: UnixTime) -> Result<time::OffsetDateTime, TlsError> {
    time::OffsetDateTime::from_unix_timestamp(t).map_err(|_| TlsError::TimeOutOfRange(t))
}

fn new_ca(subject: &str, now: UnixTime, lifetimes: &Lifetimes) -> Result<Ca, TlsError> {
    let validity = new_ca_validity(now, lifetimes);
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "bio-exporter");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("bio-exporter agent CA {subject} {now}"),
    );
    // Signs serving certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = offset(validity.not_before)?;
    params.not_after = offset(validity.not_after)?;
    // ECDSA P-256: small, fast, and what rustls and Go both accept.
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key,
        validity,
    })
}

fn new_serving(
    ca: &Ca,
    dns_names: &[String],
    now: UnixTime,
    lifetimes: &Lifetimes,
) -> Result<(String, String), TlsError> {
    let validity = new_serving_validity(now, lifetimes, &ca.validity);
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    if let Some(name) = dns_names.first() {
        params
            .distinguished_name
            .push(DnType::CommonName, name.clone());
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = offset(validity.not_before)?;
    params.not_after = offset(validity.not_after)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, &ca.key)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86400;
    const T0: i64 = 1_800_000_000;

    fn names() -> Vec<String> {
        vec![
            "disks-agent".into(),
            "disks-agent.monitoring".into(),
            "disks-agent.monitoring.svc".into(),
            "disks-agent.monitoring.svc.cluster.local".into(),
        ]
    }

    fn lifetimes() -> Lifetimes {
        Lifetimes {
            ca: Duration::from_secs(1000 * DAY as u64),
            serving: Duration::from_secs(90 * DAY as u64),
        }
    }

    fn ca_from(t: i64) -> Validity {
        Validity {
            not_before: t,
            not_after: t + 1000 * DAY,
        }
    }

    fn serving_from(t: i64) -> ServingInfo {
        ServingInfo {
            validity: Validity {
                not_before: t,
                not_after: t + 90 * DAY,
            },
            dns_names: names(),
            trusted: true,
        }
    }

    fn at(ca: Option<Validity>, serving: Option<&ServingInfo>, now: i64) -> Decision {
        decide(ca, serving, &names(), now, &lifetimes())
    }

    #[test]
    fn nothing_there_creates_both() {
        let d = at(None, None, T0);
        assert_eq!(d.ca, CaAction::Create);
        assert_eq!(d.serving, ServingAction::Issue(IssueReason::Missing));
        // Next look: 2/3 through the new serving certificate's lifetime.
        assert_eq!(d.recheck_at, T0 - BACKDATE + (90 * DAY + BACKDATE) * 2 / 3);
    }

    #[test]
    fn fresh_certificates_are_kept_until_two_thirds() {
        let ca = Some(ca_from(T0));
        let s = serving_from(T0);
        let d = at(ca, Some(&s), T0 + 10 * DAY);
        assert_eq!((d.ca, d.serving), (CaAction::Keep, ServingAction::Keep));
        assert_eq!(d.recheck_at, T0 + 60 * DAY);
        // One second before 2/3: still kept; at 2/3: renewed.
        assert_eq!(
            at(ca, Some(&s), T0 + 60 * DAY - 1).serving,
            ServingAction::Keep
        );
        assert_eq!(
            at(ca, Some(&s), T0 + 60 * DAY).serving,
            ServingAction::Issue(IssueReason::Renewal)
        );
    }

    #[test]
    fn ca_rotates_at_four_fifths_and_renewals_wait_for_propagation() {
        let ca = Some(ca_from(T0));
        // Serving renewed recently by the old CA; the CA is due.
        let s = serving_from(T0 + 790 * DAY);
        let d = at(ca, Some(&s), T0 + 800 * DAY);
        assert_eq!(d.ca, CaAction::Rotate);
        // The certificate of the old CA stays: the old CA stays in the bundle.
        assert_eq!(d.serving, ServingAction::Keep);

        // A renewal due right after a rotation waits until the new CA has
        // been published for CA_PROPAGATION...
        let new_ca = Validity {
            not_before: T0 + 800 * DAY - BACKDATE,
            not_after: T0 + 1800 * DAY,
        };
        let s = serving_from(T0 + 740 * DAY);
        let now = T0 + 800 * DAY + 60;
        let d = at(Some(new_ca), Some(&s), now);
        assert_eq!((d.ca, d.serving), (CaAction::Keep, ServingAction::Keep));
        assert_eq!(d.recheck_at, T0 + 800 * DAY + CA_PROPAGATION);
        // ...and happens then.
        let d = at(Some(new_ca), Some(&s), T0 + 800 * DAY + CA_PROPAGATION);
        assert_eq!(d.serving, ServingAction::Issue(IssueReason::Renewal));
    }

    #[test]
    fn a_renewal_never_waits_past_expiry() {
        // The certificate expires before the new CA has propagated: renew now.
        let new_ca = Validity {
            not_before: T0 - BACKDATE,
            not_after: T0 + 1000 * DAY,
        };
        let s = serving_from(T0 - 90 * DAY + 600);
        let d = at(Some(new_ca), Some(&s), T0 + 60);
        assert_eq!(d.serving, ServingAction::Issue(IssueReason::Renewal));
    }

    #[test]
    fn changed_names_untrusted_or_new_ca_reissue_at_once() {
        let ca = Some(ca_from(T0));
        let mut s = serving_from(T0);
        s.dns_names.pop();
        assert_eq!(
            at(ca, Some(&s), T0 + DAY).serving,
            ServingAction::Issue(IssueReason::NamesChanged)
        );
        // Same names in another order are the same names.
        let mut s = serving_from(T0);
        s.dns_names.reverse();
        assert_eq!(at(ca, Some(&s), T0 + DAY).serving, ServingAction::Keep);

        let mut s = serving_from(T0);
        s.trusted = false;
        assert_eq!(
            at(ca, Some(&s), T0 + DAY).serving,
            ServingAction::Issue(IssueReason::NotTrusted)
        );
        // The CA Secret was lost: a new CA, so the old certificate cannot be trusted.
        let d = at(None, Some(&serving_from(T0)), T0 + DAY);
        assert_eq!(d.ca, CaAction::Create);
        assert_eq!(d.serving, ServingAction::Issue(IssueReason::NotTrusted));
    }

    #[test]
    fn recheck_is_the_earlier_of_both_due_times() {
        // CA due (4/5 of 1000 days) before the serving certificate is.
        let ca = Some(ca_from(T0));
        let s = serving_from(T0 + 780 * DAY);
        assert_eq!(at(ca, Some(&s), T0 + 781 * DAY).recheck_at, T0 + 800 * DAY);
    }

    #[test]
    fn serving_never_outlives_its_ca() {
        let ca = Validity {
            not_before: T0,
            not_after: T0 + 30 * DAY,
        };
        let v = new_serving_validity(T0 + DAY, &lifetimes(), &ca);
        assert_eq!(v.not_after, T0 + 30 * DAY);
    }

    // ------------------------------------------- generation, real crypto --

    fn parse(pem: &[u8]) -> Vec<Vec<u8>> {
        pem_certs(pem)
    }

    fn get<'a>(data: &'a SecretData, key: &str) -> &'a [u8] {
        &data[key].0
    }

    #[test]
    fn first_plan_issues_a_ca_and_a_serving_certificate_for_the_service_names() {
        let now = 1_750_000_000;
        let p = plan(None, None, &names(), "monitoring/disks", now, &lifetimes()).unwrap();
        let ca_der = &parse(get(&p.ca_data, CA_CERT_KEY))[0];
        let (_, ca) = X509Certificate::from_der(ca_der).unwrap();
        assert!(ca.is_ca());
        assert!(ca.subject().to_string().contains("monitoring/disks"));
        assert_eq!(ca.validity().not_after.timestamp(), now + 1000 * DAY);
        // The key is only in the CA Secret.
        assert!(p.ca_data.contains_key(CA_KEY_KEY));
        assert!(!p.serving_data.values().any(|v| v == &p.ca_data[CA_KEY_KEY]));

        let leaf_der = &parse(get(&p.serving_data, TLS_CERT_KEY))[0];
        let (_, leaf) = X509Certificate::from_der(leaf_der).unwrap();
        assert!(!leaf.is_ca());
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        assert_eq!(leaf.validity().not_after.timestamp(), now + 90 * DAY);
        let (info, _) = read_serving(&p.serving_data, std::slice::from_ref(ca_der)).unwrap();
        assert_eq!(info.dns_names, names());
        assert!(info.trusted);
        assert_eq!(
            parse(get(&p.serving_data, TLS_CA_KEY)),
            vec![ca_der.clone()]
        );
        assert_eq!(
            get(&p.serving_data, TLS_CA_KEY),
            get(&p.ca_data, CA_CERT_KEY),
            "a bundle of one CA is the CA certificate, byte for byte"
        );
    }

    #[test]
    fn a_second_plan_keeps_everything_byte_for_byte() {
        let now = 1_750_000_000;
        let first = plan(None, None, &names(), "ns/x", now, &lifetimes()).unwrap();
        let second = plan(
            Some(&first.ca_data),
            Some(&first.serving_data),
            &names(),
            "ns/x",
            now + DAY,
            &lifetimes(),
        )
        .unwrap();
        assert_eq!(second.decision.ca, CaAction::Keep);
        assert_eq!(second.decision.serving, ServingAction::Keep);
        assert_eq!(second.ca_data, first.ca_data);
        assert_eq!(second.serving_validity, first.serving_validity);
        assert_eq!(second.serving_data, first.serving_data);
    }

    #[test]
    fn ca_rotation_keeps_the_old_ca_in_the_bundle_until_it_expires() {
        let t = 1_750_000_000;
        let first = plan(None, None, &names(), "ns/x", t, &lifetimes()).unwrap();
        let old_ca = parse(get(&first.ca_data, CA_CERT_KEY)).remove(0);
        let rotated = plan(
            Some(&first.ca_data),
            Some(&first.serving_data),
            &names(),
            "ns/x",
            t + 850 * DAY,
            &lifetimes(),
        )
        .unwrap();
        assert_eq!(rotated.decision.ca, CaAction::Rotate);
        let new_ca = parse(get(&rotated.ca_data, CA_CERT_KEY)).remove(0);
        assert_ne!(new_ca, old_ca);
        let bundle = parse(get(&rotated.serving_data, TLS_CA_KEY));
        assert_eq!(bundle, vec![new_ca.clone(), old_ca.clone()]);
        assert_eq!(parse(get(&rotated.ca_data, CA_BUNDLE_KEY)), bundle);

        // Once the old CA has expired it leaves the bundle.
        let later = plan(
            Some(&rotated.ca_data),
            Some(&rotated.serving_data),
            &names(),
            "ns/x",
            t + 1001 * DAY,
            &lifetimes(),
        )
        .unwrap();
        assert_eq!(
            parse(get(&later.serving_data, TLS_CA_KEY)),
            vec![new_ca.clone()]
        );
        // The serving certificate is now signed by the new CA.
        let leaf_der = parse(get(&later.serving_data, TLS_CERT_KEY)).remove(0);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let (_, ca) = X509Certificate::from_der(&new_ca).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
    }

    #[test]
    fn secrets_are_owned_and_typed() {
        let bm = crate::resources::test_support::monitor("disks", Default::default());
        let p = plan(
            None,
            None,
            &names(),
            "monitoring/disks",
            1_750_000_000,
            &lifetimes(),
        )
        .unwrap();
        let (ca, serving) = secrets(&bm, &p).unwrap();
        assert_eq!(ca.metadata.name.as_deref(), Some("disks-agent-ca"));
        assert_eq!(serving.metadata.name.as_deref(), Some("disks-agent-tls"));
        assert_eq!(serving.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(
            serving.data.unwrap().keys().collect::<Vec<_>>(),
            ["ca.crt", "tls.crt", "tls.key"]
        );
        for s in [&ca.metadata, &serving.metadata] {
            assert_eq!(s.owner_references.as_ref().unwrap()[0].uid, "uid-disks");
        }
    }

    #[test]
    fn garbage_in_the_secrets_is_replaced_not_an_error() {
        let junk = BTreeMap::from([
            (CA_CERT_KEY.to_string(), bytes("not a certificate")),
            (CA_KEY_KEY.to_string(), bytes("not a key")),
            (TLS_CERT_KEY.to_string(), bytes("")),
        ]);
        let p = plan(
            Some(&junk),
            Some(&junk),
            &names(),
            "ns/x",
            1_750_000_000,
            &lifetimes(),
        )
        .unwrap();
        assert_eq!(p.decision.ca, CaAction::Create);
        assert_eq!(
            p.decision.serving,
            ServingAction::Issue(IssueReason::Missing)
        );

        // A key that does not belong to the certificate is as good as none.
        let good = plan(None, None, &names(), "ns/x", 1_750_000_000, &lifetimes()).unwrap();
        let other = plan(None, None, &names(), "ns/y", 1_750_000_000, &lifetimes()).unwrap();
        let mut mixed = good.serving_data.clone();
        mixed.insert(TLS_KEY_KEY.into(), other.serving_data[TLS_KEY_KEY].clone());
        let p = plan(
            Some(&good.ca_data),
            Some(&mixed),
            &names(),
            "ns/x",
            1_750_000_100,
            &lifetimes(),
        )
        .unwrap();
        assert_eq!(
            (p.decision.ca, p.decision.serving),
            (CaAction::Keep, ServingAction::Issue(IssueReason::Missing))
        );
    }
}
