//! `tally-redis`: the balance cache in Redis, and the record of each stream's newest
//! commits that command functions catch their warm streams up from.
//!
//! Turns ([`StreamTurns`], also [`RecentInRedis`]): `{prefix}turn:{store}:{stream}` holds
//! the token of the process whose command on the stream goes now (`SET NX PX`, lapsing
//! after [`TURN_LEASE`]); the others poll for it, and give up waiting (going ahead
//! without) after the command handler's patience or as soon as Redis fails. As
//! [`TurnsWithRecent`], a turn is taken together with a read of the stream's recent
//! commits ([`TAKE_READING`]) and given back together with the commit made in it
//! ([`REMEMBER_GIVING_BACK`]): one round trip each way, each a Lua script over the
//! turn's key and the record's (on a Redis Cluster the two would need one hash slot).
//!
//! Recent commits ([`RecentInRedis`]): `{prefix}recent:{store}:{stream}` is a sorted set
//! of the stream's newest [`RECENT_KEPT`] commits (their stored JSON, scored by
//! revision), written by the command that appended each one right after the store
//! accepted it, and kept for [`RECENT_TTL_SECONDS`] after the last. `{store}` names the
//! event store (bucket, database), so two stores behind one Redis and one prefix never
//! see each other's commits. A loss (Redis restarted, a write that failed) leaves a
//! hole or no record, which reads as "cannot tell": the command reads the store, as it
//! would without Redis.
//!
//! Each account is a hash `{prefix}balance:{id}` with `rev`, `bal` and `cur`. A put is
//! one Lua script that writes only when the cached revision is older, so a slow
//! projector can never put an old balance back.
//!
//! `{prefix}epoch` names the Redis instance's life: `{born_ms}:{random}`, set by the
//! first script that finds none (a new Redis, one restarted empty, a cleared cache).
//! Two rules keep a balance older than an acknowledged one out of a Redis that lost its
//! entries, since the write-through of a command committed around the loss may have
//! been lost with them (sent to the old instance, or skipped while this process could
//! not reach the new one):
//!
//! * for the first seconds of an epoch ([`FRESH_GRACE`]) nothing creates an entry —
//!   not a command's write-through (its older commit's second send may land after a
//!   newer one's was lost), not a query's fill; queries fall back to the read model and
//!   the store meanwhile;
//! * a query that missed, read the store and fills the entry presents the epoch its
//!   lookup saw, and only a lookup made after the grace gets one: a fill from a lookup
//!   before a restart, or made while the grace ran, is refused.
//!
//! Every call has a short timeout and any failure is a miss: with Redis down, queries
//! fall back to the read model and commands never notice. The connection is made
//! lazily and re-made after a failure, at most once per second after a failed attempt.

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncCommands, Script};
use std::collections::HashSet;
use std::time::{Duration, Instant};
use tally_app::{Cache, CachedBalance, FillToken, Lookup};
use tally_domain::{AccountId, Currency};
use tally_es::{
    RecentCommits, Revision, Revocations, StoreError, StoredCommit, StreamId, StreamTurns,
    TurnsWithRecent,
};
use tokio::sync::Mutex;

/// How long after an epoch began no entry is created. A command process that could
/// not reach Redis retries its connection after a second; its write-through timeouts
/// are 100 ms, sent at most twice. Three seconds covers both with room to spare.
pub const FRESH_GRACE: Duration = Duration::from_secs(3);

/// Shared by both scripts: the epoch (`KEYS[2]`) and its age in milliseconds, creating
/// it from `ARGV[1]` (a random value) when there is none.
const EPOCH: &str = r#"
local function epoch()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local e = redis.call('GET', KEYS[2])
  if not e then
    e = string.format('%d', now) .. ':' .. ARGV[1]
    redis.call('SET', KEYS[2], e)
  end
  local born = tonumber(string.match(e, '^(%d+):')) or 0
  return e, now - born
end
"#;

/// Write the balance (`ARGV[3..5]`) if the cached revision is older. `ARGV[7]` says
/// when an absent entry may be created: `put` once the epoch is `ARGV[2]` ms old,
/// `refresh` never, `fill` only if the epoch is still `ARGV[8]`, the one the filler's
/// lookup saw (which it got only once that epoch was past the grace).
const WRITE_IF_NEWER: &str = r#"
local e, age = epoch()
if ARGV[7] == 'fill' and e ~= ARGV[8] then return 0 end
local cur = redis.call('HGET', KEYS[1], 'rev')
local create = ARGV[7] == 'fill' or (ARGV[7] == 'put' and age >= tonumber(ARGV[2]))
if (cur and tonumber(cur) < tonumber(ARGV[3])) or ((not cur) and create) then
  redis.call('HSET', KEYS[1], 'rev', ARGV[3], 'bal', ARGV[4], 'cur', ARGV[5])
  if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
  return 1
end
return 0
"#;

/// The entry, the epoch and its age (see [`EPOCH`]).
const LOOKUP: &str = r#"
local e, age = epoch()
local v = redis.call('HMGET', KEYS[1], 'rev', 'bal', 'cur')
return {e, age, v[1], v[2], v[3]}
"#;

/// How many of a stream's newest commits Redis keeps for the command functions.
pub const RECENT_KEPT: isize = 16;
/// How long a stream's recent commits stay after the last one was written.
pub const RECENT_TTL_SECONDS: i64 = 600;

/// How long a stream's turn (see [`StreamTurns`]) lasts if its holder never gives it
/// back (killed, or stuck past every S3 timeout).
pub const TURN_LEASE: Duration = Duration::from_secs(10);

/// Give a turn back only if it is still the giver's.
const GIVE_BACK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Take the turn `KEYS[1]` with token `ARGV[1]` for `ARGV[2]` ms (as `take`'s `SET NX
/// PX`); if taken, also what the record `KEYS[2]` holds after revision `ARGV[3]` and
/// whether there is a record (as `after`'s pipeline): `{1, known, commits}`, or
/// `{0, 0, {}}` when the turn is another's.
const TAKE_READING: &str = r#"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0, 0, {}} end
return {1, redis.call('EXISTS', KEYS[2]),
        redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[3], '+inf')}
"#;

/// Remember commit `ARGV[3]` at revision `ARGV[2]` in the record `KEYS[2]` (the newest
/// `ARGV[4]` kept, for `ARGV[5]` seconds after the last) unless `ARGV[2]` is empty, then
/// give the turn `KEYS[1]` back if it is still token `ARGV[1]`'s (as [`GIVE_BACK`])
/// unless `ARGV[1]` is empty: `remember` and `remember_giving_back` both.
const REMEMBER_GIVING_BACK: &str = r#"
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[4]) + 1))
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// How a write treats an absent entry.
#[derive(Clone, Copy)]
enum Mode {
    Put,
    Refresh,
    Fill,
}

/// A random value for an epoch that a script may have to begin.
fn fresh_epoch() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

/// The cache.
pub struct RedisCache {
    client: redis::Client,
    prefix: String,
    timeout: Duration,
    ttl_seconds: u64,
    /// [`FRESH_GRACE`], shorter in tests that want entries at once.
    fresh_grace: Duration,
    conn: Mutex<Connection>,
    script: Script,
    lookup: Script,
    /// Keys whose write-through failed: deleted as soon as Redis answers again, so an
    /// older balance cached before the failure is never served after it.
    stale: std::sync::Mutex<HashSet<String>>,
}

#[derive(Default)]
struct Connection {
    live: Option<MultiplexedConnection>,
    last_attempt: Option<Instant>,
}

impl RedisCache {
    /// Write `balance` to `id`'s key if it is newer; `mode` says whether it may create
    /// the entry (see [`WRITE_IF_NEWER`]).
    async fn write(&self, id: &AccountId, balance: CachedBalance, mode: Mode, token: FillToken) {
        let key = self.key(id);

        // Marked stale before trying, so that a reconnect racing with a failure below
        // cannot miss it; unmarked once written.
        if let Ok(mut stale) = self.stale.lock() {
            stale.insert(key.clone());
        }
        // Twice: a write that failed on a broken connection is sent again on a new one
        // at once (the first reconnect is not throttled), so a blip does not leave an
        // older balance in the cache for the client this command answers.
        let mut written: Option<i64> = None;
        for _ in 0..2 {
            written = self.write_once(&key, balance, mode, &token).await;
            if written.is_some() {
                break;
            }
        }
        if written.is_some() {
            if let Ok(mut stale) = self.stale.lock() {
                stale.remove(&key);
            }
        }
    }

    async fn write_once(
        &self,
        key: &str,
        balance: CachedBalance,
        mode: Mode,
        token: &FillToken,
    ) -> Option<i64> {
        let script = self.script.clone();
        let ttl = self.ttl_seconds;
        let grace = self.grace_ms();
        let epoch = self.epoch_key();
        let token = token.0.clone().unwrap_or_default();
        self.with(|mut c| {
            let key = key.to_owned();
            async move {
                script
                    .key(key)
                    .key(epoch)
                    .arg(fresh_epoch())
                    .arg(grace)
                    .arg(balance.revision.get())
                    .arg(balance.balance)
                    .arg(balance.currency.code())
                    .arg(ttl)
                    .arg(match mode {
                        Mode::Put => "put",
                        Mode::Refresh => "refresh",
                        Mode::Fill => "fill",
                    })
                    .arg(token)
                    .invoke_async(&mut c)
                    .await
            }
        })
        .await
    }

    /// A cache at `url` (`redis://127.0.0.1:6379`) whose keys start with `prefix`.
    /// Does not connect yet: a Redis that is down at start-up only means misses.
    pub fn new(url: &str, prefix: &str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            prefix: prefix.to_owned(),
            timeout: Duration::from_millis(100),
            ttl_seconds: 60,
            fresh_grace: FRESH_GRACE,
            conn: Mutex::new(Connection::default()),
            script: Script::new(&format!("{EPOCH}{WRITE_IF_NEWER}")),
            lookup: Script::new(&format!("{EPOCH}{LOOKUP}")),
            stale: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// The same cache with another grace after an epoch begins (see [`FRESH_GRACE`]):
    /// for tests that want a new cache to take entries at once.
    pub fn with_fresh_grace(mut self, grace: Duration) -> Self {
        self.fresh_grace = grace;
        self
    }

    fn grace_ms(&self) -> u64 {
        u64::try_from(self.fresh_grace.as_millis()).unwrap_or(u64::MAX)
    }

    fn key(&self, id: &AccountId) -> String {
        format!("{}balance:{}", self.prefix, id.as_str())
    }

    fn epoch_key(&self) -> String {
        format!("{}epoch", self.prefix)
    }

    async fn connection(&self) -> Option<MultiplexedConnection> {
        let mut conn = self.conn.lock().await;
        if let Some(live) = &conn.live {
            return Some(live.clone());
        }
        if conn
            .last_attempt
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return None;
        }
        conn.last_attempt = Some(Instant::now());
        match tokio::time::timeout(
            self.timeout * 3,
            self.client.get_multiplexed_async_connection(),
        )
        .await
        {
            Ok(Ok(mut live)) => {
                let stale: Vec<String> = self
                    .stale
                    .lock()
                    .map(|mut s| s.drain().collect())
                    .unwrap_or_default();
                if !stale.is_empty() {
                    let deleted: redis::RedisResult<()> = live.del(&stale).await;
                    if let Err(e) = deleted {
                        tracing::warn!(error = %e, "could not invalidate stale balances");
                        if let Ok(mut s) = self.stale.lock() {
                            s.extend(stale);
                        }
                        return None;
                    }
                }
                conn.live = Some(live.clone());
                conn.last_attempt = None;
                Some(live)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis unreachable; serving without the cache");
                None
            }
            Err(_) => {
                tracing::warn!("redis connect timed out; serving without the cache");
                None
            }
        }
    }

    async fn forget_connection(&self) {
        self.conn.lock().await.live = None;
    }

    /// Run `f` on a connection with the timeout; any failure drops the connection.
    async fn with<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.connection().await?;
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis command failed");
                self.forget_connection().await;
                None
            }
            Err(_) => {
                tracing::warn!("redis command timed out");
                self.forget_connection().await;
                None
            }
        }
    }

    /// Whether Redis answers a PING now.
    pub async fn ping(&self) -> bool {
        self.with(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .is_some()
    }
}

#[async_trait]
impl Cache for RedisCache {
    async fn lookup(&self, id: &AccountId) -> Lookup {
        let (key, epoch) = (self.key(id), self.epoch_key());
        let script = self.lookup.clone();
        type Found = (String, i64, Option<u64>, Option<i64>, Option<String>);
        let found: Option<Found> = self
            .with(|mut c| async move {
                script
                    .key(key)
                    .key(epoch)
                    .arg(fresh_epoch())
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        let Some((epoch, age, rev, bal, cur)) = found else {
            return Lookup::default();
        };
        let hit = (|| {
            Some(CachedBalance {
                revision: Revision::new(rev?),
                balance: bal?,
                currency: Currency::parse(&cur?).ok()?,
            })
        })();
        // A lookup in the first seconds of an epoch gets no token: a command committed
        // just before may not have reached this Redis (see the crate's doc).
        let past_grace = u64::try_from(age).is_ok_and(|age| age >= self.grace_ms());
        Lookup {
            hit,
            token: FillToken(past_grace.then_some(epoch)),
        }
    }

    async fn put(&self, id: &AccountId, balance: CachedBalance) {
        self.write(id, balance, Mode::Put, FillToken::default())
            .await
    }

    async fn fill(&self, id: &AccountId, balance: CachedBalance, token: FillToken) {
        if token.0.is_some() {
            self.write(id, balance, Mode::Fill, token).await
        }
    }

    async fn refresh(&self, id: &AccountId, balance: CachedBalance) {
        self.write(id, balance, Mode::Refresh, FillToken::default())
            .await
    }

    async fn clear(&self) {
        let pattern = format!("{}balance:*", self.prefix);
        let epoch = self.epoch_key();
        let _: Option<()> = self
            .with(|mut c| async move {
                // A new epoch first: a fill of a lookup from before is refused.
                let _: () = c.del(epoch).await?;
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(500)
                        .query_async(&mut c)
                        .await?;
                    if !keys.is_empty() {
                        let _: () = c.del(keys).await?;
                    }
                    if next == 0 {
                        return Ok(());
                    }
                    cursor = next;
                }
            })
            .await;
    }
}

/// The newest commits of each stream of one event store, in the cache's Redis.
pub struct RecentInRedis {
    redis: std::sync::Arc<RedisCache>,
    /// `{prefix}recent:{store}:`.
    keys: String,
    /// `{prefix}turn:{store}:`.
    turn_keys: String,
    give_back_script: Script,
    take_reading_script: Script,
    remember_giving_back_script: Script,
    /// Records a remember failed to extend: deleted as soon as Redis answers again, so
    /// that none shows a head older than a commit it missed (a projector's sweep would
    /// take that stream for one in step with the read model).
    stale: std::sync::Mutex<HashSet<String>>,
}

impl RecentInRedis {
    /// The recent commits of the event store named `store` (e.g. `s3:{endpoint}/{bucket}/`)
    /// in `redis`.
    pub fn new(redis: std::sync::Arc<RedisCache>, store: &str) -> Self {
        let keys = format!("{}recent:{store}:", redis.prefix);
        let turn_keys = format!("{}turn:{store}:", redis.prefix);
        Self {
            redis,
            keys,
            turn_keys,
            give_back_script: Script::new(GIVE_BACK),
            take_reading_script: Script::new(TAKE_READING),
            remember_giving_back_script: Script::new(REMEMBER_GIVING_BACK),
            stale: std::sync::Mutex::default(),
        }
    }

    /// Delete the records a failed remember left behind, if there are any.
    async fn forget_stale(&self) {
        let stale: Vec<String> = match self.stale.lock() {
            Ok(mut s) if !s.is_empty() => s.drain().collect(),
            _ => return,
        };
        let deleted: Option<()> = self
            .redis
            .with(|mut c| {
                let stale = stale.clone();
                async move { c.del(stale).await }
            })
            .await;
        if deleted.is_none() {
            if let Ok(mut s) = self.stale.lock() {
                s.extend(stale);
            }
        }
    }

    fn turn_key(&self, stream: &StreamId) -> String {
        format!("{}{}", self.turn_keys, stream.as_str())
    }

    fn recent_key(&self, stream: &StreamId) -> String {
        format!("{}{}", self.keys, stream.as_str())
    }
}

#[async_trait]
impl RecentCommits for RecentInRedis {
    /// One round trip: the commits scored after `after`, and whether there is a record
    /// of the stream at all.
    async fn after(&self, stream: &StreamId, after: Revision) -> Option<Vec<StoredCommit>> {
        let key = self.recent_key(stream);
        let (newer, known): (Vec<Vec<u8>>, bool) = self
            .redis
            .with(|mut c| async move {
                redis::pipe()
                    .zrangebyscore(&key, format!("({}", after.get()), "+inf")
                    .exists(&key)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        read_after(stream, after, known, &newer)
    }

    async fn head(&self, stream: &StreamId) -> Option<Revision> {
        self.forget_stale().await;
        let key = self.recent_key(stream);
        let newest: Vec<Vec<u8>> = self
            .redis
            .with(|mut c| async move { c.zrange(&key, -1, -1).await })
            .await?;
        let commit = StoredCommit::from_bytes(newest.first()?).ok()?;
        Some(commit.last_revision())
    }

    /// A remember that fails marks the stream's record stale: it is deleted once
    /// Redis answers again (see `stale`).
    async fn remember(&self, commit: &StoredCommit) {
        self.remember_then_give_back(&commit.stream, Some(commit), None)
            .await
    }
}

impl RecentInRedis {
    /// Poll `try_once` for `stream`'s turn until it is had (`Some(Some(_))`), Redis
    /// fails (`None`), or `patience` would run out, pausing 2 ms at first and up to
    /// 20 ms.
    async fn poll_turn<T, F, Fut>(
        &self,
        stream: &StreamId,
        patience: Duration,
        mut try_once: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<Option<T>>>,
    {
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(taken) = try_once().await? {
                return Some(taken);
            }
            if started.elapsed() + pause > patience {
                tracing::debug!(%stream, "no turn within the patience; going ahead without");
                return None;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 3 / 2).min(Duration::from_millis(20));
        }
    }
}

/// [`TURN_LEASE`] in milliseconds, as `PX` takes it.
fn lease_ms() -> u64 {
    u64::try_from(TURN_LEASE.as_millis()).unwrap_or(u64::MAX)
}

/// A new turn's token.
fn turn_token() -> String {
    format!("{:016x}", fastrand::u64(..))
}

#[async_trait]
impl StreamTurns for RecentInRedis {
    async fn take(&self, stream: &StreamId, patience: Duration) -> Option<String> {
        let (key, token) = (self.turn_key(stream), turn_token());
        self.poll_turn(stream, patience, || {
            let (key, token) = (key.clone(), token.clone());
            async move {
                let taken: Option<String> = self
                    .redis
                    .with(|mut c| async move {
                        redis::cmd("SET")
                            .arg(key)
                            .arg(token)
                            .arg("NX")
                            .arg("PX")
                            .arg(lease_ms())
                            .query_async::<Option<String>>(&mut c)
                            .await
                    })
                    .await?;
                Some(taken.map(|_| ()))
            }
        })
        .await
        .map(|()| token)
    }

    async fn give_back(&self, stream: &StreamId, token: &str) {
        let key = self.turn_key(stream);
        let script = self.give_back_script.clone();
        let _: Option<i64> = self
            .redis
            .with(|mut c| {
                let token = token.to_owned();
                async move { script.key(key).arg(token).invoke_async(&mut c).await }
            })
            .await;
    }
}

/// One round trip each way: [`TAKE_READING`] and [`REMEMBER_GIVING_BACK`].
#[async_trait]
impl TurnsWithRecent for RecentInRedis {
    async fn take_reading(
        &self,
        stream: &StreamId,
        patience: Duration,
        after: Revision,
    ) -> Option<(String, Option<Vec<StoredCommit>>)> {
        let (turn, record) = (self.turn_key(stream), self.recent_key(stream));
        let token = turn_token();
        let (known, newer) = self
            .poll_turn(stream, patience, || {
                let (turn, record, token) = (turn.clone(), record.clone(), token.clone());
                let script = self.take_reading_script.clone();
                async move {
                    let (taken, known, newer): (i64, i64, Vec<Vec<u8>>) = self
                        .redis
                        .with(|mut c| async move {
                            script
                                .key(turn)
                                .key(record)
                                .arg(token)
                                .arg(lease_ms())
                                .arg(after.get())
                                .invoke_async(&mut c)
                                .await
                        })
                        .await?;
                    Some((taken == 1).then_some((known == 1, newer)))
                }
            })
            .await?;
        let found = read_after(stream, after, known, &newer);
        Some((token, found))
    }

    /// A remember that fails marks the stream's record stale, as
    /// [`RecentCommits::remember`] does.
    async fn remember_giving_back(
        &self,
        stream: &StreamId,
        token: &str,
        commit: Option<&StoredCommit>,
    ) {
        self.remember_then_give_back(stream, commit, Some(token))
            .await
    }
}

impl RecentInRedis {
    /// [`REMEMBER_GIVING_BACK`]: remember `commit` if there is one, then give back the
    /// turn taken with `token` if there is one. A remember that fails marks the
    /// stream's record stale: it is deleted once Redis answers again (see `stale`).
    async fn remember_then_give_back(
        &self,
        stream: &StreamId,
        commit: Option<&StoredCommit>,
        token: Option<&str>,
    ) {
        if commit.is_some() {
            self.forget_stale().await;
        }
        let (turn, record) = (self.turn_key(stream), self.recent_key(stream));
        let (score, body) = match commit {
            Some(commit) => (commit.revision.get().to_string(), commit.to_bytes()),
            None => (String::new(), Vec::new()),
        };
        let token = token.unwrap_or_default().to_owned();
        let script = self.remember_giving_back_script.clone();
        let done: Option<i64> = self
            .redis
            .with(|mut c| {
                let record = record.clone();
                async move {
                    script
                        .key(turn)
                        .key(record)
                        .arg(token)
                        .arg(score)
                        .arg(body)
                        .arg(RECENT_KEPT)
                        .arg(RECENT_TTL_SECONDS)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await;
        if done.is_none() && commit.is_some() {
            if let Ok(mut stale) = self.stale.lock() {
                stale.insert(record);
            }
        }
    }
}

/// What the record of `stream` says after `after`, from its commits scored after it
/// (`newer`) and whether it exists (`known`); see [`RecentCommits::after`].
fn read_after(
    stream: &StreamId,
    after: Revision,
    known: bool,
    newer: &[Vec<u8>],
) -> Option<Vec<StoredCommit>> {
    if !known {
        return None;
    }
    let commits = newer
        .iter()
        .map(|b| StoredCommit::from_bytes(b))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tracing::warn!(%stream, error = %e, "unreadable recent commit in redis"))
        .ok()?;
    // A hole (a commit whose write never reached Redis) cannot be told from the end of
    // the stream: read the store.
    let contiguous: Result<(), StoreError> =
        tally_es::check_contiguous(stream, after.next(), &commits);
    contiguous.ok().map(|()| commits)
}

/// The record of destroyed data keys ([`Revocations`], read by `tally_vault::KeptKeys`
/// on every use of a kept key) in the cache's Redis: one hash, `{prefix}revoked-keys`,
/// whose field `epoch` is the record's epoch and whose other fields are the key ids
/// destroyed. One hash, so that losing it (a restart, an eviction) loses the epoch with
/// the marks; its fields never expire. Each call is one round trip (`MULTI`: begin the
/// epoch if there is none, then read or mark).
///
/// The epoch [`Revocations::check`] reports is the server's `run_id` (from `INFO
/// server`) with that field: a Redis that comes back from a snapshot or an append-only
/// file, or a replica promoted in its place, may hold the hash as it was before the
/// newest marks — with the same field — but never the same `run_id`, so nothing kept
/// under the old server is trusted under the new one.
pub struct RevocationsInRedis {
    redis: std::sync::Arc<RedisCache>,
    key: String,
}

impl RevocationsInRedis {
    /// The record in `redis`, under its prefix.
    pub fn new(redis: std::sync::Arc<RedisCache>) -> Self {
        let key = format!("{}revoked-keys", redis.prefix);
        Self { redis, key }
    }

    /// One round trip, atomic: begin the record's epoch if there is none, then what
    /// `then` adds to the pipeline (given the record's key).
    async fn in_record<T: redis::FromRedisValue>(
        &self,
        then: impl FnOnce(&mut redis::Pipeline, &str),
    ) -> Result<T, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_nx(&self.key, REVOKED_EPOCH, fresh_epoch())
            .ignore();
        then(&mut pipe, &self.key);
        self.redis
            .with(|mut c| async move { pipe.query_async(&mut c).await })
            .await
            .ok_or_else(|| {
                StoreError::Unavailable(
                    "the record of destroyed keys (Redis) is out of reach".into(),
                )
            })
    }
}

/// The hash field of the record's epoch (key ids begin with `k-`).
const REVOKED_EPOCH: &str = "epoch";

#[async_trait]
impl Revocations for RevocationsInRedis {
    async fn check(&self, key_id: &str) -> Result<(String, bool), StoreError> {
        let ((epoch, mark), info): ((Option<String>, Option<String>), String) = self
            .in_record(|pipe, key| {
                pipe.hmget(key, &[REVOKED_EPOCH, key_id])
                    .cmd("INFO")
                    .arg("server");
            })
            .await?;
        let run_id = info
            .lines()
            .find_map(|line| line.strip_prefix("run_id:"))
            .map(str::trim)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| StoreError::Unavailable("Redis did not say its run_id".into()))?;
        let epoch =
            epoch.ok_or_else(|| StoreError::Unavailable("the record has no epoch".into()))?;
        Ok((format!("{run_id}/{epoch}"), mark.is_some()))
    }

    async fn revoke(&self, key_id: &str) -> Result<(), StoreError> {
        self.in_record(|pipe, key| {
            pipe.hset(key, key_id, 1).ignore();
        })
        .await
    }
}
