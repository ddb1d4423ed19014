//! Command line of the node-agent. It lives in crate bio-agent-args (node-agent/agent-args)
//! because the operator writes the DaemonSet's args from the same types; its tests, including
//! the round trip of every flag, are there.
pub use bio_agent_args::{Cli, Command, HistogramArgs, ServeArgs, VolumeArgs};

use clap::{CommandFactory, FromArgMatches};

/// Parses the process's arguments, exiting on a usage error like `Cli::parse`. The version and
/// description `--help` shows are this package's: the derive in bio-agent-args would show that
/// crate's.
pub fn parse() -> Cli {
    let command = Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .about(env!("CARGO_PKG_DESCRIPTION"));
    let matches = command.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}
