//! The checker: the history against the event store and the read model.
//!
//! Every invariant has a name (the report counts violations by it):
//!
//! | invariant | what is checked |
//! | --- | --- |
//! | `acknowledged-in-store` | every acknowledged command is in the store at the revision it was answered with (by its key, or by its event), with the balance it was answered with |
//! | `exactly-once` | no idempotency key is in two commits; no command is in the store more times than it was sent (acknowledged or unknown); a refused command is not there at all |
//! | `no-gap-no-overlap` | every stream's revisions run 1, 2, 3, … without a gap or an overlap |
//! | `no-negative-balance` | no balance at any revision is negative, and each is the one before plus or minus the movement |
//! | `read-model-equals-store` | after the quiet period, every account's revision, balance, status and every transaction row equal a fold of the store; an account the store lacks is a 404 |
//! | `conservation` | the sum of balances plus the money transfers debited and did not credit or refund equals what the store's deposits brought in minus what its withdrawals took out, with nothing in flight once every transfer ended; and that net lies between the acknowledged movements and the acknowledged plus the unknown ones |
//! | `every-transfer-ended` | after the quiet period every transfer in the store is completed, failed or reversed (and, under `exactly-once`, ended once, with the movements its end says: one debit and one credit, nothing, or a debit and its refund; requested by a client) |
//! | `min-revision` | a read that asked for `min_revision` got at least that revision |
//! | `monotonic-reads` | no balance read is older than a revision already acknowledged to the same client |
//! | `read-consistent` | a read's balance is the store's balance at the revision it names |
//! | `acknowledged-account-missing` | no read of an account whose opening was acknowledged before it started is a 404 |
//! | `no-5xx` | no 5xx answer other than a 503 with `Retry-After` |
//! | `every-commit-on-the-topic` | (stack) every commit of the store is on the topic, read from the start by a consumer of the checker's own |
//! | `no-crash` | (stack) no function process exited by itself |

use crate::client::{minor, Kind, Op, Outcome};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use tally_domain::{AccountEvent, AccountId, TransferEvent, TransferId, TransferStatus};
use tally_es::{Commit, EventStore, Revision, StreamId};

/// Every invariant the checker knows, in report order.
pub const INVARIANTS: &[&str] = &[
    "acknowledged-in-store",
    "exactly-once",
    "no-gap-no-overlap",
    "no-negative-balance",
    "read-model-equals-store",
    "conservation",
    "min-revision",
    "monotonic-reads",
    "read-consistent",
    "acknowledged-account-missing",
    "no-5xx",
    "every-commit-on-the-topic",
    "no-crash",
    "history-equals-store",
    "every-transfer-ended",
    "personal-data-sealed",
];

/// One broken invariant.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
}

/// What the checker found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Verdict {
    pub violations: Vec<Violation>,
    /// Figures of what was checked.
    pub streams: usize,
    pub commits: usize,
    pub events: usize,
    pub acknowledged_commands: usize,
    pub unknown_commands: usize,
    pub reads_checked: usize,
    /// Transfer streams in the store.
    pub transfers: usize,
    /// Sum of all balances in the store (minor units).
    pub total_balance: i64,
    /// Every stream's last revision as this check read it (accounts' and transfers'):
    /// two checks with the same heads read the same store.
    #[serde(skip)]
    pub heads: BTreeMap<String, u64>,
    /// The streams the store moved on between a reading that judged the read model
    /// level and the final reading (see `settle_and_check`), as `stream: from → to`.
    pub moved_after_judged: Vec<String>,
}

impl Verdict {
    pub fn violate(&mut self, invariant: &'static str, detail: String) {
        debug_assert!(INVARIANTS.contains(&invariant));
        self.violations.push(Violation { invariant, detail });
    }

    /// Violations by invariant (every invariant listed, zero included).
    pub fn by_invariant(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> =
            INVARIANTS.iter().map(|i| (*i, 0)).collect();
        for v in &self.violations {
            *counts.entry(v.invariant).or_default() += 1;
        }
        counts
    }
}

/// An account as the read model shows it through the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    pub revision: u64,
    pub balance: i64,
    pub closed: bool,
    /// (revision, kind, amount, balance after)
    pub transactions: Vec<(u64, String, i64, i64)>,
    /// The holder as `GET /accounts/{id}` shows it.
    pub holder: Value,
}

/// An as-of balance as the API answered it: (balance, revision answered), or the error.
pub type AsOfAnswer = Result<(i64, u64), String>;

/// What an account's past looked like through the API after the quiet period: as-of
/// balances at a few revisions, and the statement of its whole life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Past {
    /// (revision asked, what came back)
    pub as_of: Vec<(u64, AsOfAnswer)>,
    /// (opening, closing, revisions of the movements)
    pub statement: Result<(i64, i64, Vec<u64>), String>,
}

/// The read model after the quiet period, account by account (`None`: a 404), and the
/// accounts' past.
#[derive(Clone, Debug, Default)]
pub struct Observed(
    pub BTreeMap<String, Option<Shown>>,
    pub BTreeMap<String, Past>,
);

impl Observed {
    /// Read every account in `accounts` through the API at `base`.
    pub async fn from_api(base: &str, accounts: &[String]) -> Result<Self, String> {
        let api = Reader::new(base);
        let mut observed = BTreeMap::new();
        for account in accounts {
            let (status, body) = api.get(format!("/accounts/{account}")).await?;
            if status == 404 {
                observed.insert(account.clone(), None);
                continue;
            }
            if status != 200 {
                return Err(format!("GET /accounts/{account}: {status} {body}"));
            }
            let mut shown = Shown {
                revision: body["revision"].as_u64().unwrap_or(0),
                balance: body["balance"].as_str().and_then(minor).unwrap_or(-1),
                closed: body["status"].as_str() == Some("closed"),
                transactions: Vec::new(),
                holder: body["holder"].clone(),
            };
            let mut cursor: Option<String> = None;
            loop {
                let mut path = format!("/accounts/{account}/transactions?limit=100");
                if let Some(c) = &cursor {
                    path.push_str(&format!("&cursor={c}"));
                }
                let (status, page) = api.get(path).await?;
                if status != 200 {
                    return Err(format!("transactions of {account}: {status} {page}"));
                }
                for item in page["items"].as_array().into_iter().flatten() {
                    shown.transactions.push((
                        item["revision"].as_u64().unwrap_or(0),
                        item["type"].as_str().unwrap_or_default().to_owned(),
                        item["amount"].as_str().and_then(minor).unwrap_or(-1),
                        item["balance"].as_str().and_then(minor).unwrap_or(-1),
                    ));
                }
                cursor = page["next_cursor"].as_str().map(str::to_owned);
                if cursor.is_none() {
                    break;
                }
            }
            observed.insert(account.clone(), Some(shown));
        }
        Ok(Self(observed, BTreeMap::new()))
    }

    /// Read, through the API at `base`, the past of every account read before. Only
    /// once the read model has been judged: a statement catches its account up from
    /// the store, which would repair a read model whose projection is broken before
    /// the read-model check saw it.
    pub async fn read_past(&mut self, base: &str) -> Result<(), String> {
        let api = Reader::new(base);
        for (account, shown) in &self.0 {
            if let Some(shown) = shown {
                let past = past(&api, account, shown.revision).await?;
                self.1.insert(account.clone(), past);
            }
        }
        Ok(())
    }
}

/// The API at `base`, read with retries.
struct Reader {
    http: reqwest::Client,
    base: String,
}

impl Reader {
    fn new(base: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.to_owned(),
        }
    }

    /// GET `path`, again while the answer is a 503 (up to 5 s): (status, body).
    async fn get(&self, path: String) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.base);
        for _ in 0..50 {
            match self.http.get(&url).send().await {
                Ok(r) if r.status().as_u16() != 503 => {
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    return Ok((status, body));
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        Err(format!("GET {url} kept failing"))
    }
}

/// `account`'s past through the API: as-of balances at its first, last and three
/// revisions between, and the statement of every day from 2000 to 2100.
async fn past(api: &Reader, account: &str, last: u64) -> Result<Past, String> {
    let mut revisions: Vec<u64> = vec![1, last / 3, last / 2, last * 2 / 3, last];
    revisions.retain(|r| *r >= 1);
    revisions.dedup();
    let mut as_of = Vec::new();
    for r in revisions {
        let (status, body) = api
            .get(format!("/accounts/{account}/balance?as_of_revision={r}"))
            .await?;
        let answer = match (status, body["balance"].as_str().and_then(minor)) {
            (200, Some(balance)) => Ok((balance, body["revision"].as_u64().unwrap_or(0))),
            _ => Err(format!("{status} {body}")),
        };
        as_of.push((r, answer));
    }
    let (status, body) = api
        .get(format!(
            "/accounts/{account}/statement?from=2000-01-01&to=2100-01-01"
        ))
        .await?;
    let statement = match (
        status,
        body["opening_balance"].as_str().and_then(minor),
        body["closing_balance"].as_str().and_then(minor),
    ) {
        (200, Some(opening), Some(closing)) => Ok((
            opening,
            closing,
            body["movements"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m["revision"].as_u64().unwrap_or(0))
                .collect(),
        )),
        _ => Err(format!("{status} {body}")),
    };
    Ok(Past { as_of, statement })
}

/// The faults the clients themselves injected, counted from the history.
pub fn client_faults(ops: &[Op]) -> Vec<(&'static str, u64)> {
    vec![
        (
            "client-hang-up",
            ops.iter().filter(|o| o.hung_up).count() as u64,
        ),
        (
            "client-retry-same-key",
            ops.iter().filter(|o| o.retry).count() as u64,
        ),
    ]
}

/// One stream folded from the store.
#[derive(Default)]
struct Folded {
    revision: u64,
    balance: i64,
    closed: bool,
    /// Balance after each revision.
    balance_at: HashMap<u64, i64>,
    /// Revision → (event kind, amount, key of its commit).
    events: HashMap<u64, (Kind, Option<i64>, Option<String>)>,
    transactions: Vec<(u64, String, i64, i64)>,
    deposits: i64,
    withdrawals: i64,
    /// Transfers' credits and refunds in, and debits out.
    transferred_in: i64,
    transferred_out: i64,
    /// The holder was forgotten (`HolderForgotten`).
    forgotten: bool,
}

/// Check `ops` against `store` and the read model `observed`.
pub async fn check(
    ops: &[Op],
    store: &dyn EventStore,
    observed: &Observed,
) -> Result<Verdict, String> {
    let mut v = Verdict::default();
    let mut folded: BTreeMap<String, Folded> = BTreeMap::new();
    let mut keys: HashMap<(String, String), Vec<u64>> = HashMap::new();
    // A transfer's movements in the accounts: (account, kind, amount) by transfer id.
    let mut moves: HashMap<String, Vec<(String, &'static str, i64)>> = HashMap::new();
    let mut transfer_streams = Vec::new();

    // The store: every stream folded, checked for gaps, overlaps and negative balances.
    let streams = store.streams().await.map_err(|e| e.to_string())?;
    for stream in &streams {
        if AccountId::of_stream(stream).is_none() {
            // Another aggregate's stream (a transfer's): checked below.
            transfer_streams.push(stream.clone());
            continue;
        }
        let name = stream.as_str().to_owned();
        let commits = match store.read(stream, Revision::new(1)).await {
            Ok(c) => c,
            Err(e) => {
                v.violate("no-gap-no-overlap", format!("{name}: {e}"));
                continue;
            }
        };
        let mut f = Folded::default();
        if let Some(last) = commits.last() {
            v.heads.insert(name.clone(), last.last_revision().get());
        }
        for stored in &commits {
            v.commits += 1;
            if stored.revision.get() != f.revision + 1 {
                v.violate(
                    "no-gap-no-overlap",
                    format!(
                        "{name}: a commit at {} follows revision {}",
                        stored.revision, f.revision
                    ),
                );
            }
            let bytes = stored.to_bytes();
            if let Some(marker) = crate::client::CLEAR_MARKERS
                .iter()
                .find(|m| bytes.windows(m.len()).any(|w| w == m.as_bytes()))
            {
                v.violate(
                    "personal-data-sealed",
                    format!(
                        "{name}: the commit at {} holds `{marker}` in the clear",
                        stored.revision
                    ),
                );
            }
            let commit = Commit::<AccountEvent>::decode(stored).map_err(|e| e.to_string())?;
            let key = commit.metadata.idempotency_key.clone();
            if let Some(k) = &key {
                keys.entry((name.clone(), k.clone()))
                    .or_default()
                    .push(stored.revision.get());
            }
            for (revision, event) in commit.numbered() {
                v.events += 1;
                let r = revision.get();
                let (kind, amount) = match event {
                    AccountEvent::Opened { .. } => (Kind::Open, None),
                    AccountEvent::Deposited { amount, balance } => {
                        f.deposits += amount;
                        check_step(&mut v, &name, r, f.balance + amount, *balance);
                        f.balance = *balance;
                        f.transactions
                            .push((r, "deposit".into(), *amount, *balance));
                        (Kind::Deposit, Some(*amount))
                    }
                    AccountEvent::Withdrawn { amount, balance } => {
                        f.withdrawals += amount;
                        check_step(&mut v, &name, r, f.balance - amount, *balance);
                        f.balance = *balance;
                        f.transactions
                            .push((r, "withdrawal".into(), *amount, *balance));
                        (Kind::Withdraw, Some(*amount))
                    }
                    AccountEvent::Closed => {
                        f.closed = true;
                        (Kind::Close, None)
                    }
                    AccountEvent::HolderForgotten { balance } => {
                        // The ledger is unmoved.
                        check_step(&mut v, &name, r, f.balance, *balance);
                        f.forgotten = true;
                        (Kind::Forget, None)
                    }
                    AccountEvent::TransferredIn {
                        amount, balance, ..
                    }
                    | AccountEvent::TransferRefunded {
                        amount, balance, ..
                    }
                    | AccountEvent::TransferredOut {
                        amount, balance, ..
                    } => {
                        // A transfer's step: no client operation of its own.
                        let out = matches!(event, AccountEvent::TransferredOut { .. });
                        let signed = if out { -amount } else { *amount };
                        if out {
                            f.transferred_out += amount;
                        } else {
                            f.transferred_in += amount;
                        }
                        check_step(&mut v, &name, r, f.balance + signed, *balance);
                        f.balance = *balance;
                        let row = match event {
                            AccountEvent::TransferredIn { .. } => "transfer-in",
                            AccountEvent::TransferRefunded { .. } => "transfer-refund",
                            _ => "transfer-out",
                        };
                        f.transactions.push((r, row.into(), *amount, *balance));
                        if let Some((transfer, _)) = event.transfer() {
                            moves.entry(transfer.to_string()).or_default().push((
                                name.clone(),
                                row,
                                *amount,
                            ));
                        }
                        f.revision = r;
                        f.balance_at.insert(r, f.balance);
                        continue;
                    }
                };
                f.revision = r;
                f.balance_at.insert(r, f.balance);
                f.events.insert(r, (kind, amount, key.clone()));
            }
        }
        folded.insert(name, f);
    }
    v.streams = folded.len();

    for ((account, key), revisions) in &keys {
        if revisions.len() > 1 {
            v.violate(
                "exactly-once",
                format!("{account}: Idempotency-Key {key} is in the commits at {revisions:?}"),
            );
        }
    }

    check_transfers(&mut v, ops, store, &transfer_streams, &moves).await?;
    check_commands(&mut v, ops, &folded);
    check_reads(&mut v, ops, &folded);
    check_read_model(&mut v, observed, &folded);
    check_holders(&mut v, ops, observed, &folded);
    check_history(&mut v, observed, &folded);

    // Conservation.
    let total: i64 = folded.values().map(|f| f.balance).sum();
    let net: i64 = folded.values().map(|f| f.deposits - f.withdrawals).sum();
    // Debited by a transfer and not yet credited or refunded.
    let in_flight: i64 = folded
        .values()
        .map(|f| f.transferred_out - f.transferred_in)
        .sum();
    v.total_balance = total;
    if total + in_flight != net || in_flight != 0 {
        v.violate(
            "conservation",
            format!(
                "balances sum to {total} with {in_flight} in flight between accounts; deposits minus withdrawals to {net}"
            ),
        );
    }
    let (acked, unknown_in, unknown_out) = acknowledged_net(ops);
    if net < acked - unknown_out || net > acked + unknown_in {
        v.violate(
            "conservation",
            format!(
                "the store's net {net} is outside [{}, {}]: acknowledged {acked}, unknown deposits {unknown_in}, unknown withdrawals {unknown_out}",
                acked - unknown_out,
                acked + unknown_in
            ),
        );
    }
    Ok(v)
}

fn check_step(v: &mut Verdict, account: &str, revision: u64, expected: i64, balance: i64) {
    if balance < 0 {
        v.violate(
            "no-negative-balance",
            format!("{account}: balance {balance} at revision {revision}"),
        );
    }
    if balance != expected {
        v.violate(
            "no-negative-balance",
            format!("{account}: balance {balance} at revision {revision}, expected {expected}"),
        );
    }
}

/// The distinct commands of `ops` (a keyed command and its retries are one), with the
/// outcome that counts: ok if any attempt was acknowledged, else unknown if any was,
/// else refused.
fn distinct_commands(ops: &[Op]) -> Vec<(Op, Outcome)> {
    let mut keyed: HashMap<(&str, &str), (Op, Outcome)> = HashMap::new();
    let mut out = Vec::new();
    for op in ops.iter().filter(|o| o.kind.is_command()) {
        match &op.key {
            None => out.push((op.clone(), op.outcome)),
            Some(key) => {
                let entry = keyed
                    .entry((op.account.as_str(), key.as_str()))
                    .or_insert_with(|| (op.clone(), op.outcome));
                let better = match (entry.1, op.outcome) {
                    (Outcome::Ok, _) => false,
                    (_, Outcome::Ok) => true,
                    (Outcome::Fail, Outcome::Info) => true,
                    _ => false,
                };
                if better {
                    *entry = (op.clone(), op.outcome);
                }
            }
        }
    }
    out.extend(keyed.into_values());
    out
}

/// Acknowledged deposits minus withdrawals, and the unknown deposits and withdrawals.
/// Every transfer ended exactly once, moved the money as its end says (once), and was
/// requested by a client; every acknowledged transfer is in the store.
async fn check_transfers(
    v: &mut Verdict,
    ops: &[Op],
    store: &dyn EventStore,
    streams: &[StreamId],
    moves: &HashMap<String, Vec<(String, &'static str, i64)>>,
) -> Result<(), String> {
    use tally_es::Aggregate;
    let requested: HashSet<String> = ops
        .iter()
        .filter(|o| o.kind == Kind::Transfer)
        .filter_map(|o| o.key.as_deref())
        .map(|k| TransferId::from_key("", k).to_string())
        .collect();
    let mut present = HashSet::new();
    for stream in streams {
        let Some(id) = TransferId::of_stream(stream) else {
            continue;
        };
        v.transfers += 1;
        let id = id.to_string();
        present.insert(id.clone());
        // A stream listed a moment ago may be gone: the outbox record of a request cut
        // off before its append, abandoned by the relay, and its directory with it. An
        // acknowledged transfer missing from the store still shows, below.
        let stored = store
            .read(stream, Revision::new(1))
            .await
            .unwrap_or_default();
        let mut state = tally_domain::Transfer::default();
        let mut ends = 0;
        for s in &stored {
            let commit = Commit::<TransferEvent>::decode(s).map_err(|e| e.to_string())?;
            for event in &commit.events {
                state.apply(event);
                ends += usize::from(state.status.is_final());
            }
        }
        if let Some(last) = stored.last() {
            v.heads
                .insert(stream.as_str().to_owned(), last.last_revision().get());
        }
        if stored.is_empty() {
            // Listed, but no commit: a request cut off between its outbox record and
            // its append (the outbox sits beside the stream). Nothing was requested.
            v.transfers -= 1;
            continue;
        }
        if !requested.contains(&id) {
            v.violate(
                "exactly-once",
                format!("transfer {id}: no client requested it"),
            );
        }
        if !state.status.is_final() {
            v.violate(
                "every-transfer-ended",
                format!("transfer {id} is still {:?}", state.status),
            );
            continue;
        }
        if ends != 1 {
            v.violate("exactly-once", format!("transfer {id} ended {ends} times"));
        }
        let (from, to) = (
            state
                .from
                .as_ref()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            state.to.as_ref().map(|a| a.to_string()).unwrap_or_default(),
        );
        let amount = state.amount;
        let expected: Vec<(String, &'static str, i64)> = match state.status {
            TransferStatus::Completed => {
                vec![(from, "transfer-out", amount), (to, "transfer-in", amount)]
            }
            TransferStatus::Reversed => vec![
                (from.clone(), "transfer-out", amount),
                (from, "transfer-refund", amount),
            ],
            _ => Vec::new(),
        };
        let mut got = moves.get(&id).cloned().unwrap_or_default();
        let mut want = expected;
        got.sort();
        want.sort();
        if got != want {
            v.violate(
                "exactly-once",
                format!(
                    "transfer {id} ended {:?} but the accounts hold {got:?}",
                    state.status
                ),
            );
        }
    }
    for id in moves.keys().filter(|id| !present.contains(*id)) {
        v.violate(
            "exactly-once",
            format!("money moved for transfer {id}, which the store does not hold"),
        );
    }
    for op in ops
        .iter()
        .filter(|o| o.kind == Kind::Transfer && o.outcome == Outcome::Ok)
    {
        v.acknowledged_commands += 1;
        match &op.transfer {
            Some(id) if present.contains(id) => {}
            other => v.violate(
                "acknowledged-in-store",
                format!(
                    "transfer {:?} (key {:?}) was acknowledged; the store lacks it",
                    other, op.key
                ),
            ),
        }
    }
    Ok(())
}

fn acknowledged_net(ops: &[Op]) -> (i64, i64, i64) {
    let (mut acked, mut unknown_in, mut unknown_out) = (0, 0, 0);
    for (op, outcome) in distinct_commands(ops) {
        let amount = op.amount.unwrap_or(0);
        match (op.kind, outcome) {
            (Kind::Deposit, Outcome::Ok) => acked += amount,
            (Kind::Withdraw, Outcome::Ok) => acked -= amount,
            (Kind::Deposit, Outcome::Info) => unknown_in += amount,
            (Kind::Withdraw, Outcome::Info) => unknown_out += amount,
            _ => {}
        }
    }
    (acked, unknown_in, unknown_out)
}

fn check_commands(v: &mut Verdict, ops: &[Op], folded: &BTreeMap<String, Folded>) {
    // Acknowledged commands are in the store, at their revision.
    for op in ops
        .iter()
        .filter(|o| o.kind.is_account_command() && o.outcome == Outcome::Ok)
    {
        v.acknowledged_commands += 1;
        let Some(revision) = op.revision else {
            v.violate(
                "acknowledged-in-store",
                format!(
                    "{} {}: acknowledged without a revision",
                    op.kind.name(),
                    op.account
                ),
            );
            continue;
        };
        let found = folded
            .get(&op.account)
            .and_then(|f| f.events.get(&revision).map(|e| (f, e)));
        let Some((f, (kind, amount, key))) = found else {
            v.violate(
                "acknowledged-in-store",
                format!(
                    "{} {} acknowledged at revision {revision}, which the store lacks",
                    op.kind.name(),
                    op.account
                ),
            );
            continue;
        };
        let same = match &op.key {
            Some(k) => key.as_deref() == Some(k.as_str()),
            None => *kind == op.kind && *amount == op.amount,
        };
        if !same {
            v.violate(
                "acknowledged-in-store",
                format!(
                    "{} {} (key {:?}) acknowledged at revision {revision}, which holds another command",
                    op.kind.name(),
                    op.account,
                    op.key
                ),
            );
        }
        if let Some(balance) = op.balance {
            if f.balance_at.get(&revision) != Some(&balance) {
                v.violate(
                    "acknowledged-in-store",
                    format!(
                        "{} {} answered balance {balance} at revision {revision}; the store has {:?}",
                        op.kind.name(),
                        op.account,
                        f.balance_at.get(&revision)
                    ),
                );
            }
        }
    }

    // Nothing is in the store more often than it was sent; nothing refused is there.
    let commands = distinct_commands(ops);
    v.unknown_commands = commands.iter().filter(|(_, o)| *o == Outcome::Info).count();
    let mut sent_keys: HashMap<(&str, &str), Outcome> = HashMap::new();
    let mut allowance: HashMap<(&str, Kind, Option<i64>), i64> = HashMap::new();
    for (op, outcome) in &commands {
        match &op.key {
            Some(k) => {
                sent_keys.insert((op.account.as_str(), k.as_str()), *outcome);
            }
            None if *outcome != Outcome::Fail => {
                *allowance
                    .entry((op.account.as_str(), op.kind, op.amount))
                    .or_default() += 1;
            }
            None => {}
        }
    }
    for (account, f) in folded {
        let mut revisions: Vec<_> = f.events.keys().copied().collect();
        revisions.sort_unstable();
        for r in revisions {
            let (kind, amount, key) = &f.events[&r];
            match key {
                Some(k) => match sent_keys.get(&(account.as_str(), k.as_str())) {
                    Some(Outcome::Fail) => v.violate(
                        "exactly-once",
                        format!(
                            "{account}: the refused command with key {k} is in the store at {r}"
                        ),
                    ),
                    Some(_) => {}
                    None => v.violate(
                        "exactly-once",
                        format!("{account}: revision {r} carries key {k}, which no client sent"),
                    ),
                },
                None => {
                    let left = allowance
                        .entry((account.as_str(), *kind, *amount))
                        .or_default();
                    *left -= 1;
                    if *left < 0 {
                        v.violate(
                            "exactly-once",
                            format!(
                                "{account}: {} {amount:?} at revision {r} is in the store more often than it was sent",
                                kind.name()
                            ),
                        );
                    }
                }
            }
        }
    }
}

fn check_reads(v: &mut Verdict, ops: &[Op], folded: &BTreeMap<String, Folded>) {
    // When each account's opening was first acknowledged.
    let mut opened_at: HashMap<&str, u64> = HashMap::new();
    for op in ops
        .iter()
        .filter(|o| o.kind == Kind::Open && o.outcome == Outcome::Ok)
    {
        let at = opened_at.entry(op.account.as_str()).or_insert(op.ended_ms);
        *at = (*at).min(op.ended_ms);
    }
    for op in ops {
        if let Some(status) = op.status {
            if status >= 500 && !(status == 503 && op.retry_after.is_some()) {
                v.violate(
                    "no-5xx",
                    format!(
                        "{} {}: {status} {:?}",
                        op.kind.name(),
                        op.account,
                        op.problem
                    ),
                );
            }
        }
        if op.kind.is_command() {
            continue;
        }
        if op.status == Some(404)
            && opened_at
                .get(op.account.as_str())
                .is_some_and(|at| *at < op.started_ms)
        {
            v.violate(
                "acknowledged-account-missing",
                format!(
                    "{} {} answered 404 at {} ms; its opening was acknowledged at {} ms",
                    op.kind.name(),
                    op.account,
                    op.started_ms,
                    opened_at[op.account.as_str()]
                ),
            );
        }
        if op.outcome != Outcome::Ok {
            continue;
        }
        v.reads_checked += 1;
        let revision = op.revision.unwrap_or(0);
        if let Some(min) = op.min_revision {
            if revision < min {
                v.violate(
                    "min-revision",
                    format!(
                        "{} {}: asked for {min}, got {revision}",
                        op.kind.name(),
                        op.account
                    ),
                );
            }
        }
        if op.kind == Kind::Balance && revision < op.floor {
            v.violate(
                "monotonic-reads",
                format!(
                    "balance {}: revision {revision} after client {} was acknowledged revision {} \
                     (the read ran {}–{} ms into the load)",
                    op.account, op.client, op.floor, op.started_ms, op.ended_ms
                ),
            );
        }
        let real = folded
            .get(&op.account)
            .and_then(|f| f.balance_at.get(&revision));
        if op.balance.is_some() && real != op.balance.as_ref() {
            v.violate(
                "read-consistent",
                format!(
                    "{} {}: balance {:?} at revision {revision}; the store has {real:?}",
                    op.kind.name(),
                    op.account,
                    op.balance
                ),
            );
        }
    }
}

fn check_read_model(v: &mut Verdict, observed: &Observed, folded: &BTreeMap<String, Folded>) {
    let mut names: HashSet<&String> = observed.0.keys().collect();
    names.extend(folded.keys());
    for name in names {
        let expected = folded.get(name).map(|f| Shown {
            revision: f.revision,
            balance: f.balance,
            closed: f.closed,
            transactions: f.transactions.clone(),
            // Judged by `check_holders`.
            holder: observed
                .0
                .get(name)
                .and_then(|s| s.as_ref())
                .map_or(Value::Null, |s| s.holder.clone()),
        });
        let Some(shown) = observed.0.get(name) else {
            // Not read through the API (not one of the run's accounts).
            continue;
        };
        if *shown != expected {
            let brief = |s: &Option<Shown>| {
                s.as_ref().map(|s| {
                    format!(
                        "revision {}, balance {}, closed {}, {} rows",
                        s.revision,
                        s.balance,
                        s.closed,
                        s.transactions.len()
                    )
                })
            };
            let first_row_apart = match (shown, &expected) {
                (Some(a), Some(b)) => a
                    .transactions
                    .iter()
                    .zip(&b.transactions)
                    .find(|(x, y)| x != y)
                    .map(|(x, y)| format!("; first row apart: {x:?} against {y:?}")),
                _ => None,
            };
            v.violate(
                "read-model-equals-store",
                format!(
                    "{name}: the read model shows {:?}, the store folds to {:?}{}",
                    brief(shown),
                    brief(&expected),
                    first_row_apart.unwrap_or_default()
                ),
            );
        }
    }
}

/// As-of balances and statements against the fold: each as-of balance is the folded
/// balance at the revision asked (and says so), and the whole-life statement opens at
/// zero, closes at the final balance and lists every movement.
fn check_history(v: &mut Verdict, observed: &Observed, folded: &BTreeMap<String, Folded>) {
    for (name, past) in &observed.1 {
        let Some(f) = folded.get(name) else {
            v.violate(
                "history-equals-store",
                format!("{name}: the API shows a past the store does not have"),
            );
            continue;
        };
        for (revision, answer) in &past.as_of {
            let expected = f.balance_at.get(revision).map(|b| (*b, *revision));
            if answer.as_ref().ok() != expected.as_ref() {
                v.violate(
                    "history-equals-store",
                    format!(
                        "{name}: as_of_revision={revision} answered {answer:?}, the store folds to {expected:?}"
                    ),
                );
            }
        }
        let movements: Vec<u64> = f.transactions.iter().map(|t| t.0).collect();
        let expected = Ok((0, f.balance, movements));
        if past.statement != expected {
            v.violate(
                "history-equals-store",
                format!(
                    "{name}: the whole-life statement is {:?}, the store folds to {expected:?}",
                    past.statement
                ),
            );
        }
    }
}

/// An account id for the store (the harness's names are valid ids).
pub fn stream(name: &str) -> Option<StreamId> {
    AccountId::parse(name).ok().map(|id| id.stream_id().clone())
}

/// Every account shows its holder's details as its opening gave them, or — once
/// forgotten (`HolderForgotten` in the store) — as erased. A forget that was sent but
/// not acknowledged may have destroyed the key before its append failed (it destroys
/// first, so that a crash never leaves the details readable): then either is right.
fn check_holders(
    v: &mut Verdict,
    ops: &[Op],
    observed: &Observed,
    folded: &BTreeMap<String, Folded>,
) {
    let attempted: HashSet<&str> = ops
        .iter()
        .filter(|o| o.kind == Kind::Forget)
        .map(|o| o.account.as_str())
        .collect();
    for (account, f) in folded {
        let Some(Some(shown)) = observed.0.get(account) else {
            continue;
        };
        let erased = serde_json::json!({"erased": true});
        let details = serde_json::json!({
            "name": crate::client::holder_name(account),
            "email": crate::client::holder_email(account),
        });
        let expected = if f.forgotten { &erased } else { &details };
        let either = !f.forgotten && attempted.contains(account.as_str()) && shown.holder == erased;
        if shown.holder != *expected && !either {
            v.violate(
                "personal-data-sealed",
                format!(
                    "{account}: the holder shows as {}, expected {expected}",
                    shown.holder
                ),
            );
        }
    }
}
