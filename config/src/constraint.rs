//! Placement constraints on node attributes: `node.labels.disk == ssd`, `node.name != n3`,
//! `node.labels.zone in [a, b]`, `node.labels.gpu exists`, `node.labels.spot not exists`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The node attribute a constraint looks at.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Attribute {
    /// `node.name`
    NodeName,
    /// `node.labels.KEY`
    Label(String),
}

/// What a constraint requires of the attribute.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    /// `== value`
    Eq(String),
    /// `!= value`
    Ne(String),
    /// `in [a, b]`
    In(Vec<String>),
    /// `not in [a, b]`
    NotIn(Vec<String>),
    /// `exists`
    Exists,
    /// `not exists`
    NotExists,
}

/// One placement constraint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Constraint {
    /// The attribute tested.
    pub attribute: Attribute,
    /// The test.
    pub operator: Operator,
}

impl Constraint {
    /// Whether a node with this name and these labels satisfies the constraint.
    pub fn matches(&self, node_name: &str, labels: &BTreeMap<String, String>) -> bool {
        let value = match &self.attribute {
            Attribute::NodeName => Some(node_name),
            Attribute::Label(key) => labels.get(key).map(String::as_str),
        };
        match (&self.operator, value) {
            (Operator::Eq(want), Some(v)) => v == want,
            (Operator::Eq(_), None) => false,
            (Operator::Ne(want), v) => v != Some(want.as_str()),
            (Operator::In(set), Some(v)) => set.iter().any(|s| s == v),
            (Operator::In(_), None) => false,
            (Operator::NotIn(set), v) => v.is_none_or(|v| !set.iter().any(|s| s == v)),
            (Operator::Exists, v) => v.is_some(),
            (Operator::NotExists, v) => v.is_none(),
        }
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

fn parse_value(text: &str) -> Result<String, String> {
    let t = text.trim();
    if let Some(inner) = t.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        if inner.contains('"') {
            return Err(format!("bad quoted value {t}"));
        }
        return Ok(inner.to_string());
    }
    if t.is_empty() {
        return Err("a value is missing".into());
    }
    if t.chars()
        .any(|c| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '"'))
    {
        return Err(format!(
            "`{t}` must be quoted (it has spaces or punctuation)"
        ));
    }
    Ok(t.to_string())
}

fn parse_list(text: &str) -> Result<Vec<String>, String> {
    let t = text.trim();
    let inner = t
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| format!("expected a list like `[a, b]`, found `{t}`"))?;
    if inner.trim().is_empty() {
        return Err("the list is empty".into());
    }
    inner.split(',').map(parse_value).collect()
}

impl FromStr for Constraint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let help = "write e.g. `node.labels.disk == ssd`, `node.name != n1`, \
                    `node.labels.zone in [a, b]` or `node.labels.gpu exists`";
        let end = t.find(|c: char| !is_key_char(c)).unwrap_or(t.len());
        let (attr, rest) = t.split_at(end);
        let attribute = if attr == "node.name" {
            Attribute::NodeName
        } else if let Some(key) = attr.strip_prefix("node.labels.") {
            if key.is_empty() {
                return Err(format!("`{attr}` names no label; {help}"));
            }
            Attribute::Label(key.to_string())
        } else {
            return Err(format!(
                "unknown attribute `{attr}`: use `node.name` or `node.labels.KEY`; {help}"
            ));
        };
        let rest = rest.trim();
        let operator = if let Some(v) = rest.strip_prefix("==") {
            Operator::Eq(parse_value(v)?)
        } else if let Some(v) = rest.strip_prefix("!=") {
            Operator::Ne(parse_value(v)?)
        } else if rest == "exists" {
            Operator::Exists
        } else if rest == "not exists" || squash(rest) == "not exists" {
            Operator::NotExists
        } else if let Some(v) = rest.strip_prefix("not").map(str::trim_start) {
            match v.strip_prefix("in") {
                Some(list) => Operator::NotIn(parse_list(list)?),
                None => return Err(format!("unknown operator in `{t}`; {help}")),
            }
        } else if let Some(list) = rest.strip_prefix("in") {
            Operator::In(parse_list(list)?)
        } else if rest.is_empty() {
            return Err(format!("`{t}` has no operator; {help}"));
        } else {
            return Err(format!("unknown operator in `{t}`; {help}"));
        };
        if attribute == Attribute::NodeName
            && matches!(operator, Operator::Exists | Operator::NotExists)
        {
            return Err("`node.name` always exists; `exists` applies to labels".into());
        }
        Ok(Constraint {
            attribute,
            operator,
        })
    }
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn quote(v: &str) -> String {
    if v.is_empty()
        || v.chars()
            .any(|c| c.is_whitespace() || matches!(c, ',' | '[' | ']'))
    {
        format!("\"{v}\"")
    } else {
        v.to_string()
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.attribute {
            Attribute::NodeName => write!(f, "node.name")?,
            Attribute::Label(k) => write!(f, "node.labels.{k}")?,
        }
        let list = |v: &Vec<String>| v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", ");
        match &self.operator {
            Operator::Eq(v) => write!(f, " == {}", quote(v)),
            Operator::Ne(v) => write!(f, " != {}", quote(v)),
            Operator::In(v) => write!(f, " in [{}]", list(v)),
            Operator::NotIn(v) => write!(f, " not in [{}]", list(v)),
            Operator::Exists => write!(f, " exists"),
            Operator::NotExists => write!(f, " not exists"),
        }
    }
}

impl Serialize for Constraint {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_string().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Constraint {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_operator_parses_and_prints_back() {
        for text in [
            "node.labels.disk == ssd",
            "node.name != n3",
            "node.labels.zone in [a, b]",
            "node.labels.zone not in [a]",
            "node.labels.gpu exists",
            "node.labels.spot not exists",
            "node.labels.team == \"blue team\"",
        ] {
            let c: Constraint = text.parse().unwrap();
            assert_eq!(c.to_string(), text);
        }
    }

    #[test]
    fn constraints_match_node_labels() {
        let l = labels(&[("disk", "ssd"), ("zone", "a")]);
        let m = |t: &str| t.parse::<Constraint>().unwrap().matches("n1", &l);
        assert!(m("node.labels.disk == ssd"));
        assert!(!m("node.labels.disk == hdd"));
        assert!(m("node.labels.gpu != yes"));
        assert!(m("node.labels.zone in [a, b]"));
        assert!(!m("node.labels.zone not in [a, b]"));
        assert!(m("node.labels.gpu not in [x]"));
        assert!(m("node.labels.disk exists"));
        assert!(m("node.labels.gpu not exists"));
        assert!(m("node.name == n1"));
        assert!(!m("node.name in [n2, n3]"));
    }

    #[test]
    fn malformed_constraints_are_refused_with_a_reason() {
        for bad in [
            "disk == ssd",
            "node.labels. == x",
            "node.labels.disk",
            "node.labels.disk ~= ssd",
            "node.labels.disk in ssd",
            "node.labels.disk in []",
            "node.labels.disk == ",
            "node.name exists",
        ] {
            assert!(
                bad.parse::<Constraint>().is_err(),
                "{bad} should be refused"
            );
        }
    }
}
