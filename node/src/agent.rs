//! `shoal agent`: loads the node config (flags override the file), loads or (with `--dev`)
//! creates the node's credentials, joins the cluster through its seeds over Noise-encrypted
//! SWIM, serves the HTTP API, and leaves gracefully on SIGTERM / Ctrl-C.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use shoal_config::{LogFormat, NodeConfig, RuntimeKind};
use shoal_membership::cert::{self, NodeCredentials};
use shoal_membership::core::{CoreConfig, MembershipCore, PeerMeta};
use shoal_membership::driver::{self, NoiseTransport};
use shoal_membership::identity::NodeIdentity;
use shoal_membership::link::{LinkMetrics, LinkOptions, Links};

use crate::api::{self, ApiState};

/// Arguments of `shoal agent`.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct Args {
    /// Node config file (TOML); flags override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node name (default: the name in the node's certificate).
    #[arg(long)]
    name: Option<String>,
    /// Gossip and stream address (UDP and TCP), e.g. 127.0.0.1:7946.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Address other nodes reach this one at (default: --bind).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// HTTP API address (default 127.0.0.1:7070).
    #[arg(long)]
    api: Option<SocketAddr>,
    /// Comma-separated host:port of nodes to join through.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<String>>,
    /// A label KEY=VALUE (repeatable); adds to the config's and the certificate's labels.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Where the node keeps its state.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory with node.key, node.crt and ca.crt (default DATA_DIR/certs).
    #[arg(long)]
    cert_dir: Option<PathBuf>,
    /// Container runtime.
    #[arg(long, value_enum)]
    runtime: Option<RuntimeArg>,
    /// Throw-away cluster: create a CA and a certificate in the data dir if missing, run a
    /// one-node cluster, write DATA_DIR/admin.token.
    #[arg(long)]
    dev: bool,
    /// Start even if node.key does not match node.crt (for refusal tests only: peers will
    /// refuse this node).
    #[arg(long, hide = true, env = "SHOAL_INSECURE_SKIP_KEY_CHECK")]
    insecure_skip_key_check: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RuntimeArg {
    Docker,
    Process,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("`{s}` has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// The config file with the flags applied, validated.
fn effective_config(args: &Args) -> anyhow::Result<NodeConfig> {
    let mut cfg = match &args.config {
        Some(path) => shoal_config::load_node_config(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => NodeConfig::default(),
    };
    if let Some(v) = &args.name {
        cfg.name = Some(v.clone());
    }
    if let Some(v) = args.bind {
        cfg.bind = v;
    }
    if let Some(v) = args.advertise {
        cfg.advertise = Some(v);
    }
    if let Some(v) = args.api {
        cfg.api = v;
    }
    if let Some(v) = &args.seeds {
        cfg.seeds = v
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    for (k, v) in &args.labels {
        cfg.labels.insert(k.clone(), v.clone());
    }
    if let Some(v) = &args.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = &args.cert_dir {
        cfg.cert_dir = Some(v.clone());
    }
    if let Some(r) = args.runtime {
        cfg.runtime = match r {
            RuntimeArg::Docker => RuntimeKind::Docker,
            RuntimeArg::Process => RuntimeKind::Process,
        };
    }
    if args.dev {
        cfg.seeds.clear();
    }
    let violations = shoal_config::validate_node(&cfg);
    if !violations.is_empty() {
        let text: Vec<String> = violations
            .iter()
            .map(|v| format!("  {}: {}", v.path, v.message))
            .collect();
        bail!("invalid node config:\n{}", text.join("\n"));
    }
    if cfg.bind.ip().is_unspecified() && cfg.advertise.is_none() {
        bail!(
            "--bind {} needs --advertise: other nodes cannot reach 0.0.0.0",
            cfg.bind
        );
    }
    Ok(cfg)
}

/// `--dev`: a throw-away CA and certificate under the data dir (created once, reused after).
fn dev_credentials(cfg: &NodeConfig) -> anyhow::Result<()> {
    let ca_dir = cfg.data_dir.join("ca");
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    if !ca_dir.join(cert::files::CA_CERT).exists() {
        cert::ca_init(&ca_dir).context("creating the dev cluster authority")?;
    }
    let cert_dir = cfg.cert_dir();
    if !cert_dir.join(cert::files::NODE_CERT).exists() {
        let name = cfg.name.clone().unwrap_or_else(|| "dev".to_string());
        cert::cert_issue(
            &ca_dir,
            &name,
            &cfg.labels,
            Duration::from_secs(365 * 24 * 3600),
            &cert_dir,
        )
        .context("issuing the dev node certificate")?;
    }
    let token = cfg.data_dir.join("admin.token");
    if !token.exists() {
        std::fs::copy(ca_dir.join(cert::files::ADMIN_TOKEN), &token)
            .with_context(|| format!("writing {}", token.display()))?;
    }
    Ok(())
}

fn load_credentials(dir: &Path, skip_key_check: bool) -> anyhow::Result<NodeCredentials> {
    let creds = if skip_key_check {
        NodeCredentials::load_unchecked(dir)
    } else {
        NodeCredentials::load(dir)
    };
    creds.with_context(|| {
        format!(
            "loading the node credentials from {} (create them with `shoal cert issue`, or run \
             `shoal agent --dev`)",
            dir.display()
        )
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn resolve_seeds(seeds: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for s in seeds {
        match tokio::net::lookup_host(s.as_str()).await {
            Ok(addrs) => out.extend(addrs.take(1)),
            Err(e) => tracing::warn!(seed = %s, error = %e, "cannot resolve seed; skipping it"),
        }
    }
    out
}

/// Runs the agent until SIGTERM / Ctrl-C.
pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = effective_config(&args)?;
    init_tracing(cfg.log_format);
    if args.dev {
        dev_credentials(&cfg)?;
    }
    let creds = Arc::new(load_credentials(
        &cfg.cert_dir(),
        args.insecure_skip_key_check,
    )?);
    if let Some(problem) = creds.own_cert_problem(cert::unix_now()) {
        tracing::warn!(%problem, "this node's own certificate will be refused by its peers");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(cfg, creds))?;
    Ok(ExitCode::SUCCESS)
}

async fn serve(cfg: NodeConfig, creds: Arc<NodeCredentials>) -> anyhow::Result<()> {
    // Bind the API first: a node that cannot serve its API must not join the cluster.
    let api_listener = std::net::TcpListener::bind(cfg.api)
        .with_context(|| format!("binding the HTTP API on {}", cfg.api))?;
    api_listener.set_nonblocking(true)?;
    let link_metrics = Arc::new(LinkMetrics::default());
    let advertise = cfg.advertise_addr();
    let opts = LinkOptions {
        advertise: Some(advertise),
        ..LinkOptions::default()
    };
    let (udp, streams) = Links::bind_with(cfg.bind, creds.clone(), link_metrics.clone(), opts)
        .await
        .with_context(|| format!("binding the gossip port {}", cfg.bind))?;
    // With port 0 the OS picked one; advertise what was bound.
    let advertise = if advertise.port() == 0 {
        SocketAddr::new(advertise.ip(), udp.local_addr().port())
    } else {
        advertise
    };
    let transport = Arc::new(NoiseTransport::new(udp));

    let boot_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let identity = NodeIdentity::new(creds.cert.node_id, advertise, boot_epoch);
    let mut labels: BTreeMap<String, String> = creds.cert.labels.clone();
    labels.extend(cfg.labels.clone());
    let name = cfg.name.clone().unwrap_or_else(|| creds.cert.name.clone());
    if name != creds.cert.name {
        tracing::warn!(
            config = %name, certificate = %creds.cert.name,
            "the configured name differs from the certificate's; peers see the certificate's"
        );
    }
    let cluster = crate::cluster::Cluster::open(
        &cfg.data_dir,
        name.clone(),
        creds.clone(),
        link_metrics.clone(),
        crate::cluster::lease_config_from_env(),
    )?;
    let meta = PeerMeta {
        name,
        labels: labels.clone(),
    };
    let seeds = resolve_seeds(&cfg.seeds).await;
    let core_cfg =
        CoreConfig::from_timing(&cfg.membership.timing(), NoiseTransport::MAX_SWIM_PACKET);
    let core = MembershipCore::with_broadcasts(
        identity,
        core_cfg,
        seeds.clone(),
        boot_epoch,
        meta,
        cluster.broadcasts(),
    );
    let membership = driver::spawn(core, transport);
    cluster.start(membership.clone(), streams, labels);
    let port = Arc::new(crate::orchestrator::Port::new(
        cluster.clone(),
        membership.clone(),
        &cfg,
    ));
    let orchestrator = crate::orchestrator::start(&cfg, port)?;
    let mesh = crate::mesh::start(
        cluster.clone(),
        creds.clone(),
        link_metrics.clone(),
        advertise.ip(),
        advertise,
    );
    let _ = cluster.data_plane.set(mesh.proxy.clone());
    tracing::info!(
        node_id = %cert::hex(&creds.cert.node_id), gossip = %advertise, api = %cfg.api,
        seeds = ?seeds, "shoal agent started"
    );

    let state = ApiState {
        membership: membership.clone(),
        links: link_metrics,
        cluster,
    };
    let server = api::server(api_listener, state)
        .with_context(|| format!("starting the HTTP API on {}", cfg.api))?;
    let server_handle = server.handle();
    let server_task = tokio::spawn(server);

    wait_for_signal().await;
    tracing::info!("leaving the cluster");
    membership.shutdown().await;
    // Give the goodbye datagrams a moment to be sealed and sent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server_handle.stop(true).await;
    let _ = server_task.await;
    // The actors stop; instances keep running and are adopted by the next agent.
    orchestrator.stop();
    drop(mesh);
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the agent");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(
            &file,
            "bind = \"127.0.0.1:8000\"\napi = \"127.0.0.1:8001\"\nseeds = [\"127.0.0.1:9000\"]\n\
             [labels]\nzone = \"a\"\n",
        )
        .unwrap();
        let args = Args {
            config: Some(file),
            bind: Some("127.0.0.1:8100".parse().unwrap()),
            seeds: Some(vec!["127.0.0.1:9100".into(), " ".into()]),
            labels: vec![("rack".into(), "r1".into())],
            ..Args::default()
        };
        let cfg = effective_config(&args).unwrap();
        assert_eq!(cfg.bind, "127.0.0.1:8100".parse().unwrap());
        assert_eq!(cfg.api, "127.0.0.1:8001".parse().unwrap());
        assert_eq!(cfg.seeds, vec!["127.0.0.1:9100".to_string()]);
        assert_eq!(cfg.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(cfg.labels.get("rack").map(String::as_str), Some("r1"));
    }

    #[test]
    fn a_label_without_an_equals_sign_is_refused() {
        assert!(parse_label("zone").is_err());
        assert!(parse_label("=x").is_err());
        assert_eq!(parse_label("a=b=c").unwrap(), ("a".into(), "b=c".into()));
    }

    #[test]
    fn binding_the_unspecified_address_needs_an_advertised_one() {
        let args = Args {
            bind: Some("0.0.0.0:7946".parse().unwrap()),
            ..Args::default()
        };
        assert!(effective_config(&args).is_err());
    }
}
