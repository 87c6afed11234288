//! `shoal validate FILE...`: validates service specs and node configs.

use std::path::PathBuf;
use std::process::ExitCode;

use shoal_config::{ConfigError, Document, Kind};

/// Arguments of `shoal validate`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// Files to check (service specs or node configs).
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Treat every file as this kind instead of telling them apart by their keys.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// Print nothing for valid files.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum KindArg {
    Service,
    Node,
}

/// Validates every file; exit code 0 when all are valid, 1 otherwise.
pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let kind = args.kind.map(|k| match k {
        KindArg::Service => Kind::Service,
        KindArg::Node => Kind::Node,
    });
    let mut failed = 0usize;
    for file in &args.files {
        match shoal_config::load_file(file, kind) {
            Ok(doc) => {
                if !args.quiet {
                    let what = match doc {
                        Document::Service(s) => format!("service `{}`", s.name),
                        Document::Node(_) => "node config".to_string(),
                    };
                    println!("{}: ok ({what})", file.display());
                }
            }
            Err(ConfigError::Invalid(diags)) => {
                failed += 1;
                for d in &diags.0 {
                    println!("{d}");
                }
                println!("{}: {} error(s)", file.display(), diags.0.len());
            }
            Err(e) => {
                failed += 1;
                println!("{e}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
