//! `shoal ca init` and `shoal cert issue`: the cluster authority and node certificates.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use shoal_membership::cert::{self, files};

/// Arguments of `shoal ca`.
#[derive(clap::Args, Debug)]
pub(crate) struct CaArgs {
    #[command(subcommand)]
    command: CaCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CaCommand {
    /// Create a cluster authority: DIR/ca.key (0600), DIR/ca.crt and DIR/admin.token.
    Init {
        /// Directory to write into (created if missing; an existing ca.key is never overwritten).
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Arguments of `shoal cert`.
#[derive(clap::Args, Debug)]
pub(crate) struct CertArgs {
    #[command(subcommand)]
    command: CertCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CertCommand {
    /// Issue a node certificate: OUT/node.key (0600), OUT/node.crt and OUT/ca.crt.
    Issue(IssueArgs),
}

#[derive(clap::Args, Debug)]
struct IssueArgs {
    /// The cluster authority's directory (from `shoal ca init`).
    #[arg(long)]
    ca: PathBuf,
    /// The node's name (letters, digits, '-', '_', '.').
    #[arg(long)]
    name: String,
    /// A label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// How long the certificate is valid, e.g. 7d, 12h, 30m.
    #[arg(long, default_value = "7d", value_parser = parse_validity)]
    validity: Duration,
    /// Directory to write the node's files into.
    #[arg(long)]
    out: PathBuf,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    cert::validate_label(k, v).map_err(|e| e.to_string())?;
    Ok((k.to_string(), v.to_string()))
}

fn parse_validity(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 7d or 12h: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err("the validity must be at least 1s".into());
    }
    Ok(d)
}

/// Runs `shoal ca ...`.
pub(crate) fn run_ca(args: CaArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CaCommand::Init { dir } => {
            // The library error already names the file and the OS reason: flatten it into one
            // line rather than chaining the same reason twice.
            cert::ca_init(&dir).map_err(|e| {
                anyhow!(
                    "cannot create a cluster authority in {}: {e}",
                    dir.display()
                )
            })?;
            println!("cluster authority created in {}", dir.display());
            println!(
                "  {}  (private, mode 0600: keep it safe)",
                dir.join(files::CA_KEY).display()
            );
            println!(
                "  {}  (give it to every node)",
                dir.join(files::CA_CERT).display()
            );
            println!(
                "  {}  (admin credential, mode 0600)",
                dir.join(files::ADMIN_TOKEN).display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Runs `shoal cert ...`.
pub(crate) fn run_cert(args: CertArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        CertCommand::Issue(a) => {
            let mut labels = BTreeMap::new();
            for (k, v) in a.labels {
                if labels.insert(k.clone(), v).is_some() {
                    bail!("label {k:?} is given twice");
                }
            }
            let c = cert::cert_issue(&a.ca, &a.name, &labels, a.validity, &a.out)
                .map_err(|e| anyhow!("cannot issue a certificate for {:?}: {e}", a.name))?;
            println!(
                "issued {} (node id {}), valid until {}, in {}",
                c.name,
                c.node_id_hex(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(c.not_after)
                ),
                a.out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
