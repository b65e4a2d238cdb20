//! `tally-postgres`: the account read model in PostgreSQL, and the event store on it
//! ([`PgEventStore`], `TALLY_STORE=postgres`; see `store`).
//!
//! [`PgReadModel::apply`] runs one transaction per commit: it locks the account row,
//! applies the commit only if its first revision is exactly the stored revision + 1,
//! skips it if it was applied before, and reports a gap otherwise — never skipping one.
//! `apply_runs` does the same for runs of commits of many streams in one transaction
//! (one query locking the rows, one multi-row INSERT per table, one UPDATE of every
//! account): rebuilds and catch-ups; `apply` and `apply_all` are runs of one.
//! The schema lives in `migrations/` and is embedded: [`migrate`] runs it once per
//! deploy (the `migrate` function), not at every function's start-up.

use async_trait::async_trait;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
pub use sqlx::PgPool;
use sqlx::{Connection, PgConnection, Postgres, Row, Transaction};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;
use tally_app::commands::floor_to_the_microsecond;
use tally_app::{
    AccountView, Applied, ReadModel, ReadModelError, RebuildBegun, TransactionKind, TransactionView,
};
use tally_domain::{AccountEvent, AccountId, Currency, Owner, TransferId};
use tally_es::{Commit, Revision};

mod store;
pub use store::{GlobalPosition, PgEventStore};

/// The movements' foreign key to their account, as the first migration names it
/// (`transactions.account_id REFERENCES accounts (id) ON DELETE CASCADE`).
const MOVEMENTS_FOREIGN_KEY: &str = "transactions_account_id_fkey";

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn pool_options(
    url: &str,
    max_connections: u32,
) -> Result<(PgPoolOptions, PgConnectOptions), sqlx::Error> {
    let options = PgConnectOptions::from_str(url)?
        .options([("statement_timeout", "5000")])
        .application_name("tally");
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(3));
    Ok((pool, options))
}

/// Connect a pool to `url` (e.g. `postgres://tally@127.0.0.1/tally`) now; fails when
/// the server is unreachable. Statements time out after 5 s.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = pool_options(url, max_connections)?;
    pool.connect_with(options).await
}

/// A pool that connects on first use, so a process starts while PostgreSQL is down;
/// connections idle for `idle` are closed (a process keeps only what it uses of the
/// server's connections).
pub fn connect_lazy(
    url: &str,
    max_connections: u32,
    idle: Duration,
) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = pool_options(url, max_connections)?;
    Ok(pool.idle_timeout(idle).connect_lazy_with(options))
}

/// Apply every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The read model over a pool.
#[derive(Clone)]
pub struct PgReadModel {
    pool: PgPool,
    /// While this process rebuilds: the session holding the rebuild's advisory lock
    /// (see [`REBUILD_LOCK`]), on which the rebuild's start, switch and abandon run.
    rebuilding: std::sync::Arc<tokio::sync::Mutex<Option<PoolConnection<Postgres>>>>,
}

/// The session-level advisory lock one rebuild of a read model holds from its start to
/// its switch or abandon: the schema's name under this key. PostgreSQL scopes advisory
/// locks to the database and releases a session's when the session ends, so a rebuild
/// whose process died (or whose connection was terminated) holds nothing, and the next
/// one drops what it left.
const REBUILD_LOCK: &str = "SELECT pg_try_advisory_lock(1952541817, hashtext(current_schema()))";
const REBUILD_UNLOCK: &str = "SELECT pg_advisory_unlock(1952541817, hashtext(current_schema()))";

impl PgReadModel {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            rebuilding: Default::default(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Apply runs to the generation `tables` (see `apply_runs`).
    async fn apply_runs_to(
        &self,
        tables: Tables,
        runs: &[&[Commit<AccountEvent>]],
    ) -> Result<Vec<Applied>, ReadModelError> {
        for _ in 0..REPLANS {
            let mut tx = self.pool.begin().await.map_err(unavailable)?;
            let Some(outcomes) = apply_in(&mut tx, tables, runs).await? else {
                tx.rollback().await.map_err(unavailable)?;
                continue;
            };
            if outcomes.contains(&Applied::Applied) {
                tx.commit().await.map_err(unavailable)?;
            } else {
                tx.rollback().await.map_err(unavailable)?;
            }
            return Ok(outcomes);
        }
        Err(ReadModelError(format!(
            "accounts kept being opened by concurrent transactions; gave up after {REPLANS} plans"
        )))
    }

    /// Run `statements` in order in one transaction: all of them take effect or none.
    async fn in_one_transaction(&self, statements: &[&str]) -> Result<(), ReadModelError> {
        let mut connection = self.pool.acquire().await.map_err(unavailable)?;
        in_one_transaction(&mut connection, statements).await
    }
}

/// `statements` in one transaction on `connection`.
async fn in_one_transaction(
    connection: &mut PgConnection,
    statements: &[&str],
) -> Result<(), ReadModelError> {
    let mut tx = connection.begin().await.map_err(unavailable)?;
    for statement in statements {
        sqlx::query(statement)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
    }
    tx.commit().await.map_err(unavailable)
}

/// Close `connection` rather than return it to the pool: a session ends with every
/// advisory lock it held (a pooled one would keep them).
async fn close(connection: PoolConnection<Postgres>) {
    if let Err(e) = connection.detach().close().await {
        tracing::debug!(error = %e, "closing the rebuild's session");
    }
}

fn unavailable(e: sqlx::Error) -> ReadModelError {
    ReadModelError(e.to_string())
}

/// A movement row (`revision, kind, amount, balance, recorded_at, transfer,
/// counterparty`).
fn transaction_view(r: &sqlx::postgres::PgRow) -> Result<TransactionView, ReadModelError> {
    let kind: &str = r.get("kind");
    let transfer: Option<&str> = r.get("transfer");
    let counterparty: Option<&str> = r.get("counterparty");
    let transfer = match (transfer, counterparty) {
        (Some(t), Some(c)) => Some((
            TransferId::parse(t).map_err(|e| ReadModelError(format!("transfer {t:?}: {e}")))?,
            AccountId::parse(c).map_err(|e| ReadModelError(format!("counterparty {c:?}: {e}")))?,
        )),
        _ => None,
    };
    Ok(TransactionView {
        revision: revision(r.get("revision")),
        kind: TransactionKind::named(kind)
            .ok_or_else(|| ReadModelError(format!("a movement of unknown kind {kind:?}")))?,
        amount: r.get("amount"),
        balance: r.get("balance"),
        recorded_at: r.get("recorded_at"),
        transfer,
    })
}

/// `t` rounded up to the microsecond, PostgreSQL's precision: for a time `c` kept to
/// the microsecond, `c >= t` exactly when `c >= ceil_to_the_microsecond(t)`.
fn ceil_to_the_microsecond(t: time::OffsetDateTime) -> time::OffsetDateTime {
    let floor = floor_to_the_microsecond(t);
    if floor == t {
        t
    } else {
        floor + time::Duration::microseconds(1)
    }
}

/// An account row (`currency, balance, closed, revision, opened_at, updated_at, owner`).
fn account_view(id: &AccountId, r: &sqlx::postgres::PgRow) -> Result<AccountView, ReadModelError> {
    Ok(AccountView {
        id: id.clone(),
        currency: Currency::parse(r.get::<&str, _>("currency"))
            .map_err(|e| ReadModelError(e.to_string()))?,
        balance: r.get("balance"),
        closed: r.get("closed"),
        revision: revision(r.get("revision")),
        opened_at: r.get("opened_at"),
        updated_at: r.get("updated_at"),
        owner: r
            .get::<Option<&str>, _>("owner")
            .map(Owner::parse)
            .transpose()
            .map_err(|e| ReadModelError(e.to_string()))?,
    })
}

fn revision(n: i64) -> Revision {
    Revision::new(u64::try_from(n).unwrap_or(0))
}

fn db_revision(r: Revision) -> i64 {
    i64::try_from(r.get()).unwrap_or(i64::MAX)
}

/// What one run of commits does to its account, planned from the locked row.
struct Planned<'a> {
    /// The run's place in the batch (its outcome's index).
    index: usize,
    id: &'a str,
    /// The commits the read model lacks, starting right after its position.
    new: &'a [Commit<AccountEvent>],
    /// The `Opened` event's currency, revision and time, when the run opens the account.
    opens: Option<(&'a str, Revision, time::OffsetDateTime, Option<&'a str>)>,
    /// The account after the run (before it: as the locked row has it).
    balance: i64,
    closed: bool,
}

impl Planned<'_> {
    fn last(&self) -> &Commit<AccountEvent> {
        self.new.last().expect("a plan has new commits")
    }
}

/// Apply runs of commits of distinct streams in `tx`: one row lock query for all of
/// them, one INSERT of the accounts they open, one INSERT of every transaction row, one
/// UPDATE of every account. Each run's outcome is what applying it alone would give.
///
/// `Ok(None)`: another transaction inserted an account this one was opening after the
/// row lock found none; the plan rests on a position that no longer holds, so nothing
/// may be applied (nor reported a duplicate: the commits after the opening may well be
/// new). The caller rolls back and plans again on the rows as they are now.
async fn apply_in(
    tx: &mut Transaction<'_, Postgres>,
    tables: Tables,
    runs: &[&[Commit<AccountEvent>]],
) -> Result<Option<Vec<Applied>>, ReadModelError> {
    let Tables {
        accounts,
        transactions,
        ..
    } = tables;
    let mut outcomes = vec![Applied::Duplicate; runs.len()];
    let ids: Vec<&str> = runs
        .iter()
        .filter_map(|run| run.first().map(|c| c.stream.as_str()))
        .collect();
    if ids.is_empty() {
        return Ok(Some(outcomes));
    }
    if ids.len() != ids.iter().collect::<HashSet<_>>().len() {
        return Err(ReadModelError(
            "a batch holds two runs of one stream".into(),
        ));
    }
    // Locked in id order, so two batches over the same accounts cannot deadlock.
    let rows = sqlx::query(&format!(
        "SELECT id, revision, balance, closed FROM {accounts} WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    ))
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(unavailable)?;
    let mut current: HashMap<String, (Revision, i64, bool)> = HashMap::with_capacity(rows.len());
    for r in &rows {
        current.insert(
            r.get("id"),
            (
                revision(r.get::<i64, _>("revision")),
                r.get::<i64, _>("balance"),
                r.get::<bool, _>("closed"),
            ),
        );
    }

    let mut plans: Vec<Planned> = Vec::new();
    for (index, run) in runs.iter().enumerate() {
        let Some(first) = run.first() else { continue };
        let id = first.stream.as_str();
        let (position, balance, closed) =
            current
                .get(id)
                .copied()
                .unwrap_or((Revision::ZERO, 0, false));
        let new = &run[run.partition_point(|c| c.last_revision() <= position)..];
        let Some(next) = new.first() else { continue };
        if next.revision != position.next() {
            outcomes[index] = Applied::Gap {
                expected: position.next(),
            };
            continue;
        }
        let opens = match (position, next.events.first()) {
            (
                Revision::ZERO,
                Some(AccountEvent::Opened {
                    currency, owner, ..
                }),
            ) => Some((
                currency.code(),
                next.revision,
                next.recorded_at,
                owner.as_ref().map(Owner::as_str),
            )),
            (Revision::ZERO, _) => {
                return Err(ReadModelError(format!(
                    "stream {id} does not start with AccountOpened"
                )))
            }
            _ => None,
        };
        plans.push(Planned {
            index,
            id,
            new,
            opens,
            balance,
            closed,
        });
    }

    // Open the new accounts. One that is already there was opened by a concurrent
    // transaction since the row lock above (ON CONFLICT waited for it to commit).
    let opening: Vec<&Planned> = plans.iter().filter(|p| p.opens.is_some()).collect();
    if !opening.is_empty() {
        let opens = || opening.iter().filter_map(|p| p.opens);
        let inserted: Vec<String> = sqlx::query_scalar(&format!(
            "INSERT INTO {accounts} (id, currency, balance, closed, revision, opened_at, updated_at, owner)
             SELECT id, currency, 0, FALSE, revision, at, at, owner
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::text[])
                 AS o(id, currency, revision, at, owner)
             ON CONFLICT (id) DO NOTHING RETURNING id",
        ))
        .bind(opening.iter().map(|p| p.id).collect::<Vec<_>>())
        .bind(opens().map(|o| o.0).collect::<Vec<_>>())
        .bind(opens().map(|o| db_revision(o.1)).collect::<Vec<_>>())
        .bind(opens().map(|o| o.2).collect::<Vec<_>>())
        .bind(opens().map(|o| o.3).collect::<Vec<_>>())
        .fetch_all(&mut **tx)
        .await
        .map_err(unavailable)?;
        if inserted.len() != opening.len() {
            return Ok(None);
        }
    }
    if plans.is_empty() {
        return Ok(Some(outcomes));
    }

    // The transactions of every run that goes in, with one INSERT (arrays unnested).
    let mut rows = TransactionRows::default();
    for plan in &mut plans {
        for commit in plan.new {
            for (rev, event) in commit.numbered() {
                if matches!(event, AccountEvent::Closed) {
                    plan.closed = true;
                }
                if let Some(movement) = TransactionView::of_event(rev, event, commit.recorded_at) {
                    plan.balance = movement.balance;
                    rows.push(plan.id, &movement);
                }
            }
        }
    }
    if rows.revision.is_empty() {
        // Nothing to insert.
    } else if tables.bulk {
        rows.copy_into(tx, transactions).await?;
    } else {
        sqlx::query(&format!(
            "INSERT INTO {transactions} ({})
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::timestamptz[], $7::text[], $8::text[])",
            TransactionRows::COLUMNS
        ))
        .bind(&rows.account_id)
        .bind(&rows.revision)
        .bind(&rows.kind)
        .bind(&rows.amount)
        .bind(&rows.balance)
        .bind(&rows.recorded_at)
        .bind(&rows.transfer)
        .bind(&rows.counterparty)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    }
    let updated = sqlx::query(&format!(
        "UPDATE {accounts} AS a SET balance = u.balance, closed = u.closed, revision = u.revision, updated_at = u.at
         FROM UNNEST($1::text[], $2::bigint[], $3::bool[], $4::bigint[], $5::timestamptz[]) AS u(id, balance, closed, revision, at)
         WHERE a.id = u.id",
    ))
    .bind(plans.iter().map(|p| p.id).collect::<Vec<_>>())
    .bind(plans.iter().map(|p| p.balance).collect::<Vec<_>>())
    .bind(plans.iter().map(|p| p.closed).collect::<Vec<_>>())
    .bind(plans.iter().map(|p| db_revision(p.last().last_revision())).collect::<Vec<_>>())
    .bind(plans.iter().map(|p| p.last().recorded_at).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    if updated.rows_affected() != plans.len() as u64 {
        // Every row was locked or inserted above: this would be a bug, not a race.
        return Err(ReadModelError(format!(
            "updated {} of {} accounts",
            updated.rows_affected(),
            plans.len()
        )));
    }
    for plan in &plans {
        outcomes[plan.index] = Applied::Applied;
    }
    Ok(Some(outcomes))
}

/// The tables of one generation of the read model.
#[derive(Clone, Copy)]
struct Tables {
    accounts: &'static str,
    transactions: &'static str,
    /// Movements go in with `COPY` rather than an `INSERT` of unnested arrays: a
    /// rebuild's batch holds thousands of them (64 streams in full), where `COPY`
    /// costs PostgreSQL less per row (a rebuild ≈ 7 % faster, bench/README "The
    /// allocator and COPY in the rebuild"); the live projector's batches hold a few,
    /// and `COPY` takes one round trip more than the `INSERT` (its start, then its end).
    bulk: bool,
}

/// The generation readers use.
const LIVE: Tables = Tables {
    accounts: "accounts",
    transactions: "transactions",
    bulk: false,
};

/// The generation a rebuild fills beside the live one.
const NEXT: Tables = Tables {
    accounts: "accounts_next",
    transactions: "transactions_next",
    bulk: true,
};

/// How many times `apply_runs` plans again after losing an account's opening to a
/// concurrent transaction. Each loss means another transaction inserted that row, so
/// the next plan finds it and locks it: one more round is enough unless the rows keep
/// being dropped underneath (a concurrent `clear`).
const REPLANS: usize = 5;

/// Rows of the `transactions` table, column by column (bound as arrays).
#[derive(Default)]
struct TransactionRows<'a> {
    account_id: Vec<&'a str>,
    revision: Vec<i64>,
    kind: Vec<&'static str>,
    amount: Vec<i64>,
    balance: Vec<i64>,
    recorded_at: Vec<time::OffsetDateTime>,
    transfer: Vec<Option<String>>,
    counterparty: Vec<Option<String>>,
}

impl<'a> TransactionRows<'a> {
    fn push(&mut self, account_id: &'a str, movement: &TransactionView) {
        self.account_id.push(account_id);
        self.revision.push(db_revision(movement.revision));
        self.kind.push(movement.kind.name());
        self.amount.push(movement.amount);
        self.balance.push(movement.balance);
        self.recorded_at.push(movement.recorded_at);
        let (transfer, counterparty) = match &movement.transfer {
            Some((t, c)) => (Some(t.as_str().to_owned()), Some(c.as_str().to_owned())),
            None => (None, None),
        };
        self.transfer.push(transfer);
        self.counterparty.push(counterparty);
    }

    /// The columns of `transactions` the rows fill, in the order of the `INSERT`'s
    /// arrays and of [`TransactionRows::copy_text`]'s fields.
    const COLUMNS: &'static str =
        "account_id, revision, kind, amount, balance, recorded_at, transfer, counterparty";

    /// The rows in `COPY`'s text format: a line per row, tab-separated columns in the
    /// order of [`TransactionRows::COLUMNS`], `\N` for NULL.
    fn copy_text(&self) -> Result<String, ReadModelError> {
        use std::fmt::Write;
        let mut text = String::with_capacity(self.revision.len() * 96);
        for i in 0..self.revision.len() {
            copy_field(&mut text, Some(self.account_id[i]));
            let at = floor_to_the_microsecond(self.recorded_at[i])
                .format(&time::format_description::well_known::Rfc3339)
                .map_err(|e| ReadModelError(format!("a movement's time: {e}")))?;
            let _ = write!(
                text,
                "\t{}\t{}\t{}\t{}\t{at}\t",
                self.revision[i], self.kind[i], self.amount[i], self.balance[i]
            );
            copy_field(&mut text, self.transfer[i].as_deref());
            text.push('\t');
            copy_field(&mut text, self.counterparty[i].as_deref());
            text.push('\n');
        }
        Ok(text)
    }

    /// Insert the rows into `table` with one `COPY … FROM STDIN` in `tx`.
    async fn copy_into(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        table: &str,
    ) -> Result<(), ReadModelError> {
        let text = self.copy_text()?;
        let mut copy = (**tx)
            .copy_in_raw(&format!("COPY {table} ({}) FROM STDIN", Self::COLUMNS))
            .await
            .map_err(unavailable)?;
        if let Err(e) = copy.send(text.into_bytes()).await {
            let _ = copy.abort(e.to_string()).await;
            return Err(unavailable(e));
        }
        let copied = copy.finish().await.map_err(unavailable)?;
        if copied != self.revision.len() as u64 {
            return Err(ReadModelError(format!(
                "copied {copied} of {} movements",
                self.revision.len()
            )));
        }
        Ok(())
    }
}

/// `value` as a column of `COPY`'s text format: `\N` for NULL, and the backslash, tab,
/// newline and carriage return escaped.
fn copy_field(text: &mut String, value: Option<&str>) {
    let Some(value) = value else {
        text.push_str("\\N");
        return;
    };
    for c in value.chars() {
        match c {
            '\\' => text.push_str("\\\\"),
            '\t' => text.push_str("\\t"),
            '\n' => text.push_str("\\n"),
            '\r' => text.push_str("\\r"),
            c => text.push(c),
        }
    }
}

#[async_trait]
impl ReadModel for PgReadModel {
    async fn position(&self, id: &AccountId) -> Result<Revision, ReadModelError> {
        let r: Option<i64> = sqlx::query_scalar("SELECT revision FROM accounts WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(r.map_or(Revision::ZERO, revision))
    }

    async fn apply(&self, commit: &Commit<AccountEvent>) -> Result<Applied, ReadModelError> {
        self.apply_all(std::slice::from_ref(commit)).await
    }

    async fn apply_all(&self, commits: &[Commit<AccountEvent>]) -> Result<Applied, ReadModelError> {
        let outcomes = self.apply_runs(&[commits]).await?;
        Ok(outcomes[0])
    }

    /// One transaction for every run: one query locking the accounts, one INSERT of the
    /// accounts opened, one INSERT of every transaction row, one UPDATE of the accounts.
    async fn apply_runs(
        &self,
        runs: &[&[Commit<AccountEvent>]],
    ) -> Result<Vec<Applied>, ReadModelError> {
        self.apply_runs_to(LIVE, runs).await
    }

    async fn apply_runs_rebuilding(
        &self,
        runs: &[&[Commit<AccountEvent>]],
    ) -> Result<Vec<Applied>, ReadModelError> {
        self.apply_runs_to(NEXT, runs).await
    }

    /// The new generation's tables: the live ones' columns, checks and indexes, but no
    /// foreign key from the movements to their account while it is filled — checked row
    /// by row it took more than half of a rebuild's INSERT time (50 of the ≈ 90 ms for
    /// 7,368 rows), and a rebuild inserts every account before its movements.
    /// `finish_rebuild` adds it, validated in one pass.
    ///
    /// One rebuild at a time: the rebuild's session holds an advisory lock until its
    /// switch or abandon, and the new generation is made only once it has it (a
    /// leftover of a rebuild whose process died is dropped first).
    async fn begin_rebuild(&self) -> Result<RebuildBegun, ReadModelError> {
        let mut rebuilding = self.rebuilding.lock().await;
        if rebuilding.is_some() {
            return Ok(RebuildBegun::AnotherRunning);
        }
        let mut session = self.pool.acquire().await.map_err(unavailable)?;
        let locked: bool = sqlx::query_scalar(REBUILD_LOCK)
            .fetch_one(&mut *session)
            .await
            .map_err(unavailable)?;
        if !locked {
            return Ok(RebuildBegun::AnotherRunning);
        }
        let made = in_one_transaction(
            &mut session,
            &[
                "DROP TABLE IF EXISTS transactions_next, accounts_next",
                "CREATE TABLE accounts_next (LIKE accounts INCLUDING ALL)",
                "CREATE TABLE transactions_next (LIKE transactions INCLUDING ALL)",
            ],
        )
        .await;
        match made {
            Ok(()) => {
                *rebuilding = Some(session);
                Ok(RebuildBegun::Started)
            }
            Err(e) => {
                close(session).await;
                Err(e)
            }
        }
    }

    /// One transaction. The live tables are locked against writers (readers go on);
    /// every account the live projector moved past the rebuild takes its newer rows from
    /// the live tables (an account the rebuild never saw, all of them); the foreign key
    /// is added and validated; then the live tables are dropped and the new ones take
    /// their names — readers wait only for that last step, and never see a partial or
    /// empty read model.
    ///
    /// On the rebuild's own session: if that session was lost, so was the lock, and
    /// another rebuild may have taken the new generation over — this one fails
    /// instead of switching to it.
    async fn finish_rebuild(&self) -> Result<(), ReadModelError> {
        let mut rebuilding = self.rebuilding.lock().await;
        let session = rebuilding
            .as_mut()
            .ok_or_else(|| ReadModelError("no rebuild of this process is running".into()))?;
        in_one_transaction(session, &[
            "SET LOCAL statement_timeout = 0",
            "LOCK TABLE accounts, transactions, accounts_next, transactions_next IN EXCLUSIVE MODE",
            // Movements past the rebuilt position of accounts both generations hold.
            "INSERT INTO transactions_next
                 SELECT t.* FROM transactions t JOIN accounts_next n ON n.id = t.account_id
                 WHERE t.revision > n.revision",
            "UPDATE accounts_next n
                 SET balance = l.balance, closed = l.closed, revision = l.revision, updated_at = l.updated_at
                 FROM accounts l WHERE l.id = n.id AND l.revision > n.revision",
            // Accounts only the live generation holds (opened during the rebuild).
            "INSERT INTO transactions_next
                 SELECT t.* FROM transactions t
                 WHERE NOT EXISTS (SELECT 1 FROM accounts_next n WHERE n.id = t.account_id)",
            "INSERT INTO accounts_next
                 SELECT l.* FROM accounts l
                 WHERE NOT EXISTS (SELECT 1 FROM accounts_next n WHERE n.id = l.id)",
            "ALTER TABLE transactions_next ADD CONSTRAINT transactions_next_account_id_fkey
                 FOREIGN KEY (account_id) REFERENCES accounts_next (id) ON DELETE CASCADE",
            "DROP TABLE transactions, accounts",
            "ALTER TABLE accounts_next RENAME TO accounts",
            "ALTER TABLE transactions_next RENAME TO transactions",
            "ALTER INDEX accounts_next_pkey RENAME TO accounts_pkey",
            "ALTER INDEX transactions_next_pkey RENAME TO transactions_pkey",
            &format!(
                "ALTER TABLE transactions RENAME CONSTRAINT transactions_next_account_id_fkey TO {MOVEMENTS_FOREIGN_KEY}"
            ),
        ])
        .await?;
        // Switched: the lock goes back, and the session to the pool.
        let mut session = rebuilding.take().expect("checked above");
        match sqlx::query(REBUILD_UNLOCK).execute(&mut *session).await {
            Ok(_) => {}
            Err(_) => close(session).await,
        }
        Ok(())
    }

    /// Drops the new generation on the rebuild's own session, then ends that session
    /// (and with it the lock), whether or not the drop went through: a generation left
    /// behind is dropped by the next rebuild's start.
    async fn abandon_rebuild(&self) -> Result<(), ReadModelError> {
        let Some(mut session) = self.rebuilding.lock().await.take() else {
            return Ok(());
        };
        let dropped = in_one_transaction(
            &mut session,
            &["DROP TABLE IF EXISTS transactions_next, accounts_next"],
        )
        .await;
        close(session).await;
        dropped
    }

    async fn account(&self, id: &AccountId) -> Result<Option<AccountView>, ReadModelError> {
        let row = sqlx::query(
            "SELECT currency, balance, closed, revision, opened_at, updated_at, owner FROM accounts WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| account_view(id, &r)).transpose()
    }

    /// One query: the account's row and its first movement recorded after `at` (from
    /// the movements' primary key, which starts with the account).
    async fn revision_at(
        &self,
        id: &AccountId,
        at: time::OffsetDateTime,
    ) -> Result<Revision, ReadModelError> {
        let row = sqlx::query(
            "SELECT a.currency, a.balance, a.closed, a.revision, a.opened_at, a.updated_at, a.owner,
                    (SELECT min(t.revision) FROM transactions t
                      WHERE t.account_id = a.id AND t.recorded_at > $2) AS first_after
             FROM accounts a WHERE a.id = $1",
        )
        .bind(id.as_str())
        // PostgreSQL would round a finer time to the microsecond; commits are
        // recorded to the microsecond, so flooring `at` compares exactly.
        .bind(floor_to_the_microsecond(at))
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        let Some(r) = row else {
            return Ok(Revision::ZERO);
        };
        let view = account_view(id, &r)?;
        let first_after: Option<i64> = r.get("first_after");
        Ok(tally_app::ports::prefix_at(
            &view,
            first_after.map(revision),
            at,
        ))
    }

    async fn transactions(
        &self,
        id: &AccountId,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<TransactionView>, ReadModelError> {
        let rows = sqlx::query(
            "SELECT revision, kind, amount, balance, recorded_at, transfer, counterparty FROM transactions
             WHERE account_id = $1 AND revision > $2 ORDER BY revision LIMIT $3",
        )
        .bind(id.as_str())
        .bind(db_revision(after))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(transaction_view).collect()
    }

    /// Two queries on the movements' key: the opening balance (the last movement before
    /// the cut at `from`) and the movements between the cuts at `from` and `to`.
    async fn statement(
        &self,
        id: &AccountId,
        from: time::OffsetDateTime,
        to: time::OffsetDateTime,
    ) -> Result<(i64, Vec<TransactionView>), ReadModelError> {
        // The first movement recorded at or after a time; none: past the end.
        const CUT: &str = "COALESCE((SELECT min(revision) FROM transactions
                            WHERE account_id = $1 AND recorded_at >= {t}), 9223372036854775807)";
        let (from, to) = (ceil_to_the_microsecond(from), ceil_to_the_microsecond(to));
        let opening: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT balance FROM transactions WHERE account_id = $1 AND revision < {}
             ORDER BY revision DESC LIMIT 1",
            CUT.replace("{t}", "$2")
        ))
        .bind(id.as_str())
        .bind(from)
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        let rows = sqlx::query(&format!(
            "SELECT revision, kind, amount, balance, recorded_at, transfer, counterparty FROM transactions
             WHERE account_id = $1 AND revision >= {} AND revision < {} ORDER BY revision",
            CUT.replace("{t}", "$2"),
            CUT.replace("{t}", "$3")
        ))
        .bind(id.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        let movements = rows
            .iter()
            .map(transaction_view)
            .collect::<Result<_, _>>()?;
        Ok((opening.unwrap_or(0), movements))
    }

    /// Empties both tables at once (tests and tools; a rebuild fills a new generation
    /// instead).
    async fn clear(&self) -> Result<(), ReadModelError> {
        self.in_one_transaction(&["TRUNCATE accounts, transactions"])
            .await
    }

    async fn ready(&self) -> Result<(), ReadModelError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_copy_reads_specially_and_writes_null_as_backslash_n() {
        let mut text = String::new();
        copy_field(&mut text, Some("a\\b\tc\nd\re"));
        assert_eq!(text, "a\\\\b\\tc\\nd\\re");
        text.clear();
        copy_field(&mut text, None);
        assert_eq!(text, "\\N");
    }

    #[test]
    fn copy_text_is_a_line_per_movement_in_the_columns_order_with_times_to_the_microsecond() {
        let at = time::macros::datetime!(2026-12-07 18:00:00.123456789 UTC);
        let mut rows = TransactionRows::default();
        rows.push(
            "acc-1",
            &TransactionView {
                revision: Revision::new(2),
                kind: TransactionKind::named("deposit").unwrap(),
                amount: 250,
                balance: 250,
                recorded_at: at,
                transfer: None,
            },
        );
        let transfer = TransferId::parse(&"ab".repeat(16)).unwrap();
        rows.push(
            "acc-1",
            &TransactionView {
                revision: Revision::new(3),
                kind: TransactionKind::named("transfer-out").unwrap(),
                amount: 50,
                balance: 200,
                recorded_at: at,
                transfer: Some((transfer, AccountId::parse("acc-2").unwrap())),
            },
        );
        assert_eq!(
            rows.copy_text().unwrap(),
            "acc-1\t2\tdeposit\t250\t250\t2026-12-07T18:00:00.123456Z\t\\N\t\\N\n\
             acc-1\t3\ttransfer-out\t50\t200\t2026-12-07T18:00:00.123456Z\tabababababababababababababababab\tacc-2\n"
        );
    }
}
