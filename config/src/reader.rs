//! Reads a parsed TOML document, spans and all, into the typed config. Every mistake is recorded
//! with its location (a type error does not stop the reading of the other keys), and the span of
//! every key read is kept so the rules in `validate` can point at the offending value too.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::units::{ByteSize, parse_duration};

pub(crate) type Span = Range<usize>;

/// One problem found while reading: where, which key, what.
#[derive(Clone, Debug)]
pub(crate) struct Problem {
    pub(crate) span: Span,
    pub(crate) path: String,
    pub(crate) message: String,
}

/// Collects problems and key spans while walking a document.
#[derive(Default)]
pub(crate) struct Reader {
    pub(crate) problems: Vec<Problem>,
    pub(crate) spans: HashMap<String, Span>,
}

/// A table being read: remembers which keys the schema knows, to report the others.
pub(crate) struct Tbl<'a, 'i> {
    pub(crate) path: String,
    table: &'a DeTable<'i>,
    known: Vec<&'static str>,
}

type Val<'a, 'i> = &'a Spanned<DeValue<'i>>;

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn kind(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The known key closest to `key`, if it is close enough to be a likely typo.
pub(crate) fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (distance(&key.to_ascii_lowercase(), k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

impl<'a, 'i> Tbl<'a, 'i> {
    pub(crate) fn root(table: &'a DeTable<'i>) -> Self {
        Tbl {
            path: String::new(),
            table,
            known: Vec::new(),
        }
    }
}

impl Reader {
    pub(crate) fn problem(&mut self, span: Span, path: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            span,
            path: path.to_string(),
            message: message.into(),
        });
    }

    fn type_error(&mut self, v: Val<'_, '_>, path: &str, expected: &str) {
        self.problem(
            v.span(),
            path,
            format!("expected {expected}, found {}", kind(v.get_ref())),
        );
    }

    /// Looks a key up, marking it known and recording its span.
    pub(crate) fn get<'a, 'i>(
        &mut self,
        t: &mut Tbl<'a, 'i>,
        key: &'static str,
    ) -> Option<(Val<'a, 'i>, String)> {
        t.known.push(key);
        let v = t.table.get(key)?;
        let path = join(&t.path, key);
        self.spans.insert(path.clone(), v.span());
        Some((v, path))
    }

    /// Reports every key of the table that the schema did not ask for.
    pub(crate) fn finish(&mut self, t: Tbl<'_, '_>) {
        for (key, _) in t.table.iter() {
            let name: &str = key.get_ref();
            if t.known.contains(&name) {
                continue;
            }
            let path = join(&t.path, name);
            let message = match suggest(name, &t.known) {
                Some(s) => format!("unknown key `{name}`; did you mean `{s}`?"),
                None => format!("unknown key `{name}`; known keys: {}", t.known.join(", ")),
            };
            self.problem(key.span(), &path, message);
        }
    }

    fn value_str<'v>(&mut self, v: Val<'v, '_>, path: &str) -> Option<&'v str> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                self.type_error(v, path, "a string");
                None
            }
        }
    }

    fn value_int(&mut self, v: Val<'_, '_>, path: &str) -> Option<i128> {
        match v.get_ref() {
            DeValue::Integer(i) => match i128::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.problem(v.span(), path, "integer out of range");
                    None
                }
            },
            _ => {
                self.type_error(v, path, "an integer");
                None
            }
        }
    }

    fn value_f64(&mut self, v: Val<'_, '_>, path: &str) -> Option<f64> {
        match v.get_ref() {
            DeValue::Float(f) => match f.as_str().parse::<f64>() {
                Ok(x) if x.is_finite() => Some(x),
                _ => {
                    self.problem(v.span(), path, "must be a finite number");
                    None
                }
            },
            DeValue::Integer(_) => self.value_int(v, path).map(|n| n as f64),
            _ => {
                self.type_error(v, path, "a number");
                None
            }
        }
    }

    fn ranged<T: TryFrom<i128>>(&mut self, v: Val<'_, '_>, path: &str, what: &str) -> Option<T> {
        let n = self.value_int(v, path)?;
        match T::try_from(n) {
            Ok(x) => Some(x),
            Err(_) => {
                self.problem(v.span(), path, format!("{n} is out of range for {what}"));
                None
            }
        }
    }

    pub(crate) fn string(&mut self, t: &mut Tbl<'_, '_>, key: &'static str) -> Option<String> {
        let (v, path) = self.get(t, key)?;
        self.value_str(v, &path).map(str::to_string)
    }

    pub(crate) fn u32(&mut self, t: &mut Tbl<'_, '_>, key: &'static str) -> Option<u32> {
        let (v, path) = self.get(t, key)?;
        self.ranged(v, &path, "a count (0 to 4294967295)")
    }

    pub(crate) fn u16(&mut self, t: &mut Tbl<'_, '_>, key: &'static str) -> Option<u16> {
        let (v, path) = self.get(t, key)?;
        self.ranged(v, &path, "a port (1 to 65535)")
    }

    pub(crate) fn f64(&mut self, t: &mut Tbl<'_, '_>, key: &'static str) -> Option<f64> {
        let (v, path) = self.get(t, key)?;
        self.value_f64(v, &path)
    }

    pub(crate) fn bool(&mut self, t: &mut Tbl<'_, '_>, key: &'static str) -> Option<bool> {
        let (v, path) = self.get(t, key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            _ => {
                self.type_error(v, &path, "true or false");
                None
            }
        }
    }

    /// A string value turned into `T` by `parse`, whose error message is reported at the value.
    pub(crate) fn parsed<T>(
        &mut self,
        t: &mut Tbl<'_, '_>,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let (v, path) = self.get(t, key)?;
        let text = self.value_str(v, &path)?;
        match parse(text) {
            Ok(x) => Some(x),
            Err(e) => {
                self.problem(v.span(), &path, e);
                None
            }
        }
    }

    pub(crate) fn duration(&mut self, t: &mut Tbl<'_, '_>, key: &'static str) -> Option<Duration> {
        self.parsed(t, key, parse_duration)
    }

    /// A size: a string such as `64MiB`, or an integer number of bytes.
    pub(crate) fn size(&mut self, t: &mut Tbl<'_, '_>, key: &'static str) -> Option<ByteSize> {
        let (v, path) = self.get(t, key)?;
        match v.get_ref() {
            DeValue::Integer(_) => self.ranged::<u64>(v, &path, "a size").map(ByteSize),
            DeValue::String(s) => match s.parse::<ByteSize>() {
                Ok(b) => Some(b),
                Err(e) => {
                    self.problem(v.span(), &path, e);
                    None
                }
            },
            _ => {
                self.type_error(v, &path, "a size such as \"64MiB\"");
                None
            }
        }
    }

    /// One of a fixed set of words.
    pub(crate) fn choice<T: Copy>(
        &mut self,
        t: &mut Tbl<'_, '_>,
        key: &'static str,
        options: &[(&str, T)],
    ) -> Option<T> {
        self.parsed(t, key, |s| {
            options
                .iter()
                .find(|(name, _)| *name == s)
                .map(|(_, x)| *x)
                .ok_or_else(|| {
                    let names: Vec<String> =
                        options.iter().map(|(n, _)| format!("`{n}`")).collect();
                    format!("`{s}` is not one of {}", names.join(", "))
                })
        })
    }

    fn array<'a, 'i>(
        &mut self,
        t: &mut Tbl<'a, 'i>,
        key: &'static str,
    ) -> Option<(Vec<(Val<'a, 'i>, String)>, String)> {
        let (v, path) = self.get(t, key)?;
        match v.get_ref() {
            DeValue::Array(items) => {
                let out = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let p = format!("{path}[{i}]");
                        self.spans.insert(p.clone(), item.span());
                        (item, p)
                    })
                    .collect();
                Some((out, path))
            }
            _ => {
                self.type_error(v, &path, "an array");
                None
            }
        }
    }

    /// An array whose elements are strings, each turned into `T` by `parse`.
    pub(crate) fn list<T>(
        &mut self,
        t: &mut Tbl<'_, '_>,
        key: &'static str,
        mut parse: impl FnMut(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let (items, _) = self.array(t, key)?;
        let mut out = Vec::new();
        for (item, path) in items {
            if let Some(s) = self.value_str(item, &path) {
                match parse(s) {
                    Ok(x) => out.push(x),
                    Err(e) => self.problem(item.span(), &path, e),
                }
            }
        }
        Some(out)
    }

    pub(crate) fn strings(
        &mut self,
        t: &mut Tbl<'_, '_>,
        key: &'static str,
    ) -> Option<Vec<String>> {
        self.list(t, key, |s| Ok(s.to_string()))
    }

    pub(crate) fn u32s(&mut self, t: &mut Tbl<'_, '_>, key: &'static str) -> Option<Vec<u32>> {
        let (items, _) = self.array(t, key)?;
        Some(
            items
                .into_iter()
                .filter_map(|(item, path)| self.ranged(item, &path, "a count"))
                .collect(),
        )
    }

    fn as_table<'a, 'i>(&mut self, v: Val<'a, 'i>, path: String) -> Option<Tbl<'a, 'i>> {
        match v.get_ref() {
            DeValue::Table(table) => Some(Tbl {
                path,
                table,
                known: Vec::new(),
            }),
            _ => {
                self.type_error(v, &path, "a table");
                None
            }
        }
    }

    /// A sub-table; read it, then call [`Reader::finish`] on it.
    pub(crate) fn table<'a, 'i>(
        &mut self,
        t: &mut Tbl<'a, 'i>,
        key: &'static str,
    ) -> Option<Tbl<'a, 'i>> {
        let (v, path) = self.get(t, key)?;
        self.as_table(v, path)
    }

    /// An array of tables (`[[ports]]`).
    pub(crate) fn tables<'a, 'i>(
        &mut self,
        t: &mut Tbl<'a, 'i>,
        key: &'static str,
    ) -> Vec<Tbl<'a, 'i>> {
        let Some((items, _)) = self.array(t, key) else {
            return Vec::new();
        };
        items
            .into_iter()
            .filter_map(|(item, path)| self.as_table(item, path))
            .collect()
    }

    /// A table of string values with free-form keys (`[env]`, `[labels]`).
    pub(crate) fn string_map(
        &mut self,
        t: &mut Tbl<'_, '_>,
        key: &'static str,
    ) -> Option<BTreeMap<String, String>> {
        let (v, path) = self.get(t, key)?;
        let DeValue::Table(table) = v.get_ref() else {
            self.type_error(v, &path, "a table of strings");
            return None;
        };
        let mut out = BTreeMap::new();
        for (k, val) in table.iter() {
            let p = join(&path, k.get_ref());
            self.spans.insert(p.clone(), val.span());
            match val.get_ref() {
                DeValue::String(s) => {
                    out.insert(k.get_ref().to_string(), s.to_string());
                }
                other => self.problem(
                    val.span(),
                    &p,
                    format!("expected a string, found {} (quote the value)", kind(other)),
                ),
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_closest_known_key() {
        assert_eq!(suggest("replica", &["replicas", "image"]), Some("replicas"));
        assert_eq!(
            suggest("paralelism", &["parallelism", "delay"]),
            Some("parallelism")
        );
        assert_eq!(suggest("zebra", &["replicas", "image"]), None);
    }
}
