//! Queries: cache → read model → store.

use crate::faults::{Fault, Faults};
use crate::history::{self, Past};
use crate::ports::{AccountView, Cache, CachedBalance, ReadModel, ReadModelError, TransactionView};
use crate::projection::{ProjectionError, Projector};
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use tally_domain::{Account, AccountId, Caller, Currency, Owner};
use tally_es::{Revision, SnapshotStore};
use time::OffsetDateTime;

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// 404: no such account.
    #[error("account not found")]
    NotFound,
    /// 422: the account has not reached the revision the client asked for.
    #[error("the account is at revision {actual}; revision {wanted} does not exist")]
    RevisionNotReached { wanted: Revision, actual: Revision },
    /// 422: an as-of balance was asked for a time that has not come yet.
    #[error("{at} is in the future (the server's clock says {now})")]
    FutureTime { at: String, now: String },
    /// 503 + Retry-After.
    #[error(transparent)]
    ReadModel(#[from] ReadModelError),
    /// 503 (store down) or 500 (corrupt data).
    #[error(transparent)]
    Projection(#[from] ProjectionError),
}

/// A balance as queries return it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalanceView {
    pub balance: i64,
    pub currency: Currency,
    pub revision: Revision,
}

impl From<CachedBalance> for BalanceView {
    fn from(c: CachedBalance) -> Self {
        Self {
            balance: c.balance,
            currency: c.currency,
            revision: c.revision,
        }
    }
}

/// Which past an as-of balance asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsOf {
    /// Right after the event at this revision.
    Revision(Revision),
    /// At this time: after every event recorded at or before it.
    Time(OffsetDateTime),
}

/// A balance in the past, and when the event that answers it was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PastBalance {
    pub balance: BalanceView,
    pub recorded_at: OffsetDateTime,
}

/// An account's statement for a period: see [`Queries::statement`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The account as the read model holds it (its revision: what the statement
    /// reflects).
    pub account: AccountView,
    /// The balance right before the period.
    pub opening: i64,
    /// The deposits and withdrawals in the period, oldest first.
    pub movements: Vec<TransactionView>,
}

impl Statement {
    /// What came in during the period (deposits, transfers in, refunds), summed.
    pub fn money_in(&self) -> i64 {
        self.sum_of(true)
    }

    /// What went out during the period (withdrawals, transfers out), summed.
    pub fn money_out(&self) -> i64 {
        self.sum_of(false)
    }

    /// The balance at the end of the period: the opening plus in, minus out.
    pub fn closing(&self) -> i64 {
        self.opening + self.money_in() - self.money_out()
    }

    fn sum_of(&self, coming_in: bool) -> i64 {
        self.movements
            .iter()
            .filter(|t| t.kind.is_in() == coming_in)
            .map(|t| t.amount)
            .sum()
    }
}

/// The read side of the account API.
#[derive(Clone)]
pub struct Queries {
    read_model: Arc<dyn ReadModel>,
    cache: Arc<dyn Cache>,
    projector: Projector,
    snapshots: Option<Arc<dyn SnapshotStore>>,
    read_through: bool,
    faults: Faults,
    /// The owners of accounts seen lately. An account's owner never changes once it
    /// is opened, so an entry never goes stale: a balance served from the cache is
    /// authorised without another read.
    owners: Arc<Mutex<LruCache<AccountId, Option<Owner>>>>,
    /// The sealed holder details of accounts seen lately, as their opening carries
    /// them: an opening never changes, so neither does this (forgetting destroys the
    /// key the details are sealed under, not the sealed bytes), and a query does not
    /// read the opening from the store again.
    holders: Arc<Mutex<LruCache<AccountId, Option<tally_es::Sealed>>>>,
}

/// How many accounts' owners [`Queries`] keeps in memory.
pub const OWNERS_KEPT: usize = 100_000;

impl Queries {
    /// Queries over `read_model` and `cache`; `projector` catches an account up from the
    /// store when the read model is behind what the client asks for.
    ///
    /// With `read_through`, every query first catches its account up from the store:
    /// for a process that receives no stream (a lone query function in embedded mode).
    pub fn new(
        read_model: Arc<dyn ReadModel>,
        cache: Arc<dyn Cache>,
        projector: Projector,
        read_through: bool,
    ) -> Self {
        Self {
            read_model,
            cache,
            projector,
            snapshots: None,
            read_through,
            faults: Faults::NONE,
            owners: Arc::new(Mutex::new(LruCache::new(
                NonZeroUsize::new(OWNERS_KEPT).expect("not zero"),
            ))),
            holders: Arc::new(Mutex::new(LruCache::new(
                NonZeroUsize::new(OWNERS_KEPT).expect("not zero"),
            ))),
        }
    }

    /// Whether `caller` reaches account `id`: `false` if there is no such account or it
    /// is another subject's. Free for callers that reach every account; for a subject,
    /// one read of the account the first time (then its owner is remembered).
    pub async fn reaches(&self, id: &AccountId, caller: &Caller) -> Result<bool, QueryError> {
        if matches!(caller, Caller::Anyone | Caller::Service | Caller::Operator) {
            return Ok(true);
        }
        let known = self
            .owners
            .lock()
            .expect("owners poisoned")
            .get(id)
            .cloned();
        let owner = match known {
            Some(owner) => owner,
            None => match self.account(id, None, &Caller::Service).await {
                Ok(view) => view.owner,
                Err(QueryError::NotFound) => return Ok(false),
                Err(e) => return Err(e),
            },
        };
        Ok(caller.reaches(owner.as_ref()))
    }

    /// The holder's details of account `id` as its opening sealed them (`None`: none
    /// were given, or no such account), read from the event store once and then kept,
    /// sealed, in memory (an opening never changes): the read model and the cache never
    /// hold them. Only for a caller that reaches the account.
    pub async fn holder(
        &self,
        id: &AccountId,
        caller: &Caller,
    ) -> Result<Option<tally_es::Sealed>, QueryError> {
        if !self.reaches(id, caller).await? {
            return Err(QueryError::NotFound);
        }
        let known = self
            .holders
            .lock()
            .expect("holders poisoned")
            .get(id)
            .cloned();
        if let Some(known) = known {
            return Ok(known);
        }
        let store = self.projector.store();
        let Some(first) = store
            .read_commit(id.stream_id(), Revision::new(1))
            .await
            .map_err(ProjectionError::from)?
        else {
            return Ok(None);
        };
        let opening = tally_es::Commit::<tally_domain::AccountEvent>::decode(&first)
            .map_err(ProjectionError::from)?;
        let holder = match opening.events.into_iter().next() {
            Some(tally_domain::AccountEvent::Opened { holder, .. }) => holder,
            _ => None,
        };
        self.holders
            .lock()
            .expect("holders poisoned")
            .put(id.clone(), holder.clone());
        Ok(holder)
    }

    /// Remember the owner of a view read.
    fn seen(&self, view: &AccountView) {
        self.owners
            .lock()
            .expect("owners poisoned")
            .put(view.id.clone(), view.owner.clone());
    }

    /// Start as-of balances from the newest snapshot in `snapshots` at or below the
    /// revision asked for.
    pub fn with_snapshots(mut self, snapshots: Arc<dyn SnapshotStore>) -> Self {
        self.snapshots = Some(snapshots);
        self
    }

    /// Inject `faults` (tests only; see [`crate::faults`]).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// The account, at least at revision `min` (read-your-writes), if `caller` reaches
    /// it; otherwise — another subject's — `NotFound`, before anything else is said of
    /// it.
    pub async fn account(
        &self,
        id: &AccountId,
        min: Option<Revision>,
        caller: &Caller,
    ) -> Result<AccountView, QueryError> {
        if self.read_through {
            self.projector.catch_up(id).await?;
        }
        let view = self.read_model.account(id).await?;
        let fresh = match (&view, min) {
            (Some(v), Some(min)) => v.revision >= min,
            (Some(_), None) => true,
            (None, _) => false,
        };
        // With read-through the store was asked a moment ago; otherwise, behind or
        // unknown here, the store decides.
        let view = if fresh || self.read_through {
            view
        } else {
            self.projector.catch_up(id).await?;
            self.read_model.account(id).await?
        };
        let view = view.ok_or(QueryError::NotFound)?;
        self.seen(&view);
        if !caller.reaches(view.owner.as_ref()) {
            return Err(QueryError::NotFound);
        }
        if let Some(min) = min {
            if view.revision < min {
                return Err(QueryError::RevisionNotReached {
                    wanted: min,
                    actual: view.revision,
                });
            }
        }
        Ok(view)
    }

    /// The balance: from the cache when it is fresh enough, else from the read model
    /// once it has caught up with the store.
    ///
    /// A cache entry is never older than what a command acknowledged (commands write
    /// their balance through; newer revisions win; a query fills a missing entry only
    /// if the cache has not lost entries since its lookup, see [`Cache::fill`]).
    /// Without one — it expired, Redis
    /// restarted empty or is down — nothing here knows what was acknowledged, and the
    /// read model may be behind it (the projector stopped, Kafka down): the store is
    /// asked what came after the read model's position (on S3, one GET of the next
    /// key) and that is applied before answering. So a balance older than one already
    /// acknowledged is never served; with the store unreachable too, a miss is a 503.
    ///
    /// Only for a `caller` that reaches the account (see [`Queries::account`]).
    pub async fn balance(
        &self,
        id: &AccountId,
        min: Option<Revision>,
        caller: &Caller,
    ) -> Result<BalanceView, QueryError> {
        if !self.reaches(id, caller).await? {
            return Err(QueryError::NotFound);
        }
        if self.faults.has(Fault::StaleBalance) {
            return self.stale_balance(id).await;
        }
        // Looked up first even with read-through: the fill below needs its token.
        let lookup = self.cache.lookup(id).await;
        if !self.read_through {
            if let Some(hit) = lookup.hit {
                if min.is_none_or(|m| hit.revision >= m) {
                    return Ok(hit.into());
                }
            }
            self.projector.catch_up(id).await?;
        }
        let view = self.account(id, min, caller).await?;
        let balance = CachedBalance::from(&view);
        self.cache.fill(id, balance, lookup.token).await;
        Ok(balance.into())
    }

    /// The balance as it was at a revision or a time, answered exactly from the event
    /// store: folded from the newest snapshot at or below the revision (or from the
    /// start) and the commits up to it, never from the cache or the read model. A time
    /// becomes a revision through the read model's index ([`ReadModel::revision_at`]),
    /// once the account has caught up with the store. Before the account existed:
    /// `NotFound`; a revision past its last: `RevisionNotReached`; a time still to come:
    /// `FutureTime`. Only for a `caller` that reaches the account.
    pub async fn balance_as_of(
        &self,
        id: &AccountId,
        as_of: AsOf,
        caller: &Caller,
    ) -> Result<PastBalance, QueryError> {
        if !self.reaches(id, caller).await? {
            return Err(QueryError::NotFound);
        }
        let wanted = match as_of {
            AsOf::Revision(revision) => revision,
            AsOf::Time(at) => {
                let now = OffsetDateTime::now_utc();
                if at > now {
                    let format = |t: OffsetDateTime| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .unwrap_or_else(|_| t.to_string())
                    };
                    return Err(QueryError::FutureTime {
                        at: format(at),
                        now: format(now),
                    });
                }
                self.projector.catch_up(id).await?;
                self.read_model.revision_at(id, at).await?
            }
        };
        if wanted == Revision::ZERO {
            return Err(QueryError::NotFound);
        }
        let folded_to = if self.faults.has(Fault::StaleHistory) && wanted.get() > 1 {
            tracing::error!(stream = %id, %wanted, "fault injection: folding one revision short");
            Revision::new(wanted.get() - 1)
        } else {
            wanted
        };
        let past = history::state_at::<Account>(
            self.projector.store().as_ref(),
            self.snapshots.as_deref(),
            id.stream_id(),
            folded_to,
        )
        .await?;
        match past {
            // At the revision asked for (folded to, but for the fault injection).
            Past::At {
                state,
                revision: _,
                recorded_at,
            } => {
                let currency = state.currency.ok_or(QueryError::NotFound)?;
                Ok(PastBalance {
                    balance: BalanceView {
                        balance: state.balance,
                        currency,
                        revision: wanted,
                    },
                    recorded_at,
                })
            }
            Past::NotReached { last } if last == Revision::ZERO => Err(QueryError::NotFound),
            Past::NotReached { last } => Err(QueryError::RevisionNotReached {
                wanted,
                actual: last,
            }),
        }
    }

    /// `stale-balance`: the account as it was before its last movement.
    async fn stale_balance(&self, id: &AccountId) -> Result<BalanceView, QueryError> {
        let view = self.account(id, None, &Caller::Service).await?;
        let movements = self
            .read_model
            .transactions(id, Revision::ZERO, usize::MAX)
            .await?;
        let (balance, revision) = match movements.len() {
            0 => (view.balance, view.revision),
            1 => (0, Revision::new(1)),
            n => (movements[n - 2].balance, movements[n - 2].revision),
        };
        tracing::error!(stream = %id, %revision, "fault injection: serving an old balance");
        Ok(BalanceView {
            balance,
            currency: view.currency,
            revision,
        })
    }

    /// A command just committed `balance`: cache it, so a balance query reads the write
    /// at once even while the projection is still on its way (read-your-writes for
    /// clients that do not send `min_revision`). The cache keeps the newest revision, so
    /// this never moves a balance backwards. (Not a fill under a token taken before the
    /// append: a Redis restart between the two would refuse this write while a query
    /// that read the store before the append fills its older balance — `make torture`
    /// found that.)
    pub async fn note_write(&self, id: &AccountId, balance: CachedBalance) {
        self.cache.put(id, balance).await;
    }

    /// The statement of `id` for the period `[from, to)`: its opening balance and its
    /// movements ([`ReadModel::statement`]), with the account caught up from the store
    /// first (on S3 one GET of the next key), so a statement never misses a movement
    /// already acknowledged; at least at revision `min` if given. Only for a `caller`
    /// that reaches the account.
    pub async fn statement(
        &self,
        id: &AccountId,
        from: OffsetDateTime,
        to: OffsetDateTime,
        min: Option<Revision>,
        caller: &Caller,
    ) -> Result<Statement, QueryError> {
        if !self.read_through {
            self.projector.catch_up(id).await?;
        }
        let account = self.account(id, min, caller).await?;
        let (opening, mut movements) = self.read_model.statement(id, from, to).await?;
        if self.faults.has(Fault::StaleHistory) && movements.pop().is_some() {
            tracing::error!(stream = %id, "fault injection: a statement without its last movement");
        }
        Ok(Statement {
            account,
            opening,
            movements,
        })
    }

    /// Transactions after revision `after`, oldest first, at most `limit`; only for a
    /// `caller` that reaches the account.
    pub async fn transactions(
        &self,
        id: &AccountId,
        after: Revision,
        limit: usize,
        min: Option<Revision>,
        caller: &Caller,
    ) -> Result<(AccountView, Vec<TransactionView>), QueryError> {
        let view = self.account(id, min, caller).await?;
        let items = self.read_model.transactions(id, after, limit).await?;
        Ok((view, items))
    }
}
