//! `tally-postgres`: the account read model in PostgreSQL.
//!
//! [`PgReadModel::apply`] runs one transaction per commit: it locks the account row,
//! applies the commit only if its first revision is exactly the stored revision + 1,
//! skips it if it was applied before, and reports a gap otherwise — never skipping one.
//! `apply_all` does the same for a run of commits of one stream in one transaction
//! (one row lock, one multi-row INSERT, one UPDATE): rebuilds and catch-ups.
//! The schema lives in `migrations/` and is embedded: [`migrate`] runs it once per
//! deploy (the `migrate` function), not at every function's start-up.

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::str::FromStr;
use std::time::Duration;
use tally_app::{
    AccountView, Applied, ReadModel, ReadModelError, TransactionKind, TransactionView,
};
use tally_domain::{AccountEvent, AccountId, Currency};
use tally_es::{Commit, Revision};

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

/// A pool that connects on first use, so a process starts while PostgreSQL is down.
pub fn connect_lazy(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let (pool, options) = pool_options(url, max_connections)?;
    Ok(pool.connect_lazy_with(options))
}

/// Apply every pending migration.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The read model over a pool.
#[derive(Clone)]
pub struct PgReadModel {
    pool: PgPool,
}

impl PgReadModel {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn unavailable(e: sqlx::Error) -> ReadModelError {
    ReadModelError(e.to_string())
}

fn revision(n: i64) -> Revision {
    Revision::new(u64::try_from(n).unwrap_or(0))
}

fn db_revision(r: Revision) -> i64 {
    i64::try_from(r.get()).unwrap_or(i64::MAX)
}

async fn apply_in(
    tx: &mut Transaction<'_, Postgres>,
    commits: &[Commit<AccountEvent>],
) -> Result<Applied, ReadModelError> {
    let Some(first) = commits.first() else {
        return Ok(Applied::Duplicate);
    };
    let id = first.stream.as_str();
    let row =
        sqlx::query("SELECT revision, balance, closed FROM accounts WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(unavailable)?;
    let (position, mut balance, mut closed) = match &row {
        Some(r) => (
            revision(r.get::<i64, _>("revision")),
            r.get::<i64, _>("balance"),
            r.get::<bool, _>("closed"),
        ),
        None => (Revision::ZERO, 0, false),
    };
    let new = &commits[commits.partition_point(|c| c.last_revision() <= position)..];
    let Some(next) = new.first() else {
        return Ok(Applied::Duplicate);
    };
    if next.revision != position.next() {
        return Ok(Applied::Gap {
            expected: position.next(),
        });
    }
    // The transactions of every new commit go in with one INSERT (arrays unnested).
    let mut rows = TransactionRows::default();
    for commit in new {
        for (rev, event) in commit.numbered() {
            match event {
                AccountEvent::Opened { currency, .. } => {
                    let inserted = sqlx::query(
                        "INSERT INTO accounts (id, currency, balance, closed, revision, opened_at, updated_at)
                         VALUES ($1, $2, 0, FALSE, $3, $4, $4) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(id)
                    .bind(currency.code())
                    .bind(db_revision(rev))
                    .bind(commit.recorded_at)
                    .execute(&mut **tx)
                    .await
                    .map_err(unavailable)?;
                    if inserted.rows_affected() == 0 {
                        // Another transaction applied this very commit first.
                        return Ok(Applied::Duplicate);
                    }
                }
                AccountEvent::Deposited {
                    amount,
                    balance: after,
                }
                | AccountEvent::Withdrawn {
                    amount,
                    balance: after,
                } => {
                    let kind = if matches!(event, AccountEvent::Deposited { .. }) {
                        "deposit"
                    } else {
                        "withdrawal"
                    };
                    balance = *after;
                    rows.push(rev, kind, *amount, *after, commit.recorded_at);
                }
                AccountEvent::Closed => closed = true,
            }
        }
    }
    if !rows.revision.is_empty() {
        sqlx::query(
            "INSERT INTO transactions (account_id, revision, kind, amount, balance, recorded_at)
             SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::timestamptz[])",
        )
        .bind(id)
        .bind(&rows.revision)
        .bind(&rows.kind)
        .bind(&rows.amount)
        .bind(&rows.balance)
        .bind(&rows.recorded_at)
        .execute(&mut **tx)
        .await
        .map_err(unavailable)?;
    }
    let last = new.last().expect("not empty");
    let updated = sqlx::query(
        "UPDATE accounts SET balance = $2, closed = $3, revision = $4, updated_at = $5 WHERE id = $1",
    )
    .bind(id)
    .bind(balance)
    .bind(closed)
    .bind(db_revision(last.last_revision()))
    .bind(last.recorded_at)
    .execute(&mut **tx)
    .await
    .map_err(unavailable)?;
    if updated.rows_affected() != 1 {
        return Err(ReadModelError(format!(
            "stream {id} does not start with AccountOpened"
        )));
    }
    Ok(Applied::Applied)
}

/// Rows of the `transactions` table, column by column (bound as arrays).
#[derive(Default)]
struct TransactionRows {
    revision: Vec<i64>,
    kind: Vec<&'static str>,
    amount: Vec<i64>,
    balance: Vec<i64>,
    recorded_at: Vec<time::OffsetDateTime>,
}

impl TransactionRows {
    fn push(
        &mut self,
        revision: Revision,
        kind: &'static str,
        amount: i64,
        balance: i64,
        at: time::OffsetDateTime,
    ) {
        self.revision.push(db_revision(revision));
        self.kind.push(kind);
        self.amount.push(amount);
        self.balance.push(balance);
        self.recorded_at.push(at);
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

    /// One transaction for the whole run of commits: one row lock, one INSERT of every
    /// transaction row, one UPDATE of the account.
    async fn apply_all(&self, commits: &[Commit<AccountEvent>]) -> Result<Applied, ReadModelError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let outcome = apply_in(&mut tx, commits).await?;
        if outcome == Applied::Applied {
            tx.commit().await.map_err(unavailable)?;
        } else {
            tx.rollback().await.map_err(unavailable)?;
        }
        Ok(outcome)
    }

    async fn account(&self, id: &AccountId) -> Result<Option<AccountView>, ReadModelError> {
        let row = sqlx::query(
            "SELECT currency, balance, closed, revision, opened_at, updated_at FROM accounts WHERE id = $1",
        )
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(unavailable)?;
        row.map(|r| {
            let currency = Currency::parse(r.get::<&str, _>("currency"))
                .map_err(|e| ReadModelError(e.to_string()))?;
            Ok(AccountView {
                id: id.clone(),
                currency,
                balance: r.get("balance"),
                closed: r.get("closed"),
                revision: revision(r.get("revision")),
                opened_at: r.get("opened_at"),
                updated_at: r.get("updated_at"),
            })
        })
        .transpose()
    }

    async fn transactions(
        &self,
        id: &AccountId,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<TransactionView>, ReadModelError> {
        let rows = sqlx::query(
            "SELECT revision, kind, amount, balance, recorded_at FROM transactions
             WHERE account_id = $1 AND revision > $2 ORDER BY revision LIMIT $3",
        )
        .bind(id.as_str())
        .bind(db_revision(after))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .map(|r| TransactionView {
                revision: revision(r.get("revision")),
                kind: if r.get::<&str, _>("kind") == "deposit" {
                    TransactionKind::Deposit
                } else {
                    TransactionKind::Withdrawal
                },
                amount: r.get("amount"),
                balance: r.get("balance"),
                recorded_at: r.get("recorded_at"),
            })
            .collect())
    }

    async fn clear(&self) -> Result<(), ReadModelError> {
        sqlx::query("TRUNCATE accounts, transactions")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn ready(&self) -> Result<(), ReadModelError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
