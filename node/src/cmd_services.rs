//! `shoal deploy FILE`, `shoal services [--json]`, `shoal rm NAME`, `shoal leader`: the
//! desired-state API from the command line.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};

/// Where the agent is and how to authenticate.
#[derive(clap::Args, Debug)]
pub(crate) struct Conn {
    /// The agent's API address.
    #[arg(long, env = "SHOAL_ADDR", default_value = "127.0.0.1:7070")]
    pub(crate) addr: String,
    /// File holding the admin token (e.g. DATA_DIR/admin.token or CA_DIR/admin.token).
    #[arg(long, env = "SHOAL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The admin token itself.
    #[arg(long, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl Conn {
    pub(crate) fn token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.trim().to_string());
        }
        match &self.token_file {
            Some(p) => Ok(std::fs::read_to_string(p)
                .with_context(|| format!("reading the admin token {}", p.display()))?
                .trim()
                .to_string()),
            None => bail!("this command needs an admin token: --token-file FILE or SHOAL_TOKEN"),
        }
    }
}

/// `shoal deploy FILE`.
#[derive(clap::Args, Debug)]
pub(crate) struct DeployArgs {
    /// The service spec (TOML).
    file: PathBuf,
    #[command(flatten)]
    conn: Conn,
}

/// `shoal services`.
#[derive(clap::Args, Debug)]
pub(crate) struct ServicesArgs {
    /// Print the JSON array instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// `shoal rm NAME`.
#[derive(clap::Args, Debug)]
pub(crate) struct RmArgs {
    /// The service to remove.
    name: String,
    #[command(flatten)]
    conn: Conn,
}

/// `shoal leader`.
#[derive(clap::Args, Debug)]
pub(crate) struct LeaderArgs {
    /// Print the JSON answer.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

const MAX_BODY: u64 = 32 * 1024 * 1024;

/// One HTTP/1.1 request; returns (status, body).
pub(crate) fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> anyhow::Result<(u16, String)> {
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .with_context(|| format!("connecting to the agent at {addr} (is it running?)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n"
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let payload = match body {
        Some((ct, b)) => {
            head.push_str(&format!(
                "Content-Type: {ct}\r\nContent-Length: {}\r\n",
                b.len()
            ));
            b.to_vec()
        }
        None => {
            head.push_str("Content-Length: 0\r\n");
            Vec::new()
        }
    };
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(&payload)?;
    let mut raw = Vec::new();
    stream.take(MAX_BODY).read_to_end(&mut raw)?;
    crate::cmd_nodes::parse_response(&raw)
}

pub(crate) fn fail(status: u16, body: &str) -> anyhow::Result<ExitCode> {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) => {
            if let Some(errs) = v.get("errors").and_then(|e| e.as_array()) {
                for e in errs {
                    eprintln!("{}", e.as_str().unwrap_or_default());
                }
            } else if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                eprintln!("error: {e}");
            } else {
                eprintln!("error: HTTP {status}: {body}");
            }
        }
        Err(_) => eprintln!("error: HTTP {status}: {body}"),
    }
    Ok(ExitCode::from(1))
}

/// `shoal deploy FILE`: validated locally first (same loader as the agent), then PUT.
pub(crate) fn deploy(args: DeployArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let file = args.file.display().to_string();
    let spec = match shoal_config::load_service_str(&file, &text) {
        Ok(s) => s,
        Err(d) => {
            eprintln!("{d}");
            return Ok(ExitCode::from(1));
        }
    };
    let token = args.conn.token()?;
    let (status, body) = http(
        &args.conn.addr,
        "PUT",
        &format!("/v1/services/{}", spec.name),
        Some(&token),
        Some(("application/toml", text.as_bytes())),
    )?;
    if status != 200 {
        return fail(status, &body);
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    println!(
        "deployed {} version {} ({} replicas)",
        spec.name,
        v["version"].as_u64().unwrap_or(0),
        v["replicas"].as_u64().unwrap_or(0)
    );
    Ok(ExitCode::SUCCESS)
}

/// `shoal services`.
pub(crate) fn services(args: ServicesArgs) -> anyhow::Result<ExitCode> {
    let (status, body) = http(&args.conn.addr, "GET", "/v1/services", None, None)?;
    if status != 200 {
        return fail(status, &body);
    }
    if args.json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&body).context("the agent's answer is not a JSON array")?;
    println!(
        "{:<30} {:>8} {:>9}  UPDATED BY",
        "NAME", "VERSION", "REPLICAS"
    );
    for r in rows {
        println!(
            "{:<30} {:>8} {:>9}  {}",
            r["name"].as_str().unwrap_or("?"),
            r["version"].as_u64().unwrap_or(0),
            r["replicas"].as_u64().unwrap_or(0),
            r["updated_by"].as_str().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `shoal rm NAME`.
pub(crate) fn rm(args: RmArgs) -> anyhow::Result<ExitCode> {
    let token = args.conn.token()?;
    let (status, body) = http(
        &args.conn.addr,
        "DELETE",
        &format!("/v1/services/{}", args.name),
        Some(&token),
        None,
    )?;
    if status != 200 {
        return fail(status, &body);
    }
    println!("removed {}", args.name);
    Ok(ExitCode::SUCCESS)
}

/// `shoal leader`.
pub(crate) fn leader(args: LeaderArgs) -> anyhow::Result<ExitCode> {
    let (status, body) = http(&args.conn.addr, "GET", "/v1/leader", None, None)?;
    if status != 200 {
        return fail(status, &body);
    }
    if args.json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let v: serde_json::Value = serde_json::from_str(&body).context("bad JSON from the agent")?;
    match v["leader"].as_str() {
        Some(name) => println!(
            "leader: {name} (epoch {})",
            v["epoch"].as_u64().unwrap_or(0)
        ),
        None => println!(
            "no leader (epoch {}): {}",
            v["epoch"].as_u64().unwrap_or(0),
            v["reason"].as_str().unwrap_or("unknown")
        ),
    }
    Ok(ExitCode::SUCCESS)
}
