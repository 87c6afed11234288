//! A test-only link filter: when the environment variable `SHOAL_TEST_LINK_FILTER` names a
//! file, every node id (32 hex characters, one per line) listed in it is cut off — its SWIM
//! datagrams are dropped on receipt and its control streams refused — so a test can partition
//! real agents on loopback without network namespaces. Without the variable (every production
//! run) [`blocked`] is a single cached check that returns false.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::state::NodeId;

struct Filter {
    path: PathBuf,
    ids: HashSet<NodeId>,
    read_at: Option<Instant>,
}

static FILTER: OnceLock<Option<Mutex<Filter>>> = OnceLock::new();

fn parse(text: &str) -> HashSet<NodeId> {
    let mut out = HashSet::new();
    for line in text.lines() {
        let l = line.trim();
        if l.len() != 32 {
            continue;
        }
        let mut id = [0u8; 16];
        let ok = (0..16).all(|i| match u8::from_str_radix(&l[2 * i..2 * i + 2], 16) {
            Ok(b) => {
                id[i] = b;
                true
            }
            Err(_) => false,
        });
        if ok {
            out.insert(id);
        }
    }
    out
}

/// Whether traffic from/to `node` is cut by the test filter (re-read at most every 100 ms).
pub fn blocked(node: &NodeId) -> bool {
    let f = FILTER.get_or_init(|| {
        std::env::var_os("SHOAL_TEST_LINK_FILTER").map(|p| {
            Mutex::new(Filter {
                path: PathBuf::from(p),
                ids: HashSet::new(),
                read_at: None,
            })
        })
    });
    let Some(m) = f else { return false };
    let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
    if g.read_at
        .is_none_or(|t| t.elapsed() > Duration::from_millis(100))
    {
        g.ids = std::fs::read_to_string(&g.path)
            .map(|t| parse(&t))
            .unwrap_or_default();
        g.read_at = Some(Instant::now());
    }
    g.ids.contains(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_file_lists_hex_node_ids_and_ignores_anything_else() {
        let ids = parse(
            "00112233445566778899aabbccddeeff\nnot an id\n  ffffffffffffffffffffffffffffffff  \nzz112233445566778899aabbccddeeff\n",
        );
        assert_eq!(ids.len(), 2);
        assert!(ids.contains(&[0xff; 16]));
    }
}
