//! The little of `/proc` the process runtime reads: identity (start time), state, process
//! group, CPU time and resident memory.

use std::path::Path;

/// Kernel clock ticks per second as seen in `/proc` (`USER_HZ`, fixed at 100 by the Linux ABI
/// on every architecture shoal builds for).
pub(crate) const TICKS_PER_SEC: u64 = 100;

/// The fields of `/proc/<pid>/stat` the runtime uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// One-letter state (`R`, `S`, `Z`, ...).
    pub(crate) state: char,
    /// Process group id.
    pub(crate) pgrp: i32,
    /// User + system CPU time, in ticks.
    pub(crate) cpu_ticks: u64,
    /// Start time after boot, in ticks: with the pid, it identifies a process.
    pub(crate) start_ticks: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name may contain spaces and parentheses,
/// so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    // After ')': [0]=state(3) [1]=ppid(4) [2]=pgrp(5) ... [11]=utime(14) [12]=stime(15) ...
    // [19]=starttime(22)
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        cpu_ticks: f
            .get(11)?
            .parse::<u64>()
            .ok()?
            .checked_add(f.get(12)?.parse::<u64>().ok()?)?,
        start_ticks: f.get(19)?.parse().ok()?,
    })
}

/// Reads `/proc/<pid>/stat`, `None` if the process is gone.
pub(crate) fn read_stat(pid: i32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// True when `pid` is alive (not a zombie) and started at `start_ticks`.
pub(crate) fn is_same_live_process(pid: i32, start_ticks: u64) -> bool {
    matches!(read_stat(pid), Some(s) if s.start_ticks == start_ticks && s.state != 'Z' && s.state != 'X')
}

/// Resident memory of `pid` in bytes (from `VmRSS` in `/proc/<pid>/status`).
pub(crate) fn rss_bytes(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&text)
}

pub(crate) fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_ascii_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Live (non-zombie) members of process group `pgid`: (pid, stat).
pub(crate) fn group_members(pgid: i32) -> Vec<(i32, ProcStat)> {
    let Ok(dir) = std::fs::read_dir(Path::new("/proc")) else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, read_stat(pid)?)))
        .filter(|(_, s)| s.pgrp == pgid && s.state != 'Z')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_with_spaces_and_parens_in_the_name_is_parsed() {
        let line = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 987654 1000000 200 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.cpu_ticks, 12);
        assert_eq!(s.start_ticks, 987654);
    }

    #[test]
    fn garbage_stat_text_is_none_not_a_panic() {
        for t in ["", ")", "1 (x) S", "1 (x) S a b c"] {
            assert_eq!(parse_stat(t), None, "{t}");
        }
    }

    #[test]
    fn our_own_process_is_alive_and_a_wrong_start_time_is_not_us() {
        let me = std::process::id() as i32;
        let s = read_stat(me).unwrap();
        assert!(is_same_live_process(me, s.start_ticks));
        assert!(!is_same_live_process(me, s.start_ticks + 1));
        assert!(rss_bytes(me).unwrap() > 0);
    }

    proptest::proptest! {
        #[test]
        fn any_stat_or_status_text_parses_or_is_none_without_panicking(s in "\\PC{0,200}") {
            let _ = parse_stat(&s);
            let _ = parse_vm_rss(&s);
        }
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        assert_eq!(
            parse_vm_rss("Name: x\nVmRSS:\t  2048 kB\n"),
            Some(2048 * 1024)
        );
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }
}
