//! Ports for the read side: the read model and the cache.

use async_trait::async_trait;
use tally_domain::{AccountEvent, AccountId, Currency, Owner, TransferId};
use tally_es::{Commit, Revision};
use time::OffsetDateTime;

/// One account as the read model holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountView {
    pub id: AccountId,
    pub currency: Currency,
    pub balance: i64,
    pub closed: bool,
    /// The revision of the last event applied.
    pub revision: Revision,
    pub opened_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    /// The subject that opened it (`None`: opened before owners were recorded).
    pub owner: Option<Owner>,
}

/// What a money movement was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionKind {
    Deposit,
    Withdrawal,
    /// A transfer's credit.
    TransferIn,
    /// A transfer's debit.
    TransferOut,
    /// The refund of a transfer's debit whose credit was refused.
    TransferRefund,
}

impl TransactionKind {
    /// Every kind, by [`TransactionKind::name`].
    pub const ALL: [TransactionKind; 5] = [
        Self::Deposit,
        Self::Withdrawal,
        Self::TransferIn,
        Self::TransferOut,
        Self::TransferRefund,
    ];

    /// How the API and the read model's rows name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Deposit => "deposit",
            Self::Withdrawal => "withdrawal",
            Self::TransferIn => "transfer-in",
            Self::TransferOut => "transfer-out",
            Self::TransferRefund => "transfer-refund",
        }
    }

    /// The kind named `name`.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether money came into the account.
    pub fn is_in(self) -> bool {
        matches!(
            self,
            Self::Deposit | Self::TransferIn | Self::TransferRefund
        )
    }
}

/// One money movement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransactionView {
    pub revision: Revision,
    pub kind: TransactionKind,
    pub amount: i64,
    pub balance: i64,
    pub recorded_at: OffsetDateTime,
    /// A transfer's movement: the transfer and the other account.
    pub transfer: Option<(TransferId, AccountId)>,
}

impl TransactionView {
    /// The movement `event` (at `revision`, committed at `at`) made, if it moved money.
    pub fn of_event(revision: Revision, event: &AccountEvent, at: OffsetDateTime) -> Option<Self> {
        let kind = match event {
            AccountEvent::Deposited { .. } => TransactionKind::Deposit,
            AccountEvent::Withdrawn { .. } => TransactionKind::Withdrawal,
            AccountEvent::TransferredIn { .. } => TransactionKind::TransferIn,
            AccountEvent::TransferredOut { .. } => TransactionKind::TransferOut,
            AccountEvent::TransferRefunded { .. } => TransactionKind::TransferRefund,
            AccountEvent::Opened { .. }
            | AccountEvent::Closed
            | AccountEvent::HolderForgotten { .. } => return None,
        };
        let (amount, balance) = event.movement()?;
        Some(Self {
            revision,
            kind,
            amount,
            balance,
            recorded_at: at,
            transfer: event.transfer().map(|(t, c)| (t.clone(), c.clone())),
        })
    }
}

/// What applying a commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The commit was the next one and is now reflected.
    Applied,
    /// The commit was applied before; nothing changed.
    Duplicate,
    /// Commits are missing before this one; nothing changed. The caller repairs the gap
    /// from the store, starting at `expected`.
    Gap { expected: Revision },
}

/// Why the read model failed. Handling rule: 503 + Retry-After for queries; the
/// projector retries the commit later.
#[derive(Debug, thiserror::Error)]
#[error("read model unavailable: {0}")]
pub struct ReadModelError(pub String);

/// What [`ReadModel::begin_rebuild`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildBegun {
    /// This caller's rebuild has begun: it ends with `finish_rebuild` or
    /// `abandon_rebuild`.
    Started,
    /// Another rebuild is running; nothing changed.
    AnotherRunning,
}

/// A projection of account streams, updated commit by commit.
///
/// `apply` is atomic and idempotent: it applies a commit if and only if the commit's
/// first revision is exactly the account's current revision + 1.
#[async_trait]
pub trait ReadModel: Send + Sync + 'static {
    /// The last revision applied for `id` (0 if none).
    async fn position(&self, id: &AccountId) -> Result<Revision, ReadModelError>;
    /// Apply one commit.
    async fn apply(&self, commit: &Commit<AccountEvent>) -> Result<Applied, ReadModelError>;
    /// Apply contiguous commits of one stream, in order (as [`tally_es::EventStore::read`]
    /// returns them), in as few round trips as the read model can: the path of rebuilds
    /// and catch-ups. Commits the read model already has are skipped. `Applied` if any
    /// was applied, `Duplicate` if none was new, `Gap` (and nothing changed) if the
    /// first new one does not follow the read model's position.
    async fn apply_all(&self, commits: &[Commit<AccountEvent>]) -> Result<Applied, ReadModelError> {
        let mut outcome = Applied::Duplicate;
        for commit in commits {
            match self.apply(commit).await? {
                Applied::Applied => outcome = Applied::Applied,
                Applied::Duplicate => {}
                gap @ Applied::Gap { .. } if outcome == Applied::Duplicate => return Ok(gap),
                // A gap after applied commits: the caller catches up from the store.
                Applied::Gap { .. } => return Ok(outcome),
            }
        }
        Ok(outcome)
    }
    /// Apply runs of commits of distinct streams, each as [`ReadModel::apply_all`] takes
    /// it, in as few round trips as the read model can: rebuilds and catch-ups of many
    /// streams at once. One outcome per run, in order, each what `apply_all` of that run
    /// alone would give. (PostgreSQL applies them in one transaction: an error applies
    /// nothing.)
    async fn apply_runs(
        &self,
        runs: &[&[Commit<AccountEvent>]],
    ) -> Result<Vec<Applied>, ReadModelError> {
        let mut outcomes = Vec::with_capacity(runs.len());
        for run in runs {
            outcomes.push(self.apply_all(run).await?);
        }
        Ok(outcomes)
    }
    /// One account.
    async fn account(&self, id: &AccountId) -> Result<Option<AccountView>, ReadModelError>;
    /// Up to `limit` transactions after revision `after`, oldest first.
    async fn transactions(
        &self,
        id: &AccountId,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<TransactionView>, ReadModelError>;
    /// The revision the account was at, at time `at`, as far as this read model holds
    /// it: the longest start of its stream whose events were all recorded at or before
    /// `at` (zero: not opened yet, or unknown here). The time index of as-of balances;
    /// this default scans the account's movements, a database answers from its index.
    async fn revision_at(
        &self,
        id: &AccountId,
        at: OffsetDateTime,
    ) -> Result<Revision, ReadModelError> {
        let Some(view) = self.account(id).await? else {
            return Ok(Revision::ZERO);
        };
        let movements = self.transactions(id, Revision::ZERO, usize::MAX).await?;
        let first_after = movements
            .iter()
            .find(|t| t.recorded_at > at)
            .map(|t| t.revision);
        Ok(prefix_at(&view, first_after, at))
    }
    /// The account's movements in the period `[from, to)` and its balance right
    /// before them: a statement. The period is cut where the stream's recording times
    /// first reach `from` and `to` (revision order, as [`ReadModel::revision_at`]), so
    /// the movements are a contiguous run and the closing balance is the opening plus
    /// them. This default scans the movements; a database answers from its index.
    async fn statement(
        &self,
        id: &AccountId,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<(i64, Vec<TransactionView>), ReadModelError> {
        let movements = self.transactions(id, Revision::ZERO, usize::MAX).await?;
        Ok(cut_statement(movements, from, to))
    }
    /// Drop everything, at once (tests and tools; a rebuild does not: see
    /// [`ReadModel::begin_rebuild`]).
    async fn clear(&self) -> Result<(), ReadModelError>;
    /// Start a rebuild: a new, empty generation beside the live one. Readers, `apply`
    /// and the live projector keep using the live generation until
    /// [`ReadModel::finish_rebuild`]. One rebuild at a time, across every process
    /// sharing the read model: while one runs, another is refused
    /// ([`RebuildBegun::AnotherRunning`], nothing changes) — two would fill one new
    /// generation, and the second's start would drop what the first had replayed. A
    /// rebuild whose process died is no longer running: its leftover generation is
    /// dropped. A read model may set aside, in the new generation, checks that a
    /// rebuild's loads cannot fail (every account is inserted before its movements) and
    /// restore them when it finishes.
    async fn begin_rebuild(&self) -> Result<RebuildBegun, ReadModelError>;
    /// [`ReadModel::apply_runs`], into the generation being rebuilt.
    async fn apply_runs_rebuilding(
        &self,
        runs: &[&[Commit<AccountEvent>]],
    ) -> Result<Vec<Applied>, ReadModelError>;
    /// Make the rebuilt generation the live one, atomically for readers: first every
    /// account the live generation holds past it (the live projector went on during the
    /// rebuild) takes the newer rows from the live one, so no reader sees an account go
    /// back; then the old generation is dropped.
    async fn finish_rebuild(&self) -> Result<(), ReadModelError>;
    /// Drop the generation being rebuilt (the replay failed, or the rebuild was
    /// cancelled) and end the rebuild, so that another can begin; the live one is
    /// untouched. Nothing to do when no rebuild of this caller's is running.
    async fn abandon_rebuild(&self) -> Result<(), ReadModelError>;
    /// Whether queries can be served now.
    async fn ready(&self) -> Result<(), ReadModelError>;
}

/// [`ReadModel::revision_at`] from what an account's row says: its opening (revision 1)
/// at `opened_at`, its last event at `updated_at`, and `first_movement_after`, its first
/// deposit or withdrawal recorded after `at`. Every other event of an account is its
/// opening or its closing, which is its last, so these bound the answer exactly.
pub fn prefix_at(
    view: &AccountView,
    first_movement_after: Option<Revision>,
    at: OffsetDateTime,
) -> Revision {
    if view.opened_at > at {
        return Revision::ZERO;
    }
    let mut revision = if view.updated_at > at {
        Revision::new(view.revision.get() - 1)
    } else {
        view.revision
    };
    if let Some(first) = first_movement_after {
        revision = revision.min(Revision::new(first.get() - 1));
    }
    revision
}

/// [`ReadModel::statement`] from an account's movements, oldest first.
pub fn cut_statement(
    movements: Vec<TransactionView>,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> (i64, Vec<TransactionView>) {
    let start = movements
        .iter()
        .position(|t| t.recorded_at >= from)
        .unwrap_or(movements.len());
    let end = movements
        .iter()
        .position(|t| t.recorded_at >= to)
        .unwrap_or(movements.len())
        .max(start);
    let opening = start.checked_sub(1).map_or(0, |i| movements[i].balance);
    (opening, movements[start..end].to_vec())
}

/// A cached balance, tagged with the revision it reflects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CachedBalance {
    pub balance: i64,
    pub currency: Currency,
    pub revision: Revision,
}

impl From<&AccountView> for CachedBalance {
    fn from(view: &AccountView) -> Self {
        Self {
            balance: view.balance,
            currency: view.currency,
            revision: view.revision,
        }
    }
}

/// What a cache lookup found: the entry, if any, and the token a later
/// [`Cache::fill`] of the same key must present.
#[derive(Clone, Debug, Default)]
pub struct Lookup {
    pub hit: Option<CachedBalance>,
    pub token: FillToken,
}

/// When a lookup was answered, as the cache knows it (for Redis, the instance's epoch:
/// a value that a restarted, empty Redis no longer has). A fill with a token from before
/// the cache lost entries is refused. The default token fills nothing: the cache did not
/// answer, or lost its entries so recently that a command's write-through may still have
/// gone to the instance that lost them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FillToken(pub Option<String>);

/// A best-effort balance cache in front of the read model. Implementations swallow
/// their own failures (a miss is always a correct answer) and never replace an entry
/// with an older revision.
#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// The cached balance, if any, and the token for a fill after it.
    async fn lookup(&self, id: &AccountId) -> Lookup;
    /// The cached balance, if any.
    async fn get(&self, id: &AccountId) -> Option<CachedBalance> {
        self.lookup(id).await.hit
    }
    /// Store a balance unless a newer revision is cached: for the writer that knows it
    /// is current (a command, with the balance of the commit it just made).
    async fn put(&self, id: &AccountId, balance: CachedBalance);
    /// Store a balance read after the lookup that gave `token` (a query that missed,
    /// then read the store): like [`Cache::put`], but refused when the cache lost its
    /// entries since that lookup. Without that, a query that read the store before a
    /// commit, and fills after a Redis restart swallowed the command's write-through,
    /// would cache — and serve to the client the command answered — an older balance.
    async fn fill(&self, id: &AccountId, balance: CachedBalance, token: FillToken);
    /// Replace a cached balance with a newer one, but never create an entry: for a
    /// writer that may be behind what was acknowledged (the projector, which applies a
    /// delayed delivery after the cache lost the newer entry — Redis restarted empty).
    /// Only writers that know the balance is current (a command's own commit, a query
    /// that has just caught up from the store) create entries.
    async fn refresh(&self, id: &AccountId, balance: CachedBalance);
    /// Forget everything (before a rebuild).
    async fn clear(&self);
}
