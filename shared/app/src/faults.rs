//! Deliberate faults, for the tests that prove a guarantee — and for the tests that
//! prove the checkers of `make torture` catch a broken one.
//!
//! `TALLY_FAULT_INJECTION` names them, comma-separated. Nothing is injected unless it
//! is set; every fault but `delay-publish` and `stall-after-debit` breaks a guarantee
//! on purpose.

use std::fmt;
use std::time::Duration;

/// One deliberate fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `crash-after-append`: abort the process right after a successful append, before
    /// publishing (no lost event: the relay or the catch-up must recover it).
    CrashAfterAppend,
    /// `delay-publish`: wait [`PUBLISH_DELAY`] between the append and the publish,
    /// widening the window in which a client can hang up (no guarantee broken).
    DelayPublish,
    /// `skip-publish`: never publish a commit (and forget its outbox entry): breaks
    /// "no lost event".
    SkipPublish,
    /// `apply-retries-twice`: ignore the `Idempotency-Key` of earlier commits, so a
    /// retry applies the command again: breaks exactly-once commands.
    ApplyRetriesTwice,
    /// `drop-projection`: the projector acknowledges every third delivered commit
    /// without applying it: breaks "the read model equals the store".
    DropProjection,
    /// `stale-balance`: a balance query answers with the balance before the account's
    /// last movement: breaks read-your-writes.
    StaleBalance,
    /// `stale-history`: an as-of balance answers with the balance one revision before
    /// the one asked (under the revision asked), and a statement leaves out its last
    /// movement: breaks "the past is the store's".
    StaleHistory,
    /// `skip-credit`: the transfer saga records a transfer's credit without making it:
    /// breaks "money is conserved" and "a transfer takes effect once".
    SkipCredit,
    /// `stall-after-debit`: the transfer saga stops driving a transfer right after its
    /// debit, before recording it, as a crash between the two would leave it (no
    /// guarantee broken: the next drive finds the debit by its key and goes on).
    StallAfterDebit,
}

/// How long `delay-publish` waits.
pub const PUBLISH_DELAY: Duration = Duration::from_millis(300);

const NAMES: &[(&str, Fault)] = &[
    ("crash-after-append", Fault::CrashAfterAppend),
    ("delay-publish", Fault::DelayPublish),
    ("skip-publish", Fault::SkipPublish),
    ("apply-retries-twice", Fault::ApplyRetriesTwice),
    ("drop-projection", Fault::DropProjection),
    ("stale-balance", Fault::StaleBalance),
    ("stale-history", Fault::StaleHistory),
    ("skip-credit", Fault::SkipCredit),
    ("stall-after-debit", Fault::StallAfterDebit),
];

/// The set of faults a process injects (empty: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults(u16);

impl Faults {
    /// No fault.
    pub const NONE: Faults = Faults(0);

    fn bit(fault: Fault) -> u16 {
        1 << NAMES
            .iter()
            .position(|(_, f)| *f == fault)
            .expect("every fault has a name")
    }

    /// Whether `fault` is injected.
    pub fn has(self, fault: Fault) -> bool {
        self.0 & Self::bit(fault) != 0
    }

    /// `crash-after-append,skip-publish`; empty or blank is none. An unknown name is an
    /// error that lists the known ones.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut faults = Faults::NONE;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some((_, fault)) = NAMES.iter().find(|(n, _)| *n == name) else {
                let known: Vec<_> = NAMES.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "{name:?} is not a fault (known: {})",
                    known.join(", ")
                ));
            };
            faults.0 |= Self::bit(*fault);
        }
        Ok(faults)
    }
}

impl fmt::Display for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = NAMES
            .iter()
            .filter(|(_, fault)| self.has(*fault))
            .map(|(n, _)| *n)
            .collect();
        f.write_str(&names.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_a_list_and_print_back() {
        let faults = Faults::parse(" skip-publish, stale-balance ,").unwrap();
        assert!(faults.has(Fault::SkipPublish) && faults.has(Fault::StaleBalance));
        assert!(!faults.has(Fault::CrashAfterAppend));
        assert_eq!(faults.to_string(), "skip-publish,stale-balance");
        assert_eq!(Faults::parse("").unwrap(), Faults::NONE);
        let refused = Faults::parse("lose-everything").unwrap_err();
        assert!(refused.contains("crash-after-append"), "{refused}");
    }
}
