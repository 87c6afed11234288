//! `/metrics`: the membership and link counters in the Prometheus text format.
//!
//! The values live in the membership snapshot and in the links' atomics; each scrape copies them
//! into a fresh prometheus-client registry and encodes it, so counters keep their cumulative
//! values and nothing is double-counted.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_membership::core::MemberState;
use shoal_membership::handle::Snapshot;
use shoal_membership::link::LinkMetricsSnapshot;

type Labels = Vec<(String, String)>;

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn labelled(registry: &mut Registry, name: &str, help: &str, label: &str, values: &[(&str, u64)]) {
    let family = Family::<Labels, Counter>::default();
    for (v, n) in values {
        family
            .get_or_create(&vec![(label.to_string(), (*v).to_string())])
            .inc_by(*n);
    }
    registry.register(name, help, family);
}

/// Renders every metric of this node.
pub(crate) fn render(snap: &Snapshot, links: &LinkMetricsSnapshot) -> String {
    let mut r = Registry::with_prefix("shoal");

    let members = Family::<Labels, Gauge>::default();
    for state in [MemberState::Alive, MemberState::Suspect, MemberState::Down] {
        members
            .get_or_create(&vec![("state".to_string(), state.as_str().to_string())])
            .set(snap.count(state) as i64);
    }
    r.register(
        "members",
        "Cluster members by state, this node included",
        members,
    );

    let c = &snap.counters;
    counter(
        &mut r,
        "swim_probes_sent",
        "Direct SWIM probes sent",
        c.probes_sent,
    );
    counter(
        &mut r,
        "swim_probes_failed",
        "Probes with no direct or indirect ack in time",
        c.probes_failed,
    );
    counter(
        &mut r,
        "swim_suspicions_raised",
        "Members this node started suspecting",
        c.suspicions_raised,
    );
    counter(
        &mut r,
        "swim_suspicions_refuted",
        "Suspicions raised by this node that the member refuted",
        c.suspicions_refuted,
    );
    counter(
        &mut r,
        "swim_self_refutations",
        "Times this node refuted a suspicion about itself",
        c.self_refutations,
    );
    labelled(
        &mut r,
        "swim_datagrams_rejected",
        "Authenticated datagrams the membership core refused",
        "reason",
        &[
            ("malformed", c.datagrams_malformed),
            ("sender_mismatch", c.datagrams_sender_mismatch),
            ("oversize", c.datagrams_oversize),
        ],
    );

    counter(
        &mut r,
        "link_datagrams_in",
        "Sealed datagrams received and accepted",
        links.datagrams_in,
    );
    counter(
        &mut r,
        "link_datagrams_out",
        "Sealed datagrams sent",
        links.datagrams_out,
    );
    counter(
        &mut r,
        "link_bytes_in",
        "Bytes of accepted datagrams",
        links.bytes_in,
    );
    counter(
        &mut r,
        "link_bytes_out",
        "Bytes of sent datagrams",
        links.bytes_out,
    );
    counter(
        &mut r,
        "link_handshakes_completed",
        "Noise handshakes completed",
        links.handshakes_completed,
    );
    labelled(
        &mut r,
        "link_handshakes_rejected",
        "Noise handshakes refused, by reason",
        "reason",
        &[
            ("unknown_ca", links.handshakes_rejected_unknown_ca),
            ("expired", links.handshakes_rejected_expired),
            ("not_yet_valid", links.handshakes_rejected_not_yet_valid),
            ("key_mismatch", links.handshakes_rejected_key_mismatch),
            ("malformed", links.handshakes_rejected_malformed),
            ("timeout", links.handshakes_rejected_timeout),
            ("busy", links.handshakes_rejected_busy),
            ("peer_closed", links.handshakes_failed_io),
        ],
    );
    labelled(
        &mut r,
        "link_datagrams_dropped",
        "Datagrams dropped, by reason",
        "reason",
        &[
            ("auth", links.dropped_auth),
            ("replay", links.dropped_replay),
            ("unknown_session", links.dropped_unknown_session),
            ("oversize", links.dropped_oversize),
            ("no_session", links.send_dropped_no_session),
        ],
    );

    let mut out = String::new();
    if encode(&mut out, &r).is_err() {
        out = "# cannot encode metrics\n".to_string();
    }
    out
}
