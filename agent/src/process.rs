//! Host processes as seen in `/proc`: is the QEMU we started still the one
//! behind this pid?
//!
//! A pid alone can be reused after its process exits; the pair (pid, start
//! time in clock ticks since boot, field 22 of `/proc/<pid>/stat`) cannot.

/// What we read from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub state: char,
    pub start_time: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain spaces
/// and parentheses, so fields are counted after its last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let after_comm = &text[text.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3), the start time is field 22: 19 further on.
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

pub fn stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// True while the process `pid` that started at `start_time` exists and has
/// not exited (a zombie has exited).
pub fn is_running(pid: u32, start_time: u64) -> bool {
    match stat(pid) {
        Some(s) => s.start_time == start_time && !matches!(s.state, 'Z' | 'X'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_time_after_a_tricky_command_name() {
        let line = "4242 (qemu) x (y)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    5 3 0 0 20 0 7 0 987654 123456789 1234 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                start_time: 987654
            })
        );
    }

    #[test]
    fn refuses_truncated_lines() {
        assert_eq!(parse_stat("1 (init) S 0 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_running_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let me = stat(pid).expect("own stat");
        assert!(is_running(pid, me.start_time));
        assert!(!is_running(pid, me.start_time + 1));
    }
}
