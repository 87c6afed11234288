//! `shoal validate` as an operator runs it: exit codes and the printed diagnostics.

use std::path::Path;
use std::process::Command;

fn shoal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
}

fn examples() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut v = vec![root.join("node.toml").display().to_string()];
    for e in std::fs::read_dir(root.join("services")).unwrap() {
        v.push(e.unwrap().path().display().to_string());
    }
    v
}

#[test]
fn validating_the_shipped_examples_exits_zero() {
    let out = shoal().arg("validate").args(examples()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok (service `web`)"), "{stdout}");
    assert!(stdout.contains("ok (node config)"), "{stdout}");
}

#[test]
fn a_spec_with_five_mistakes_prints_five_located_errors_and_exits_one() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("web.toml");
    std::fs::write(
        &bad,
        "name = \"Web\"\nimage = \"x:1\"\nreplica = 3\nstop_grace = \"soon\"\n[update]\nparallelism = 0\nstrategy = \"big-bang\"\n",
    )
    .unwrap();
    let good = examples().pop().unwrap();
    let out = shoal()
        .arg("validate")
        .arg(&good)
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let f = bad.display().to_string();
    for expected in [
        format!("{f}:1:8: name:"),
        format!("{f}:3:1: replica: unknown key"),
        format!("{f}:4:14: stop_grace:"),
        format!("{f}:6:15: update.parallelism: must be at least 1"),
        format!("{f}:7:12: update.strategy: `big-bang` is not one of"),
        format!("{f}: 5 error(s)"),
    ] {
        assert!(
            stdout.contains(&expected),
            "missing `{expected}` in:\n{stdout}"
        );
    }
}

#[test]
fn a_missing_file_is_reported_and_exits_one() {
    let out = shoal()
        .args(["validate", "/nonexistent/spec.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cannot read"));
}

#[test]
fn kind_can_be_forced() {
    let node = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/node.toml");
    let out = shoal()
        .args(["validate", "--kind", "service"])
        .arg(&node)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a node config is not a valid service spec"
    );
}
