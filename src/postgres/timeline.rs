//! Timeline histories, and whether a standby's WAL is a prefix of its leader's.
//!
//! Every promotion starts a new timeline whose number is the newest one the promoting server
//! knows plus one. Two members that promote from the same timeline without seeing each
//! other's history files (one promoted and was fenced, another promoted after it) both
//! pick the same number: their histories fork *on one timeline*. PostgreSQL's own checks
//! compare timeline numbers only, and pg_rewind does nothing for two servers on the same
//! timeline; only the switch points in the history files (`pg_wal/NNNNNNNN.history`, one
//! line per ancestor: its number and the WAL position where the next one began) tell such
//! histories apart. Pure: the agent reads the files, `verdict` judges.

/// One line of a history file: timeline `tli` ended (and its child began) at `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    pub tli: u32,
    pub end: u64,
}

/// A server's place in the cluster's history: its timeline and that timeline's ancestors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub tli: u32,
    pub ancestors: Vec<Switch>,
}

/// What a standby that cannot stream from its leader must do about its history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its WAL is (as far as histories tell) a prefix of the leader's: nothing to repair.
    Follows,
    /// Its history left the leader's on a timeline the leader does not share, or it went
    /// past the point where the leader's history switched away: pg_rewind repairs it.
    Rewind,
    /// Same timeline number, different ancestors: the histories forked on one timeline.
    /// pg_rewind sees one timeline and does nothing, so only a new clone repairs it.
    Reclone,
}

/// Parse a history file: `tli<TAB>X/Y<TAB>reason` per line; comments and blank lines are
/// skipped. None when a line is malformed (etcd and files are untrusted input: no verdict
/// then).
pub fn parse_history(text: &str) -> Option<Vec<Switch>> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let tli = fields.next()?.parse::<u32>().ok()?;
        let end = parse_lsn(fields.next()?)?;
        out.push(Switch { tli, end });
    }
    Some(out)
}

/// Parse an LSN such as `0/3000060` (two hexadecimal halves of 32 bits each).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let (hi, lo) = (
        u64::from_str_radix(hi, 16).ok()?,
        u64::from_str_radix(lo, 16).ok()?,
    );
    (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some((hi << 32) | lo)
}

/// The history file of timeline `tli`, relative to the data directory (timeline 1 has none).
pub fn history_file(tli: u32) -> Option<String> {
    (tli > 1).then(|| format!("pg_wal/{tli:08X}.history"))
}

/// The text of a history file for a timeline number reserved and never used: the ancestors
/// of `current`, then `current` itself ending at `begins` (where it began).
pub fn placeholder_history(ancestors: &[Switch], current: u32, begins: u64) -> String {
    let mut text = String::new();
    for s in ancestors.iter().chain(std::iter::once(&Switch {
        tli: current,
        end: begins,
    })) {
        text.push_str(&format!(
            "{}\t{:X}/{:X}\treserved by citus-reconcile, never used\n",
            s.tli,
            s.end >> 32,
            s.end & 0xFFFF_FFFF
        ));
    }
    text
}

/// The most placeholder history files one promotion writes: a group's promotions since a
/// member last saw one are few; thousands mean a bad value in etcd.
pub const MAX_TIMELINE_GAP: u32 = 1000;

/// The timeline a promotion from `current` reserves when etcd says numbers up to `taken`
/// are used. etcd content is input: a number far ahead would have the member write a
/// placeholder file for each one in between, so it is refused.
pub fn next_timeline(current: u32, taken: u32) -> Result<u32, String> {
    let next = current
        .max(taken)
        .checked_add(1)
        .ok_or("timeline numbers exhausted")?;
    if next - current > MAX_TIMELINE_GAP {
        return Err(format!(
            "etcd says timeline {taken} is taken, {} past this member's timeline {current}: more than {MAX_TIMELINE_GAP} is no promotion history but a bad value",
            taken - current
        ));
    }
    Ok(next)
}

/// Whether a standby on `mine`, whose WAL reaches `end`, can stream from a primary on
/// `leader`.
pub fn verdict(mine: &Line, end: u64, leader: &Line) -> Verdict {
    if mine.tli == leader.tli {
        return if mine.ancestors == leader.ancestors {
            Verdict::Follows
        } else {
            Verdict::Reclone
        };
    }
    // Our timeline must be one of the leader's ancestors, reached the same way, and we
    // must not have gone past the point where the leader's history left it.
    match leader.ancestors.iter().position(|s| s.tli == mine.tli) {
        Some(i)
            if leader.ancestors[..i] == mine.ancestors[..] && end <= leader.ancestors[i].end =>
        {
            Verdict::Follows
        }
        _ => Verdict::Rewind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(tli: u32, ancestors: &[(u32, u64)]) -> Line {
        Line {
            tli,
            ancestors: ancestors
                .iter()
                .map(|&(tli, end)| Switch { tli, end })
                .collect(),
        }
    }

    #[test]
    fn history_files_parse_as_postgres_writes_them() {
        let text = "1\t0/3000060\tno recovery target specified\n\n2\t1/A0000D8\tno recovery target specified\n";
        assert_eq!(
            parse_history(text),
            Some(vec![
                Switch {
                    tli: 1,
                    end: 0x3000060
                },
                Switch {
                    tli: 2,
                    end: (1 << 32) | 0xA0000D8
                },
            ])
        );
        assert_eq!(parse_history(""), Some(vec![]));
        assert_eq!(parse_history("# comment\n"), Some(vec![]));
        for bad in [
            "x\t0/1\tr",
            "1\t01\tr",
            "1",
            "1\tG/0\tr",
            "1\t1FFFFFFFF/0\tr",
        ] {
            assert_eq!(parse_history(bad), None, "{bad:?}");
        }
        assert_eq!(history_file(1), None);
        let ancestors = [Switch {
            tli: 1,
            end: 0x3000060,
        }];
        let text = placeholder_history(&ancestors, 2, (1 << 32) | 0x10);
        assert_eq!(
            parse_history(&text),
            Some(vec![
                ancestors[0],
                Switch {
                    tli: 2,
                    end: (1 << 32) | 0x10
                }
            ])
        );
        assert_eq!(history_file(26).as_deref(), Some("pg_wal/0000001A.history"));
    }

    #[test]
    fn the_next_timeline_is_above_every_one_taken_within_reason() {
        assert_eq!(next_timeline(1, 0), Ok(2));
        assert_eq!(next_timeline(4, 2), Ok(5));
        assert_eq!(next_timeline(4, 9), Ok(10));
        assert_eq!(
            next_timeline(4, 4 + MAX_TIMELINE_GAP - 1),
            Ok(4 + MAX_TIMELINE_GAP)
        );
        assert!(next_timeline(4, 4 + MAX_TIMELINE_GAP).is_err());
        assert!(next_timeline(1, u32::MAX).is_err());
        assert!(next_timeline(u32::MAX, 0).is_err());
    }

    #[test]
    fn verdicts() {
        let leader = line(4, &[(1, 100), (2, 200), (3, 300)]);
        let cases = [
            (
                "same timeline, same ancestors",
                line(4, &[(1, 100), (2, 200), (3, 300)]),
                350,
                Verdict::Follows,
            ),
            (
                "behind on an ancestor, before its end",
                line(3, &[(1, 100), (2, 200)]),
                290,
                Verdict::Follows,
            ),
            (
                "at the ancestor's end exactly",
                line(3, &[(1, 100), (2, 200)]),
                300,
                Verdict::Follows,
            ),
            (
                "on timeline 1, before its end",
                line(1, &[]),
                50,
                Verdict::Follows,
            ),
            (
                "past the point the leader left our timeline",
                line(3, &[(1, 100), (2, 200)]),
                301,
                Verdict::Rewind,
            ),
            (
                "an ancestor reached another way",
                line(3, &[(1, 100), (2, 250)]),
                260,
                Verdict::Rewind,
            ),
            (
                "a later timeline than the leader's",
                line(5, &[(1, 100), (2, 200), (3, 300), (4, 400)]),
                450,
                Verdict::Rewind,
            ),
            (
                "a timeline the leader never had",
                line(6, &[(1, 100), (2, 200), (5, 280)]),
                290,
                Verdict::Rewind,
            ),
            (
                "same number, forked elsewhere",
                line(4, &[(1, 100), (2, 200), (3, 310)]),
                320,
                Verdict::Reclone,
            ),
            (
                "same number, other ancestors",
                line(4, &[(1, 100), (3, 300)]),
                320,
                Verdict::Reclone,
            ),
        ];
        for (what, mine, end, want) in cases {
            assert_eq!(verdict(&mine, end, &leader), want, "{what}");
        }
    }
}
