//! `shoal-config` owns the two files an operator writes — the node config and the service spec —
//! and the vocabulary they share: durations, sizes, placement constraints. It parses TOML with
//! the location of every key, and validates purely, reporting **every** mistake as
//! `file:line:column: key.path: message`, so nothing is ever half-applied.
//!
//! Reading a file is the only I/O here ([`load_file`]); everything else works on strings.

mod constraint;
mod node;
mod reader;
mod schema;
mod service;
mod units;
mod validate;

use std::fmt;
use std::path::Path;

pub use constraint::{Attribute, Constraint, Operator};
pub use node::{
    LogFormat, MembershipConfig, MembershipPreset, MembershipTiming, NodeConfig, NodeResources,
    RuntimeKind,
};
pub use service::{
    Autoscale, Backoff, BlueGreen, Canary, Check, ExecCheck, FailureAction, Health, HttpCheck,
    Placement, PortSpec, Probe, Protocol, Resources, RestartCondition, RestartPolicy, ServiceSpec,
    Strategy, TcpCheck, UpdateOrder, UpdatePolicy,
};
pub use units::{ByteSize, duration_serde, format_duration, opt_duration_serde, parse_duration};
pub use validate::{
    MAX_REPLICAS, MAX_SPREAD_LEVELS, Violation, is_valid_name, validate_node, validate_service,
};

use reader::{Reader, Span, Tbl};

/// One mistake in a file, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file name as given (or `<input>`).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// Dotted key path; empty for the document itself.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.message)
    }
}

/// Every mistake found in one file, in the order they appear in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but is not a valid config.
    #[error("{0}")]
    Invalid(#[from] Diagnostics),
}

/// What a file describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A service spec (has `image` or `command`, or `replicas`, ...).
    Service,
    /// A node config.
    Node,
}

/// A parsed, valid file.
#[derive(Clone, Debug, PartialEq)]
pub enum Document {
    /// A service spec.
    Service(Box<ServiceSpec>),
    /// A node config.
    Node(Box<NodeConfig>),
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..src.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

struct Located<'s> {
    file: &'s str,
    src: &'s str,
    out: Vec<(usize, Diagnostic)>,
}

impl Located<'_> {
    fn push(&mut self, span: Span, path: String, message: String) {
        let (line, column) = line_col(self.src, span.start);
        self.out.push((
            span.start,
            Diagnostic {
                file: self.file.to_string(),
                line,
                column,
                path,
                message,
            },
        ));
    }

    fn finish(mut self) -> Diagnostics {
        self.out.sort_by_key(|(start, _)| *start);
        Diagnostics(self.out.into_iter().map(|(_, d)| d).collect())
    }
}

/// The span of `path` or, failing that, of its nearest ancestor that was written in the file.
fn span_of(reader: &Reader, path: &str) -> Span {
    let mut p = path;
    loop {
        if let Some(s) = reader.spans.get(p) {
            return s.clone();
        }
        match p.rfind(['.', '[']) {
            Some(i) => p = &p[..i],
            None => return 0..0,
        }
    }
}

fn load<T>(
    file: &str,
    src: &str,
    read: impl FnOnce(&mut Reader, Tbl<'_, '_>) -> T,
    rules: impl FnOnce(&T) -> Vec<Violation>,
) -> Result<T, Diagnostics> {
    let mut loc = Located {
        file,
        src,
        out: Vec::new(),
    };
    let doc = match toml::de::DeTable::parse(src) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let message = e.message().trim().to_string();
            loc.push(span, String::new(), format!("TOML syntax error: {message}"));
            return Err(loc.finish());
        }
    };
    let mut reader = Reader::default();
    let value = read(&mut reader, Tbl::root(doc.get_ref()));
    let typed_ok = reader.problems.is_empty();
    for p in std::mem::take(&mut reader.problems) {
        loc.push(p.span, p.path, p.message);
    }
    // Rules run even when some keys had the wrong type, so one pass reports everything; a rule
    // about a key whose value was already refused would only repeat it, so it is skipped.
    let refused: Vec<String> = loc.out.iter().map(|(_, d)| d.path.clone()).collect();
    for v in rules(&value) {
        if !typed_ok && refused.iter().any(|r| r == &v.path) {
            continue;
        }
        let span = span_of(&reader, &v.path);
        loc.push(span, v.path, v.message);
    }
    if loc.out.is_empty() {
        Ok(value)
    } else {
        Err(loc.finish())
    }
}

/// Parses and validates a service spec. `file` names the source in diagnostics.
pub fn load_service_str(file: &str, src: &str) -> Result<ServiceSpec, Diagnostics> {
    load(file, src, schema::read_service, validate_service)
}

/// Parses and validates a node config. `file` names the source in diagnostics.
pub fn load_node_str(file: &str, src: &str) -> Result<NodeConfig, Diagnostics> {
    load(file, src, schema::read_node, validate_node)
}

/// Tells a service spec from a node config by its top-level keys: a spec has `image`,
/// `command`, `replicas` or `ports`; a node config has `bind`, `seeds`, `api`, `data_dir`,
/// `runtime` or `membership`. Anything else is taken as a service spec.
pub fn detect_kind(src: &str) -> Kind {
    const NODE_KEYS: &[&str] = &[
        "bind",
        "advertise",
        "seeds",
        "api",
        "data_dir",
        "cert_dir",
        "runtime",
        "membership",
        "reschedule_grace",
        "log_format",
        "labels",
    ];
    const SERVICE_KEYS: &[&str] = &["image", "command", "replicas", "ports", "health", "update"];
    let Ok(doc) = toml::de::DeTable::parse(src) else {
        return Kind::Service;
    };
    let has = |keys: &[&str]| {
        doc.get_ref()
            .iter()
            .any(|(k, _)| keys.contains(&k.get_ref().as_ref()))
    };
    if has(NODE_KEYS) && !has(SERVICE_KEYS) {
        Kind::Node
    } else {
        Kind::Service
    }
}

/// Parses and validates a string of the given kind (or detected, when `kind` is `None`).
pub fn load_str(file: &str, src: &str, kind: Option<Kind>) -> Result<Document, Diagnostics> {
    match kind.unwrap_or_else(|| detect_kind(src)) {
        Kind::Service => load_service_str(file, src).map(|s| Document::Service(Box::new(s))),
        Kind::Node => load_node_str(file, src).map(|n| Document::Node(Box::new(n))),
    }
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Reads and validates a file of the given kind (or detected).
pub fn load_file(path: &Path, kind: Option<Kind>) -> Result<Document, ConfigError> {
    let src = read(path)?;
    Ok(load_str(&path.display().to_string(), &src, kind)?)
}

/// Reads and validates a node config file.
pub fn load_node_config(path: &Path) -> Result<NodeConfig, ConfigError> {
    let src = read(path)?;
    Ok(load_node_str(&path.display().to_string(), &src)?)
}

/// Reads and validates a service spec file.
pub fn load_service_file(path: &Path) -> Result<ServiceSpec, ConfigError> {
    let src = read(path)?;
    Ok(load_service_str(&path.display().to_string(), &src)?)
}
