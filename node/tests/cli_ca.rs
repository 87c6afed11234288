//! `shoal ca init` and `shoal cert issue` as an operator runs them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use shoal_membership::cert::{NodeCredentials, unix_now, verify_admin_token};

fn shoal(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_then_cert_issue_writes_credentials_a_node_can_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let out = dir.path().join("n1");
    let (ca_s, out_s) = (ca.to_str().unwrap(), out.to_str().unwrap());
    let o = shoal(&["ca", "init", "--dir", ca_s]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let o = shoal(&[
        "cert",
        "issue",
        "--ca",
        ca_s,
        "--name",
        "n1",
        "--label",
        "zone=a",
        "--label",
        "disk=ssd",
        "--validity",
        "12h",
        "--out",
        out_s,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(mode(&out.join("node.key")), 0o600);
    let creds = NodeCredentials::load(&out).unwrap();
    assert_eq!(creds.cert.name, "n1");
    assert_eq!(creds.cert.labels.get("zone").map(String::as_str), Some("a"));
    let lifetime = creds.cert.not_after - creds.cert.not_before;
    assert_eq!(lifetime, 12 * 3600);
    assert!(creds.cert.not_before <= unix_now());
    let token = std::fs::read_to_string(ca.join("admin.token")).unwrap();
    verify_admin_token(&creds.ca, &token, unix_now()).unwrap();
}

#[test]
fn bad_arguments_exit_non_zero_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    assert!(shoal(&["ca", "init", "--dir", ca_s]).status.success());
    let again = shoal(&["ca", "init", "--dir", ca_s]);
    assert!(!again.status.success());
    assert!(
        text(&again).contains("refusing to overwrite"),
        "{}",
        text(&again)
    );

    let out = dir.path().join("x");
    let out_s = out.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--name", "n", "--validity", "soon"], "not a duration"),
        (&["--name", "bad name"], "node name"),
        (&["--name", "n", "--label", "novalue"], "KEY=VALUE"),
        (
            &["--name", "n", "--label", "a=1", "--label", "a=2"],
            "given twice",
        ),
        (&["--name", "n", "--validity", "0s"], "at least 1s"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["cert", "issue", "--ca", ca_s, "--out", out_s];
        args.extend_from_slice(extra);
        let o = shoal(&args);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(text(&o).contains(expected), "{extra:?}: {}", text(&o));
        assert!(!out.join("node.key").exists(), "{extra:?} wrote a key");
    }
    let missing = shoal(&[
        "cert",
        "issue",
        "--ca",
        "/nonexistent/ca",
        "--name",
        "n",
        "--out",
        out_s,
    ]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("/nonexistent/ca/ca.key"),
        "{}",
        text(&missing)
    );
}
