//! Prints the BioMonitor CRD generated from the Rust types, or (`--update`)
//! rewrites the copies committed in the repository.

use std::path::PathBuf;

use bio_operator::crd::{crd_yaml, CRD_FILE_NAME};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Print the BioMonitor CustomResourceDefinition as YAML")]
struct Args {
    /// Rewrite crds/ and charts/bio-exporter/crds/ in this repository instead of printing.
    #[arg(long)]
    update: bool,
}

/// Repository paths of the committed copies (the unit tests check both).
fn committed_copies() -> [PathBuf; 2] {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    [
        root.join("crds").join(CRD_FILE_NAME),
        root.join("charts/bio-exporter/crds").join(CRD_FILE_NAME),
    ]
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let yaml = crd_yaml();
    if !args.update {
        print!("{yaml}");
        return Ok(());
    }
    for path in committed_copies() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, &yaml)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
