//! bio-exporter's Kubernetes operator: reconciles `BioMonitor` objects into
//! node-agent DaemonSets, their Service, ServiceMonitor and RBAC.
//!
//! The pure parts (API types, desired-object builders, conflict rule,
//! validation, condition computation) are separate from the parts that talk to
//! the API server (controller, leader election) so they can be tested without
//! a cluster.

pub mod conditions;
pub mod conflict;
pub mod controller;
pub mod crd;
pub mod error;
pub mod http;
pub mod install;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod resources;
pub mod settings;
pub mod telemetry;
pub mod validate;

pub use crate::error::{Error, Result};
