//! `shoal`, the one binary: the agent that runs on every host, and the operator's CLI.
//!
//! This crate owns the command line (clap), the HTTP API, process wiring, signals and telemetry;
//! it is the only crate that uses `anyhow`. Each subcommand lives in its own module.

mod agent;
mod api;
mod api_instances;
mod api_services;
mod cluster;
mod cmd_ca;
mod cmd_nodes;
mod cmd_ps;
mod cmd_services;
mod cmd_validate;
mod mesh;
mod metrics;
mod orchestrator;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// shoal: a container orchestrator with no central manager.
#[derive(Parser, Debug)]
#[command(name = "shoal", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check service specs and node configs; print every mistake with its line and column.
    Validate(cmd_validate::Args),
    /// The cluster authority: `shoal ca init --dir DIR`.
    Ca(cmd_ca::CaArgs),
    /// Node certificates: `shoal cert issue --ca DIR --name NAME --out OUT`.
    Cert(cmd_ca::CertArgs),
    /// Run the agent: join the cluster through the seeds and serve the HTTP API.
    Agent(agent::Args),
    /// List the cluster's members as a running agent sees them.
    Nodes(cmd_nodes::Args),
    /// Create or update a service from a spec file.
    Deploy(cmd_services::DeployArgs),
    /// List the services (desired state).
    Services(cmd_services::ServicesArgs),
    /// Remove a service.
    Rm(cmd_services::RmArgs),
    /// Show which node leads (holds the majority lease), or why none does.
    Leader(cmd_services::LeaderArgs),
    /// List instances: service, slot, node, state, readiness, restarts, version, address.
    Ps(cmd_ps::PsArgs),
    /// Change a service's replica count.
    Scale(cmd_ps::ScaleArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(args) => cmd_validate::run(args),
        Command::Ca(args) => cmd_ca::run_ca(args),
        Command::Cert(args) => cmd_ca::run_cert(args),
        Command::Agent(args) => agent::run(args),
        Command::Nodes(args) => cmd_nodes::run(args),
        Command::Deploy(args) => cmd_services::deploy(args),
        Command::Services(args) => cmd_services::services(args),
        Command::Rm(args) => cmd_services::rm(args),
        Command::Leader(args) => cmd_services::leader(args),
        Command::Ps(args) => cmd_ps::ps(args),
        Command::Scale(args) => cmd_ps::scale(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
