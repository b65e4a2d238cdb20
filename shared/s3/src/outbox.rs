//! The outbox in S3: covers.
//!
//! A command records its entry before its append. An entry is not written one by one:
//! a process writes *covers*, `outbox/.{until}-{process}-{seq}`, each listing streams
//! with a base revision, one `{stream}/{base:020}` per line: "until `until` (Unix
//! milliseconds, in the name), this process may append commits after `base` to these
//! streams". A record on a stream whose cover has more than a margin of its lifetime
//! left joins it, in memory, with no request at all; a record on a stream with no such
//! cover waits for the next cover object (the streams recorded meanwhile go in it
//! together). Every half lifetime or so, a process writes one cover renewing the
//! streams it used lately; a cover that no record can join any more and whose entries
//! are all done is deleted (deletes due together go in one DeleteObjects). A command's
//! outbox so costs nothing on a stream its process is writing already, and a share of
//! one PUT and one delete on a new one; a process costs about a PUT and a delete per
//! half lifetime.
//!
//! A relay (any process) lists `outbox/`, and handles the covers whose `until` is a
//! grace period past: the process that wrote one is gone, or stuck, or its publishes
//! failed. For each stream of such a cover it reads the commits after the base and
//! hands them out as entries; once it has done them all it writes the cover again with
//! the bases moved past what it published (and deletes the old one), so that another
//! relay's listing finds nothing more there. Ten minutes after `until` (long past any
//! append that could still land) it reads the streams once more and deletes the
//! cover. A commit published twice (by its writer and a relay, or by two relays) is
//! applied once by the consumers.
//!
//! Why this holds invariant 3: a record joins a cover only while `until` is more than
//! a margin ahead (by this process's clock, measured from before the cover's PUT was
//! sent), so every append that can land is covered by a cover naming its stream with a
//! base below its revision (a process records revision `r` only once it has read the
//! commit ending at `r - 1`, so an append at or below a base cannot land). Until a
//! relay has read the stream past that append, the cover stays.
//!
//! Earlier versions wrote one object per entry, `outbox/{stream}/{revision:020}.{attempt}`,
//! then batches of entries, `outbox/~{process}-{seq}` (one entry path a line): relays
//! still list both, publish their entries and delete them once done. A batch never
//! changes; until it goes, a relay that did not do an entry itself may list it again
//! and publish its commit once more. (A relay of those versions passes over a cover: a
//! name that starts with `.` is neither.)

use crate::{failed, to_time, S3EventStore};
use bytes::Bytes;
use futures::stream::{self as futures_stream, StreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tally_es::{outbox_name, OutboxEntry, Revision, StoreError, StreamId};
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// What starts a cover's name after `outbox/`: never a stream id's first character.
const COVER_MARK: char = '.';
/// What starts an earlier version's batch object.
const BATCH_MARK: char = '~';
/// The most streams one cover written for waiting records lists.
const MAX_COVER: usize = 1000;
/// How long a cover lets its process append, by default.
pub const COVER_LIFETIME: Duration = Duration::from_secs(10);
/// How long after a cover's `until` a relay reads its streams (a writer still working
/// has renewed its streams in another cover by then).
const COVER_GRACE: time::Duration = time::Duration::seconds(2);
/// How long after a cover's `until` a relay reads its streams a last time and deletes
/// it: long past any append that could still land (the relay's abandon period).
const COVER_LAST_READ: time::Duration = time::Duration::minutes(10);
/// How many streams of a cover a relay reads at once.
const COVER_READS: usize = 16;
/// How long a batch or cover whose every entry was done is remembered as finished, so
/// that a listing made before its delete landed does not take it up again.
const FINISHED_MEMORY: Duration = Duration::from_secs(60);
/// An earlier version's batch object that is younger than this is not read by
/// `pending` (its writer may still be publishing its entries).
const UNREAD_YOUNGER_THAN: time::Duration = time::Duration::seconds(2);
/// How long this process keeps an entry never done (an append whose outcome it never
/// learned, or whose publish failed): the relay handles those once the cover expires.
const FORGET_AFTER: Duration = Duration::from_secs(900);

/// The outbox's state in this process: the covers it wrote, and what its listings read.
#[derive(Debug)]
pub(crate) struct Covers {
    /// This process's part of an object's key: random, so a restarted process never
    /// takes up an earlier one's names.
    process: String,
    seq: AtomicU64,
    lifetime: Duration,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// The covers this process wrote, by key.
    mine: HashMap<String, Cover>,
    /// Stream → its newest cover of this process.
    streams: HashMap<StreamId, Covered>,
    /// Entry path → the cover of this process it joined.
    joined: HashMap<String, String>,
    /// Batches and others' covers a listing read, by key.
    read: HashMap<String, Read>,
    /// Entry path → the object read that lists it.
    entries: HashMap<String, String>,
    /// Objects whose every entry was done (and that were deleted), with when.
    finished: HashMap<String, Instant>,
    pruned: Option<Instant>,
}

#[derive(Debug)]
struct Cover {
    /// Records join it until then: its lifetime less a margin (three tenths).
    usable_until: Instant,
    /// Renewed (its streams written again in a newer cover) from then on.
    renew_from: Instant,
    /// Entries recorded under it and not done yet.
    pending: HashMap<String, Joined>,
    /// Streams whose newest cover this is.
    current: usize,
    written: Instant,
}

#[derive(Clone, Debug)]
struct Joined {
    stream: StreamId,
    revision: Revision,
    attempt: String,
    at: OffsetDateTime,
}

#[derive(Debug)]
struct Covered {
    cover: String,
    /// The last record on the stream.
    used: Instant,
    /// The base its newest cover names.
    base: Revision,
    /// The highest revision recorded on it, if any.
    highest: Option<Revision>,
}

impl Covered {
    /// The base a renewal names: records at the highest revision recorded or above
    /// may still come; below it none can land (the commit ending just before it was
    /// read).
    fn renewal_base(&self) -> Revision {
        self.highest.map_or(self.base, |h| {
            self.base.max(Revision::new(h.get().saturating_sub(1)))
        })
    }
}

/// An object a listing read: an earlier version's batch, or another process's
/// expired cover.
#[derive(Debug)]
struct Read {
    remaining: HashSet<String>,
    /// When the entries listed were recorded (a cover's: its `until`).
    recorded_at: OffsetDateTime,
    cover: Option<CoverRead>,
}

#[derive(Debug)]
struct CoverRead {
    last: bool,
    until: OffsetDateTime,
    /// Per stream, the base read from and the last revision of the newest commit read.
    reach: BTreeMap<StreamId, (Revision, Revision)>,
}

/// What `done` came to.
pub(crate) enum Done {
    /// Nothing to do now.
    Nothing,
    /// Delete this key (a cover or batch whose every entry is done).
    Delete(String),
    /// A relay did every entry of another process's expired cover: write it again
    /// with these bases, then delete the old key.
    Advance {
        old: String,
        until: OffsetDateTime,
        bases: BTreeMap<StreamId, Revision>,
    },
    /// Not an entry this process knows: an earlier version's single-entry key, if any.
    Unknown,
}

/// What a listing finds of an object.
enum Known {
    /// Done with (deleted, or a cover written again).
    Finished,
    /// Read: its entries not done yet (for a cover, whether that was its last read).
    Read {
        entries: Vec<OutboxEntry>,
        last: bool,
    },
    New,
}

/// What a cover has for a record.
enum Joining {
    Joined,
    Wait,
}

impl Covers {
    pub(crate) fn new(lifetime: Duration) -> Self {
        Self {
            process: format!("{:016x}", fastrand::u64(..)),
            seq: AtomicU64::new(0),
            lifetime,
            table: Mutex::default(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("outbox table poisoned")
    }

    /// A new cover's key for `until`.
    fn key(&self, prefix: &str, until: OffsetDateTime) -> String {
        format!(
            "{prefix}outbox/{COVER_MARK}{:013}-{}-{:012}",
            until.unix_timestamp_nanos() / 1_000_000,
            self.process,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Join the entry to `stream`'s cover if one is usable now.
    fn join(&self, path: &str, stream: &StreamId, revision: Revision, attempt: &str) -> Joining {
        let mut table = self.table();
        let now = Instant::now();
        let Some(covered) = table.streams.get_mut(stream) else {
            return Joining::Wait;
        };
        let key = covered.cover.clone();
        let usable = table.mine.get(&key).is_some_and(|c| c.usable_until > now);
        if !usable {
            return Joining::Wait;
        }
        table.add(&key, path, stream, revision, attempt, now);
        Joining::Joined
    }

    /// Cover `key`, usable until `usable_until`, was written for `streams` (with their
    /// bases): it becomes their newest; `joining` (entry paths) join it.
    fn written(
        &self,
        key: &str,
        started: Instant,
        streams: &BTreeMap<StreamId, Revision>,
        joining: &[(String, StreamId, Revision, String)],
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let usable_until = started + self.lifetime.mul_f64(0.7);
        if now >= usable_until {
            return Err(StoreError::Unavailable(format!(
                "the outbox cover {key} took {:?} to write: too long to append under it",
                now - started
            )));
        }
        let mut table = self.table();
        table.prune();
        table.mine.insert(
            key.to_owned(),
            Cover {
                usable_until,
                renew_from: started + self.lifetime.mul_f64(0.4),
                pending: HashMap::new(),
                current: 0,
                written: now,
            },
        );
        for (stream, base) in streams {
            let previous = table.streams.remove(stream);
            let (used, highest) = previous
                .as_ref()
                .map_or((now, None), |p| (p.used, p.highest));
            if let Some(previous) = previous {
                if let Some(old) = table.mine.get_mut(&previous.cover) {
                    old.current = old.current.saturating_sub(1);
                }
            }
            table.streams.insert(
                stream.clone(),
                Covered {
                    cover: key.to_owned(),
                    used,
                    base: *base,
                    highest,
                },
            );
            table.mine.get_mut(key).expect("just inserted").current += 1;
        }
        for (path, stream, revision, attempt) in joining {
            table.add(key, path, stream, *revision, attempt, now);
        }
        Ok(())
    }

    /// What the ticker has to do now: the streams to renew (those used within a
    /// lifetime whose newest cover is due for renewal), and the covers to delete (no
    /// record can join them and every entry of theirs is done).
    fn due(&self) -> (BTreeMap<StreamId, Revision>, Vec<String>) {
        let mut table = self.table();
        let now = Instant::now();
        let mut renew = BTreeMap::new();
        let lifetime = self.lifetime;
        let mut idle = Vec::new();
        for (stream, covered) in &table.streams {
            let Some(cover) = table.mine.get(&covered.cover) else {
                idle.push(stream.clone());
                continue;
            };
            if now < cover.renew_from {
                continue;
            }
            if now.duration_since(covered.used) < lifetime {
                renew.insert(stream.clone(), covered.renewal_base());
            } else if now >= cover.usable_until {
                idle.push(stream.clone());
            }
        }
        for stream in idle {
            if let Some(covered) = table.streams.remove(&stream) {
                if let Some(cover) = table.mine.get_mut(&covered.cover) {
                    cover.current = cover.current.saturating_sub(1);
                }
            }
        }
        let delete: Vec<String> = table
            .mine
            .iter()
            .filter(|(_, c)| c.pending.is_empty() && (c.current == 0 || now >= c.usable_until))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &delete {
            table.retire(key);
        }
        (renew, delete)
    }

    fn done(&self, entry: &str) -> Done {
        let mut table = self.table();
        if let Some(key) = table.joined.remove(entry) {
            let now = Instant::now();
            let Some(cover) = table.mine.get_mut(&key) else {
                return Done::Nothing;
            };
            cover.pending.remove(entry);
            if cover.pending.is_empty() && (cover.current == 0 || now >= cover.usable_until) {
                table.retire(&key);
                return Done::Delete(key);
            }
            return Done::Nothing;
        }
        let Some(key) = table.entries.remove(entry) else {
            return Done::Unknown;
        };
        let Some(read) = table.read.get_mut(&key) else {
            return Done::Unknown;
        };
        read.remaining.remove(entry);
        if !read.remaining.is_empty() {
            return Done::Nothing;
        }
        match &read.cover {
            None => {
                table.read.remove(&key);
                table.finished.insert(key.clone(), Instant::now());
                Done::Delete(key)
            }
            Some(cover) if cover.last => {
                table.read.remove(&key);
                table.finished.insert(key.clone(), Instant::now());
                Done::Delete(key)
            }
            Some(cover) => {
                let moved = cover.reach.values().any(|(base, reach)| reach > base);
                if !moved {
                    return Done::Nothing;
                }
                let (until, bases) = (
                    cover.until,
                    cover
                        .reach
                        .iter()
                        .map(|(s, (_, r))| (s.clone(), *r))
                        .collect(),
                );
                table.read.remove(&key);
                table.finished.insert(key.clone(), Instant::now());
                Done::Advance {
                    old: key,
                    until,
                    bases,
                }
            }
        }
    }

    /// The entries recorded here and not done, oldest first.
    fn mine_pending(&self) -> Vec<OutboxEntry> {
        let table = self.table();
        let mut entries: Vec<OutboxEntry> = table
            .mine
            .values()
            .flat_map(|c| c.pending.values())
            .map(|j| OutboxEntry {
                stream: j.stream.clone(),
                revision: j.revision,
                attempt: j.attempt.clone(),
                recorded_at: j.at,
            })
            .collect();
        entries.sort_by_key(|e| e.recorded_at);
        entries
    }

    fn is_mine(&self, key: &str) -> bool {
        self.table().mine.contains_key(key)
    }

    /// What this process knows of an object a listing shows.
    fn known(&self, key: &str) -> Known {
        let table = self.table();
        if table.finished.contains_key(key) {
            return Known::Finished;
        }
        let Some(read) = table.read.get(key) else {
            return Known::New;
        };
        let mut paths: Vec<&String> = read.remaining.iter().collect();
        paths.sort();
        let entries = paths
            .into_iter()
            .filter_map(|p| parse_entry(p))
            .map(|(stream, revision, attempt)| OutboxEntry {
                stream,
                revision,
                attempt,
                recorded_at: read.recorded_at,
            })
            .collect();
        Known::Read {
            entries,
            last: read.cover.as_ref().is_some_and(|c| c.last),
        }
    }

    /// Keep what a listing read of `key`.
    fn keep(
        &self,
        key: &str,
        paths: Vec<String>,
        recorded_at: OffsetDateTime,
        cover: Option<CoverRead>,
    ) {
        let mut table = self.table();
        table.prune();
        table.forget(key);
        for p in &paths {
            table.entries.insert(p.clone(), key.to_owned());
        }
        table.read.insert(
            key.to_owned(),
            Read {
                remaining: paths.into_iter().collect(),
                recorded_at,
                cover,
            },
        );
    }

    fn finish(&self, key: &str) {
        let mut table = self.table();
        table.forget(key);
        table.finished.insert(key.to_owned(), Instant::now());
    }

    /// Forget the objects read from an earlier listing that a complete listing no
    /// longer shows (deleted by their writer or another relay).
    fn forget_unlisted(&self, listed: &HashSet<String>) {
        let mut table = self.table();
        let gone: Vec<String> = table
            .read
            .keys()
            .filter(|k| !listed.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            table.forget(&key);
        }
    }
}

impl Table {
    fn add(
        &mut self,
        key: &str,
        path: &str,
        stream: &StreamId,
        revision: Revision,
        attempt: &str,
        now: Instant,
    ) {
        if let Some(covered) = self.streams.get_mut(stream) {
            covered.used = now;
            covered.highest = Some(covered.highest.map_or(revision, |h| h.max(revision)));
        }
        let Some(cover) = self.mine.get_mut(key) else {
            return;
        };
        let ago = time::Duration::try_from(now.elapsed()).unwrap_or_default();
        cover.pending.insert(
            path.to_owned(),
            Joined {
                stream: stream.clone(),
                revision,
                attempt: attempt.to_owned(),
                at: OffsetDateTime::now_utc() - ago,
            },
        );
        self.joined.insert(path.to_owned(), key.to_owned());
    }

    /// Cover `key` of this process is about to be deleted.
    fn retire(&mut self, key: &str) {
        if let Some(cover) = self.mine.remove(key) {
            for path in cover.pending.keys() {
                self.joined.remove(path);
            }
        }
        self.streams.retain(|_, c| c.cover != key);
    }

    fn forget(&mut self, key: &str) {
        if let Some(read) = self.read.remove(key) {
            for e in read.remaining {
                self.entries.remove(&e);
            }
        }
    }

    /// Drop what is past remembering, at most every few seconds.
    fn prune(&mut self) {
        if self
            .pruned
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.pruned = Some(Instant::now());
        self.finished.retain(|_, at| at.elapsed() < FINISHED_MEMORY);
        // Covers with entries never done: the relay has them once they expire.
        let stale: Vec<String> = self
            .mine
            .iter()
            .filter(|(_, c)| c.written.elapsed() > FORGET_AFTER)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.retire(&key);
        }
    }
}

/// `stream`'s entry of `attempt` at `revision` as a batch lists it.
pub(crate) fn entry_path(
    stream: &StreamId,
    revision: Revision,
    attempt: &str,
) -> Result<String, StoreError> {
    Ok(format!(
        "{}/{}",
        stream.as_str(),
        outbox_name(revision, attempt)?
    ))
}

/// An entry path back into its parts; `None` for anything else.
fn parse_entry(path: &str) -> Option<(StreamId, Revision, String)> {
    let (stream, name) = path.split_once('/')?;
    let (revision, attempt) = name.split_once('.').unwrap_or((name, ""));
    Some((
        StreamId::parse(stream).ok()?,
        Revision::parse(revision).ok()?,
        attempt.to_owned(),
    ))
}

/// A cover's body: `{stream}/{base:020}` a line.
fn cover_body(streams: &BTreeMap<StreamId, Revision>) -> Bytes {
    let lines: Vec<String> = streams
        .iter()
        .map(|(s, base)| format!("{}/{:020}", s.as_str(), base.get()))
        .collect();
    Bytes::from(lines.join("\n"))
}

/// A cover's body back into its streams and bases (lines that are not one are skipped).
fn parse_cover(body: &[u8]) -> BTreeMap<StreamId, Revision> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| {
            let (stream, base) = l.split_once('/')?;
            Some((StreamId::parse(stream).ok()?, Revision::parse(base).ok()?))
        })
        .collect()
}

/// A cover's `until`, from its name (what follows `outbox/.`).
fn cover_until(name: &str) -> Option<OffsetDateTime> {
    let millis: i128 = name.split('-').next()?.parse().ok()?;
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).ok()
}

/// Write covers for what arrives on `queue` (entry paths waiting for one): whatever is
/// waiting, up to [`MAX_COVER`] streams, in one PUT, then the next. Ends when every
/// store is dropped.
pub(crate) async fn cover_in_batches(
    store: S3EventStore,
    mut queue: mpsc::UnboundedReceiver<crate::KeyRequest>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_COVER {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut streams: BTreeMap<StreamId, Revision> = BTreeMap::new();
        let mut joining = Vec::new();
        for (path, _) in &batch {
            if let Some((stream, revision, attempt)) = parse_entry(path) {
                let base = Revision::new(revision.get().saturating_sub(1));
                let slot = streams.entry(stream.clone()).or_insert(base);
                *slot = (*slot).min(base);
                joining.push((path.clone(), stream, revision, attempt));
            }
        }
        let written = store
            .write_cover(&streams, &joining)
            .await
            .map_err(|e| e.to_string());
        for (_, reply) in batch {
            let _ = reply.send(written.clone().map_err(StoreError::Unavailable));
        }
    }
}

/// Renew the streams in use and delete the covers done with, every twentieth of a
/// lifetime, for as long as the process's stores live. `base` is a store without
/// queues whose own outbox state is a stand-in: the ticker holds the real one only
/// while it works, so it ends once every store is dropped.
async fn tick(base: S3EventStore, covers: Weak<Covers>) {
    let every = {
        let Some(covers) = covers.upgrade() else {
            return;
        };
        (covers.lifetime / 20).max(Duration::from_millis(20))
    };
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(covers) = covers.upgrade() else {
            return;
        };
        let (renew, delete) = covers.due();
        let store = S3EventStore {
            outbox: covers,
            ..base.clone()
        };
        if !renew.is_empty() {
            if let Err(e) = store.write_cover(&renew, &[]).await {
                tracing::warn!(error = %e, streams = renew.len(),
                    "outbox cover not renewed; records on those streams will write one");
            }
        }
        let deleted = match delete.as_slice() {
            [] => Ok(()),
            [key] => store.delete(key).await.map_err(|e| e.to_string()),
            keys => match store.delete_many(keys.iter().map(String::as_str)).await {
                Ok(failed) if failed.is_empty() => Ok(()),
                Ok(failed) => Err(format!("{failed:?}")),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = deleted {
            tracing::debug!(error = %e, "outbox covers not deleted; a relay deletes them later");
        }
    }
}

impl S3EventStore {
    /// Record `entry`: join its stream's cover, or wait for the next cover object.
    pub(crate) async fn record_covered(
        &self,
        stream: &StreamId,
        revision: Revision,
        attempt: &str,
    ) -> Result<(), StoreError> {
        let path = entry_path(stream, revision, attempt)?;
        self.outbox_ticker.get_or_init(|| {
            let base = S3EventStore {
                outbox: Arc::new(Covers::new(self.outbox.lifetime)),
                ..self.clone_without_queue()
            };
            tokio::spawn(tick(base, Arc::downgrade(&self.outbox)));
        });
        match self.outbox.join(&path, stream, revision, attempt) {
            Joining::Joined => Ok(()),
            Joining::Wait => {
                self.through(&self.outbox_records, cover_in_batches, path, "record")
                    .await
            }
        }
    }

    /// Write a cover of `streams` (with their bases); `joining` join it.
    async fn write_cover(
        &self,
        streams: &BTreeMap<StreamId, Revision>,
        joining: &[(String, StreamId, Revision, String)],
    ) -> Result<(), StoreError> {
        let started = Instant::now();
        let until = OffsetDateTime::now_utc()
            + time::Duration::try_from(self.outbox.lifetime).unwrap_or(time::Duration::ZERO);
        let key = self.outbox.key(&self.prefix, until);
        self.put(&key, cover_body(streams), "text/plain").await?;
        self.outbox.written(&key, started, streams, joining)
    }

    /// `entry` is done: nothing, or the delete of its cover or batch (when it was the
    /// last), or of its single-entry key.
    pub(crate) async fn done_covered(&self, entry: String) -> Result<(), StoreError> {
        match self.outbox.done(&entry) {
            Done::Nothing => Ok(()),
            Done::Delete(key) => self.delete_gathered(key).await,
            Done::Advance { old, until, bases } => {
                let key = self.outbox.key(&self.prefix, until);
                self.put(&key, cover_body(&bases), "text/plain").await?;
                let reach = bases.iter().map(|(s, b)| (s.clone(), (*b, *b))).collect();
                self.outbox.keep(
                    &key,
                    Vec::new(),
                    until,
                    Some(CoverRead {
                        last: false,
                        until,
                        reach,
                    }),
                );
                self.delete_gathered(old).await
            }
            Done::Unknown => {
                self.delete_gathered(format!("{}outbox/{entry}", self.prefix))
                    .await
            }
        }
    }

    /// Up to `limit` pending entries: this process's own, then, of one listing of
    /// `outbox/`, the entries of others' expired covers (their streams read past the
    /// base), of earlier versions' batches and single-entry keys.
    pub(crate) async fn pending_covered(
        &self,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let mut entries = self.outbox.mine_pending();
        let prefix = format!("{}outbox/", self.prefix);
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .max_keys(i32::try_from(limit.clamp(1, 1000)).unwrap_or(1000))
            .send()
            .await
            .map_err(|e| failed(format_args!("LIST {prefix}"), &e))?;
        // What a whole listing no longer shows was deleted by its writer or another
        // relay: forget it first, so that nothing stale is listed below.
        if !page.is_truncated().unwrap_or(false) {
            let listed: HashSet<String> = page
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .map(str::to_owned)
                .collect();
            self.outbox.forget_unlisted(&listed);
        }
        let now = OffsetDateTime::now_utc();
        for object in page.contents() {
            if entries.len() >= limit {
                break;
            }
            let Some(key) = object.key() else { continue };
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let recorded_at = object
                .last_modified()
                .and_then(to_time)
                .unwrap_or_else(OffsetDateTime::now_utc);
            if let Some(name) = rest.strip_prefix(COVER_MARK) {
                if self.outbox.is_mine(key) {
                    continue;
                }
                let Some(until) = cover_until(name) else {
                    continue;
                };
                if now < until + COVER_GRACE {
                    continue;
                }
                let last = now >= until + COVER_LAST_READ;
                match self.outbox.known(key) {
                    Known::Finished => {}
                    Known::Read {
                        entries: known,
                        last: read_last,
                    } if read_last == last => entries.extend(known),
                    Known::Read { .. } | Known::New => {
                        entries.extend(self.read_cover(key, until, last).await?);
                    }
                }
            } else if rest.starts_with(BATCH_MARK) {
                match self.outbox.known(key) {
                    Known::Finished => {}
                    Known::Read { entries: known, .. } => entries.extend(known),
                    Known::New if now - recorded_at < UNREAD_YOUNGER_THAN => {}
                    Known::New => {
                        // Gone since the listing: nothing to do.
                        let Some(body) = self.get_bytes_if_any(key).await? else {
                            continue;
                        };
                        let paths: Vec<String> = String::from_utf8_lossy(&body)
                            .lines()
                            .filter(|l| parse_entry(l).is_some())
                            .map(str::to_owned)
                            .collect();
                        self.outbox.keep(key, paths.clone(), recorded_at, None);
                        entries.extend(paths.iter().filter_map(|p| parse_entry(p)).map(
                            |(stream, revision, attempt)| OutboxEntry {
                                stream,
                                revision,
                                attempt,
                                recorded_at,
                            },
                        ));
                    }
                }
            } else if let Some((stream, revision, attempt)) = parse_entry(rest) {
                entries.push(OutboxEntry {
                    stream,
                    revision,
                    attempt,
                    recorded_at,
                });
            }
        }
        entries.truncate(limit);
        Ok(entries)
    }

    /// Read another process's expired cover `key`: every commit after each stream's
    /// base, as entries. On the last read, a cover with nothing left is deleted.
    async fn read_cover(
        &self,
        key: &str,
        until: OffsetDateTime,
        last: bool,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let Some(body) = self.get_bytes_if_any(key).await? else {
            return Ok(Vec::new());
        };
        let bases = parse_cover(&body);
        let read: Vec<(StreamId, Revision, Result<Vec<_>, StoreError>)> =
            futures_stream::iter(bases.into_iter().map(|(stream, base)| async move {
                let commits = self.read_commits_after(&stream, base).await;
                (stream, base, commits)
            }))
            .buffer_unordered(COVER_READS)
            .collect()
            .await;
        let mut reach = BTreeMap::new();
        let mut paths = Vec::new();
        for (stream, base, commits) in read {
            let commits = commits?;
            let newest = commits.last().map_or(base, |c| c.last_revision());
            for c in &commits {
                paths.push(entry_path(&stream, c.revision, "")?);
            }
            reach.insert(stream, (base, newest));
        }
        if last && paths.is_empty() {
            self.outbox.finish(key);
            self.delete_gathered(key.to_owned()).await?;
            return Ok(Vec::new());
        }
        let entries = paths
            .iter()
            .filter_map(|p| parse_entry(p))
            .map(|(stream, revision, attempt)| OutboxEntry {
                stream,
                revision,
                attempt,
                recorded_at: until,
            })
            .collect();
        self.outbox
            .keep(key, paths, until, Some(CoverRead { last, until, reach }));
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str) -> StreamId {
        StreamId::parse(id).unwrap()
    }

    #[test]
    fn an_entry_path_reads_back_into_its_parts() {
        let stream = s("acc-1");
        let path = entry_path(&stream, Revision::new(7), "a1").unwrap();
        assert_eq!(path, "acc-1/00000000000000000007.a1");
        assert_eq!(
            parse_entry(&path),
            Some((stream.clone(), Revision::new(7), "a1".into()))
        );
        let bare = entry_path(&stream, Revision::new(7), "").unwrap();
        assert_eq!(
            parse_entry(&bare),
            Some((stream, Revision::new(7), "".into()))
        );
        assert_eq!(parse_entry("~batch"), None);
        assert_eq!(parse_entry("a/b/c"), None);
    }

    #[test]
    fn a_cover_reads_back_into_its_streams_and_its_until() {
        let streams: BTreeMap<StreamId, Revision> =
            [(s("a"), Revision::new(0)), (s("b.x"), Revision::new(41))].into();
        assert_eq!(parse_cover(&cover_body(&streams)), streams);
        let covers = Covers::new(COVER_LIFETIME);
        let until = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let key = covers.key("p/", until);
        let name = key.strip_prefix("p/outbox/.").unwrap();
        assert_eq!(cover_until(name), Some(until));
        assert!(
            StreamId::parse(&format!("{COVER_MARK}x")).is_err(),
            "no stream id starts like a cover"
        );
    }

    fn entry(stream: &str, revision: u64) -> (String, StreamId, Revision, String) {
        let path = entry_path(&s(stream), Revision::new(revision), "a").unwrap();
        (path, s(stream), Revision::new(revision), "a".into())
    }

    #[test]
    fn records_join_a_usable_cover_and_its_last_done_entry_deletes_it_once_it_is_renewed() {
        let covers = Covers::new(Duration::from_secs(60));
        let one = entry("s", 1);
        assert!(matches!(
            covers.join(&one.0, &one.1, one.2, "a"),
            Joining::Wait
        ));
        let bases = [(s("s"), Revision::ZERO)].into();
        covers
            .written("k1", Instant::now(), &bases, std::slice::from_ref(&one))
            .unwrap();
        let two = entry("s", 2);
        assert!(matches!(
            covers.join(&two.0, &two.1, two.2, "a"),
            Joining::Joined
        ));
        assert_eq!(covers.mine_pending().len(), 2);
        assert!(
            matches!(covers.done(&one.0), Done::Nothing),
            "still current"
        );
        // Renewed: the stream's newest cover is another; the last entry of the old
        // one deletes it.
        covers
            .written(
                "k2",
                Instant::now(),
                &[(s("s"), Revision::new(1))].into(),
                &[],
            )
            .unwrap();
        assert!(matches!(covers.done(&two.0), Done::Delete(k) if k == "k1"));
        assert!(matches!(covers.done(&two.0), Done::Unknown), "done twice");
        let three = entry("s", 3);
        assert!(matches!(
            covers.join(&three.0, &three.1, three.2, "a"),
            Joining::Joined
        ));
        assert_eq!(
            covers.table().joined.get(&three.0).map(String::as_str),
            Some("k2")
        );
    }

    #[test]
    fn a_cover_past_its_margin_takes_no_record_and_is_renewed_only_for_streams_in_use() {
        let covers = Covers::new(Duration::from_millis(100));
        let old = Instant::now() - Duration::from_millis(80);
        covers
            .written(
                "k",
                old,
                &[(s("busy"), Revision::ZERO), (s("idle"), Revision::ZERO)].into(),
                &[],
            )
            .unwrap_err();
        // Written in time, then time passes.
        let started = Instant::now();
        covers
            .written(
                "k",
                started,
                &[(s("busy"), Revision::new(4)), (s("idle"), Revision::ZERO)].into(),
                &[],
            )
            .unwrap();
        let busy = entry("busy", 5);
        assert!(matches!(
            covers.join(&busy.0, &busy.1, busy.2, "a"),
            Joining::Joined
        ));
        std::thread::sleep(Duration::from_millis(75));
        let late = entry("busy", 6);
        assert!(
            matches!(covers.join(&late.0, &late.1, late.2, "a"), Joining::Wait),
            "past 70 % of its lifetime a cover takes no record"
        );
        {
            let mut table = covers.table();
            table.streams.get_mut(&s("idle")).unwrap().used = started - Duration::from_secs(1);
        }
        let (renew, delete) = covers.due();
        assert_eq!(
            renew,
            [(s("busy"), Revision::new(4))].into(),
            "the stream in use, from below its highest recorded revision"
        );
        assert!(delete.is_empty(), "an entry of the cover is not done");
        assert!(matches!(covers.done(&busy.0), Done::Delete(k) if k == "k"));
    }

    #[test]
    fn a_relay_advances_an_expired_cover_it_published_and_deletes_it_after_the_last_read() {
        let covers = Covers::new(COVER_LIFETIME);
        let until = OffsetDateTime::now_utc();
        let paths = vec!["s/00000000000000000003".to_owned()];
        let reach = [(s("s"), (Revision::new(2), Revision::new(3)))].into();
        covers.keep(
            "c",
            paths.clone(),
            until,
            Some(CoverRead {
                last: false,
                until,
                reach,
            }),
        );
        assert!(
            matches!(covers.known("c"), Known::Read { entries, last: false } if entries.len() == 1)
        );
        match covers.done(&paths[0]) {
            Done::Advance { old, bases, .. } => {
                assert_eq!(old, "c");
                assert_eq!(bases, [(s("s"), Revision::new(3))].into());
            }
            _ => panic!("advance"),
        }
        assert!(matches!(covers.known("c"), Known::Finished));
        let reach = [(s("s"), (Revision::new(3), Revision::new(3)))].into();
        covers.keep(
            "d",
            paths.clone(),
            until,
            Some(CoverRead {
                last: true,
                until,
                reach,
            }),
        );
        assert!(matches!(covers.done(&paths[0]), Done::Delete(k) if k == "d"));
    }

    #[test]
    fn a_listed_object_gone_from_a_complete_listing_is_forgotten() {
        let covers = Covers::new(COVER_LIFETIME);
        let now = OffsetDateTime::now_utc();
        covers.keep(
            "read",
            vec!["s/00000000000000000001.a".to_owned()],
            now,
            None,
        );
        covers.forget_unlisted(&HashSet::new());
        assert!(matches!(covers.known("read"), Known::New));
        assert!(matches!(
            covers.done("s/00000000000000000001.a"),
            Done::Unknown
        ));
    }
}
