//! `shoal nodes`: the member table of a running agent, from its HTTP API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::api::NodeJson;

/// Arguments of `shoal nodes`.
#[derive(clap::Args, Debug)]
pub(crate) struct Args {
    /// The agent's API address.
    #[arg(long, env = "SHOAL_ADDR", default_value = "127.0.0.1:7070")]
    addr: String,
    /// Print the JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

/// The largest response body read (a member table of many thousand nodes fits).
const MAX_BODY: u64 = 32 * 1024 * 1024;

/// A plain HTTP/1.1 GET (the API is on loopback or a trusted network; no TLS yet).
pub(crate) fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let sock: SocketAddr = addr
        .to_socket_addrs()
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
        .with_context(|| format!("connecting to the agent at {addr} (is it running?)"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.take(MAX_BODY).read_to_end(&mut raw)?;
    parse_response(&raw)
}

pub(crate) fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, String)> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the agent's answer has no HTTP header")?;
    let head = std::str::from_utf8(&raw[..split]).context("the HTTP header is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line `{status_line}`"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[split + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((
        status,
        String::from_utf8(body).context("the body is not UTF-8")?,
    ))
}

fn dechunk(mut b: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk header")?;
        let size_text = std::str::from_utf8(&b[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size `{size_text}`"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Renders the member table.
fn table(nodes: &[NodeJson]) -> String {
    let rows: Vec<[String; 6]> = nodes
        .iter()
        .map(|n| {
            let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            [
                format!(
                    "{}{}",
                    n.name.as_deref().unwrap_or("?"),
                    if n.is_self { " *" } else { "" }
                ),
                n.node_id.chars().take(12).collect(),
                n.addr.to_string(),
                n.state.clone(),
                n.incarnation.to_string(),
                labels.join(","),
            ]
        })
        .collect();
    let header = ["NAME", "NODE ID", "ADDRESS", "STATE", "INC", "LABELS"];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}

/// Prints the members of the agent at `--addr`.
pub(crate) fn run(args: Args) -> anyhow::Result<ExitCode> {
    let (status, body) = http_get(&args.addr, "/v1/nodes")?;
    if status != 200 {
        bail!("the agent at {} answered {status}: {body}", args.addr);
    }
    let nodes: Vec<NodeJson> =
        serde_json::from_str(&body).context("the agent's /v1/nodes is not a member list")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        print!("{}", table(&nodes));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_and_plain_responses_are_parsed() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]";
        assert_eq!(parse_response(plain).unwrap(), (200, "[]".to_string()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, "[]".to_string()));
        assert!(parse_response(b"garbage").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[test]
    fn the_table_has_one_row_per_member_and_marks_this_node() {
        let n = NodeJson {
            name: Some("a".into()),
            node_id: "00112233445566778899aabbccddeeff".into(),
            addr: "127.0.0.1:7946".parse().unwrap(),
            state: "alive".into(),
            labels: [("zone".to_string(), "z1".to_string())].into(),
            incarnation: 0,
            boot_epoch: 1,
            is_self: true,
        };
        let mut m = n.clone();
        m.name = None;
        m.is_self = false;
        m.state = "down".into();
        let t = table(&[n, m]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with("a *") && lines[1].contains("zone=z1"));
        assert!(lines[2].starts_with("?") && lines[2].contains("down"));
    }
}
