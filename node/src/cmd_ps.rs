//! `shoal ps [SERVICE] [--json]` and `shoal scale NAME N`.

use std::process::ExitCode;

use crate::api_instances::InstanceJson;
use crate::cmd_services::{Conn, fail, http};

/// `shoal ps`.
#[derive(clap::Args, Debug)]
pub(crate) struct PsArgs {
    /// Only this service's instances.
    service: Option<String>,
    /// Print the JSON array instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// `shoal scale`.
#[derive(clap::Args, Debug)]
pub(crate) struct ScaleArgs {
    /// The service.
    name: String,
    /// The new replica count.
    replicas: u32,
    #[command(flatten)]
    conn: Conn,
}

fn table(rows: &[InstanceJson]) -> String {
    let mut out = format!(
        "{:<16} {:>4}  {:<12} {:<9} {:<5} {:>8} {:>7}  {}\n",
        "SERVICE", "SLOT", "NODE", "STATE", "READY", "RESTARTS", "VERSION", "ADDRESS"
    );
    for r in rows {
        let state = if r.assigned || r.state == "pending" {
            r.state.clone()
        } else {
            format!("{}*", r.state)
        };
        out.push_str(&format!(
            "{:<16} {:>4}  {:<12} {:<9} {:<5} {:>8} {:>7}  {}\n",
            r.service,
            r.slot,
            r.node.as_deref().unwrap_or("-"),
            state,
            if r.ready { "yes" } else { "no" },
            r.restarts,
            r.version,
            r.address.as_deref().unwrap_or("-"),
        ));
    }
    if rows.iter().any(|r| !r.assigned && r.state != "pending") {
        out.push_str("* on a node that no longer holds the slot; it is being stopped\n");
    }
    out
}

pub(crate) fn ps(args: PsArgs) -> anyhow::Result<ExitCode> {
    let path = match &args.service {
        Some(s) => format!("/v1/services/{s}/instances"),
        None => "/v1/instances".to_string(),
    };
    let (status, body) = http(&args.conn.addr, "GET", &path, None, None)?;
    if status != 200 {
        return fail(status, &body);
    }
    if args.json {
        println!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<InstanceJson> = serde_json::from_str(&body)?;
    print!("{}", table(&rows));
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn scale(args: ScaleArgs) -> anyhow::Result<ExitCode> {
    let token = args.conn.token()?;
    let body = serde_json::json!({ "replicas": args.replicas }).to_string();
    let (status, resp) = http(
        &args.conn.addr,
        "POST",
        &format!("/v1/services/{}/scale", args.name),
        Some(&token),
        Some(("application/json", body.as_bytes())),
    )?;
    if status != 200 {
        return fail(status, &resp);
    }
    println!("scaled {} to {} replicas", args.name, args.replicas);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_marks_instances_on_nodes_that_no_longer_hold_their_slot() {
        let row = |node: &str, assigned| InstanceJson {
            service: "web".into(),
            slot: 0,
            node: Some(node.into()),
            state: "running".into(),
            ready: true,
            restarts: 2,
            version: 1,
            address: Some("127.0.0.1:40000".into()),
            instance: Some("web.0.v1".into()),
            assigned,
        };
        let t = table(&[row("n1", true), row("n2", false)]);
        assert!(t.contains("n1           running"), "{t}");
        assert!(t.contains("n2           running*"), "{t}");
        assert!(t.contains("being stopped"));
    }
}
