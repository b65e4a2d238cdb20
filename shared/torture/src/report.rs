//! The report of a run: JSON (stable, machine-readable) and Markdown.

use crate::check::Verdict;
use crate::client::{Kind, Op, Outcome};
use crate::{FaultAt, FaultCounts, Load, Plan};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// How many examples of each violated invariant the report keeps.
const EXAMPLES: usize = 5;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub topology: &'static str,
    pub plan: Plan,
    /// Replays this run: `TORTURE_SEED=… make torture`.
    pub replay: String,
    pub load_seconds: f64,
    /// How long the read model took to equal the store after the load (the check reads
    /// it again every second, up to a minute).
    pub settled_seconds: f64,
    /// Operations by kind, then by outcome (`ok`, `fail`, `info`).
    pub operations: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Answers by status (`0`: none).
    pub statuses: BTreeMap<u16, u64>,
    pub faults: FaultCounts,
    /// Violations by invariant (every invariant, zero included).
    pub violations: BTreeMap<&'static str, usize>,
    /// Up to five examples per violated invariant.
    pub examples: BTreeMap<&'static str, Vec<String>>,
    /// Streams the store moved on after a reading judged the read model level with it
    /// (a late command, a transfer driven by the saga's sweep): the checker settled
    /// again. Not a violation; here so that a store read short once would show.
    pub moved_after_judged: Vec<String>,
    pub checked: Checked,
    /// Second by second: operations ended by outcome, and their latency.
    pub seconds: Vec<Second>,
    /// The nemesis's faults, in the order they came.
    pub fault_timeline: Vec<FaultAt>,
}

/// One second of the load.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Second {
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
    /// Latency of the operations that ended in it (ms), median and 99th percentile.
    pub p50_ms: u64,
    pub p99_ms: u64,
}

/// The operations by the second they ended in.
fn seconds(ops: &[Op], load_seconds: f64) -> Vec<Second> {
    let n = load_seconds.ceil().max(1.0) as usize;
    let mut out = vec![Second::default(); n];
    let mut latencies: Vec<Vec<u64>> = vec![Vec::new(); n];
    for op in ops {
        let i = usize::try_from(op.ended_ms / 1000)
            .unwrap_or(usize::MAX)
            .min(n - 1);
        match op.outcome {
            Outcome::Ok => out[i].ok += 1,
            Outcome::Fail => out[i].fail += 1,
            Outcome::Info => out[i].info += 1,
        }
        latencies[i].push(op.ended_ms.saturating_sub(op.started_ms));
    }
    for (second, mut l) in out.iter_mut().zip(latencies) {
        if l.is_empty() {
            continue;
        }
        l.sort_unstable();
        let at = |q: f64| l[((l.len() - 1) as f64 * q).round() as usize];
        second.p50_ms = at(0.5);
        second.p99_ms = at(0.99);
    }
    out
}

/// What the checker looked at.
#[derive(Clone, Debug, Serialize)]
pub struct Checked {
    pub streams: usize,
    pub commits: usize,
    pub events: usize,
    pub acknowledged_commands: usize,
    pub unknown_commands: usize,
    pub reads: usize,
    pub transfers: usize,
    pub total_balance_minor: i64,
}

fn outcome_name(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Fail => "fail",
        Outcome::Info => "info",
    }
}

impl Report {
    pub fn new(
        topology: &'static str,
        plan: &Plan,
        load: &Load,
        settled_seconds: f64,
        verdict: Verdict,
    ) -> Self {
        let (ops, load_seconds) = (&load.ops, load.seconds);
        let mut operations: BTreeMap<&'static str, BTreeMap<&'static str, u64>> = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        for op in ops {
            *operations
                .entry(op.kind.name())
                .or_default()
                .entry(outcome_name(op.outcome))
                .or_default() += 1;
            *statuses.entry(op.status.unwrap_or(0)).or_default() += 1;
        }
        for kind in [
            Kind::Open,
            Kind::Deposit,
            Kind::Withdraw,
            Kind::Close,
            Kind::Balance,
            Kind::Account,
        ] {
            operations.entry(kind.name()).or_default();
        }
        let mut examples: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for v in &verdict.violations {
            let list = examples.entry(v.invariant).or_default();
            if list.len() < EXAMPLES {
                list.push(v.detail.clone());
            }
        }
        Self {
            topology,
            plan: plan.clone(),
            replay: format!(
                "TORTURE_SEED={} TORTURE_SECONDS={} TORTURE_TOPOLOGY={} make torture",
                plan.seed, plan.seconds, topology
            ),
            load_seconds,
            settled_seconds,
            operations,
            statuses,
            faults: load.faults.clone(),
            violations: verdict.by_invariant(),
            examples,
            moved_after_judged: verdict.moved_after_judged.clone(),
            checked: Checked {
                streams: verdict.streams,
                commits: verdict.commits,
                events: verdict.events,
                acknowledged_commands: verdict.acknowledged_commands,
                unknown_commands: verdict.unknown_commands,
                reads: verdict.reads_checked,
                transfers: verdict.transfers,
                total_balance_minor: verdict.total_balance,
            },
            seconds: seconds(ops, load_seconds),
            fault_timeline: load.timeline.clone(),
        }
    }

    /// Violations in all.
    pub fn total_violations(&self) -> usize {
        self.violations.values().sum()
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# make torture: {} topology, seed {}\n",
            self.topology, self.plan.seed
        );
        let _ = writeln!(
            md,
            "{} s of load, {} clients, {} accounts ({} hot){}; the read model settled {:.1} s after it. Replay: `{}`\n",
            self.load_seconds.round(),
            self.plan.clients,
            self.plan.accounts,
            self.plan.hot,
            if self.plan.inject.is_empty() {
                String::new()
            } else {
                format!(", **deliberately broken: `{}`**", self.plan.inject)
            },
            self.settled_seconds,
            self.replay
        );
        let _ = writeln!(
            md,
            "**{} violations.**\n\n| invariant | violations |\n| --- | ---: |",
            self.total_violations()
        );
        for (invariant, n) in &self.violations {
            let _ = writeln!(md, "| `{invariant}` | {n} |");
        }
        let _ = writeln!(
            md,
            "\n| operation | ok | fail | info |\n| --- | ---: | ---: | ---: |"
        );
        for (kind, outcomes) in &self.operations {
            let n = |o| outcomes.get(o).copied().unwrap_or(0);
            let _ = writeln!(
                md,
                "| {kind} | {} | {} | {} |",
                n("ok"),
                n("fail"),
                n("info")
            );
        }
        let _ = writeln!(md, "\n| fault injected | times |\n| --- | ---: |");
        for (kind, n) in &self.faults {
            let _ = writeln!(md, "| {kind} | {n} |");
        }
        let c = &self.checked;
        let _ = writeln!(
            md,
            "\nChecked: {} streams, {} commits, {} events; {} acknowledged and {} unknown commands; {} reads; {} transfers; total balance {}.{:02}.",
            c.streams,
            c.commits,
            c.events,
            c.acknowledged_commands,
            c.unknown_commands,
            c.reads,
            c.transfers,
            c.total_balance_minor / 100,
            c.total_balance_minor % 100
        );
        if !self.moved_after_judged.is_empty() {
            let _ = writeln!(
                md,
                "\nThe store moved on after a reading judged the read model level with it, so the checker settled again: {}.",
                self.moved_after_judged.join("; ")
            );
        }
        if !self.examples.is_empty() {
            let _ = writeln!(md, "\n## Violations (up to {EXAMPLES} examples each)\n");
            for (invariant, list) in &self.examples {
                for e in list {
                    let _ = writeln!(md, "- `{invariant}`: {e}");
                }
            }
        }
        md
    }
}
