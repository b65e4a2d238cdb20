//! The outbox in S3, recorded in groups.
//!
//! A command records its entry before its append. In one process, the entries recorded
//! while a batch object is being written wait and go together in the next one:
//! `outbox/~{process}-{seq:012}`, whose body lists them, one
//! `{stream}/{revision:020}.{attempt}` per line. The process keeps, per batch, the
//! entries not done yet; once the last is done, the object is deleted (and deletes
//! done meanwhile go in one DeleteObjects). An entry so costs a share of one PUT and of
//! one delete, where a key of its own cost one of each.
//!
//! A relay lists `outbox/`, reads each batch object once (a batch object never
//! changes) once it is a couple of seconds old, and handles its entries as single ones: once it has done every entry of a
//! batch, it deletes the object. Another process's `done` cannot remove a single entry
//! from an object: until the object goes, a relay that did not do the entry itself may
//! list it again and publish its commit once more, which consumers ignore (delivery is
//! at least once). Single-entry keys, `outbox/{stream}/{revision:020}[.{attempt}]`
//! (what earlier versions wrote), are still listed and deleted.
//!
//! ## Leases
//!
//! With a lease (`S3EventStore::with_outbox_lease`, what the host sets up), a batch
//! object says more: `outbox/={process}-{seq:012}-{takeover_ms}` promises, for each
//! stream it lists, that *every* commit of that stream from the listed revision on that
//! its writer appends within the lease's use window (counted from just before the PUT)
//! is published — by that writer, or else by whoever takes the lease over. So while the
//! window is open, a command of this process on a stream the lease lists records
//! nothing new: its entry joins the lease in memory, and the command's path to the
//! store is its one conditional PUT. Every fifth of a window, the record task closes
//! the leases whose window has closed and renews the streams this process recorded an
//! entry for within the last six windows whose lease would close before its next look
//! (an idle process, none within the last window, renews nothing and lets its leases
//! lapse): one lease listing them all, each at the highest revision recorded, with no
//! entries of its own. So a stream in use never waits for an outbox PUT, and a process pays at
//! most one renewal PUT (and its delete) per fifth of a window.
//!
//! The writer deletes a lease once its window has closed and every entry that joined
//! it was done. Another process's relay leaves a lease alone until `takeover_ms` after
//! its `Last-Modified` (the window, plus the longest an append begun inside it can
//! take, plus a margin for clocks): by then its writer appends nothing more under it,
//! so the relay lists each listed stream's commits from the listed revision on,
//! publishes every one written by the lease's `Last-Modified` plus its takeover time
//! (the commits the lease can have promised; a commit published twice is applied
//! once), and deletes the lease.
//! What this trusts: that an append lands within the store's operation timeout of being
//! sent, or never. (A commit that lands later still reaches the read model through the
//! projector's periodic catch-up from the store, and a rebuild reads it.)

use crate::{failed, to_time, S3EventStore, READ_CONCURRENCY};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tally_es::{outbox_name, OutboxEntry, Revision, StoreError, StreamId};
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// What starts a batch object's name after `outbox/` (never a stream id's first
/// character).
const BATCH_MARK: char = '~';
/// What starts a lease's name (a batch that covers the streams it lists for a while;
/// see the module's documentation). Neither mark is a stream id's character.
const LEASE_MARK: char = '=';
/// How long after a lease's use window another process takes it over, past the
/// longest an append begun inside the window can take (the store's operation timeout):
/// room for the clocks of the writer, the server and the relay to disagree.
pub(crate) const TAKEOVER_MARGIN: Duration = Duration::from_secs(5);
/// Streams this process recorded an entry for within this many lease windows are kept
/// covered by renewals.
const RENEW_WINDOWS: u32 = 6;
/// The most streams one renewal lists (the most recently used).
const MAX_RENEWAL: usize = 10_000;
/// The most entries one batch object lists.
const MAX_BATCH: usize = 1000;
/// How long a batch whose every entry was done is remembered as finished, so that a
/// listing made before its delete landed does not take it up again.
const FINISHED_MEMORY: Duration = Duration::from_secs(60);
/// A batch object another process wrote less than this long ago is not read by
/// `pending`: its writer is publishing its entries, and a relay leaves entries that
/// young alone (its grace is 2 s) — reading every batch a listing catches in flight
/// would cost a GET each.
const UNREAD_YOUNGER_THAN: time::Duration = time::Duration::seconds(2);
/// How long a batch with entries never done (an append whose outcome was never
/// learned: the relay handles those) stays in this process's table.
const FORGET_AFTER: Duration = Duration::from_secs(900);

/// This process's batches: the ones it wrote, and the ones a relay read.
#[derive(Debug)]
pub(crate) struct Batches {
    /// This process's part of a batch key: random, so a restarted process never takes
    /// up an earlier one's names.
    process: String,
    seq: AtomicU64,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    /// Batch key → its entries not done yet.
    open: HashMap<String, Batch>,
    /// Entry path → the batch key that holds it.
    entries: HashMap<String, String>,
    /// Batches whose every entry was done, with when.
    finished: HashMap<String, Instant>,
    /// Stream → this process's lease that covers it while its window is open.
    leases: HashMap<String, Lease>,
    /// Stream → when this process last recorded an entry for it, and the highest
    /// revision it recorded (what renewals keep covered).
    touched: HashMap<String, (Instant, Revision)>,
    pruned: Option<Instant>,
}

/// One stream's place in a lease of this process.
#[derive(Debug)]
struct Lease {
    /// The lease object's key.
    key: String,
    /// The lease covers the stream's commits from this revision on.
    from: Revision,
    /// Its use window closes then.
    until: Instant,
}

#[derive(Debug)]
struct Batch {
    remaining: HashSet<String>,
    since: Instant,
    /// Read from a listing (a relay's), not written by this process.
    listed: bool,
    /// A lease of this process whose use window is open: entries may still join it,
    /// so it is not finished when its remaining entries are done.
    open_until: Option<Instant>,
}

/// What `done` came to.
pub(crate) enum Done {
    /// The entry's batch still has entries pending.
    Pending,
    /// It was the batch's last: delete this key.
    Last(String),
    /// Not an entry of a batch this process knows: a single-entry key, if any.
    Unknown,
}

/// What a listing finds of a batch object.
enum Known {
    Remaining(Vec<String>),
    Finished,
    New,
}

impl Default for Batches {
    fn default() -> Self {
        Self {
            process: format!("{:016x}", fastrand::u64(..)),
            seq: AtomicU64::new(0),
            table: Mutex::default(),
        }
    }
}

impl Batches {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("outbox table poisoned")
    }

    /// Keep `entries` as the pending entries of batch `key`.
    fn open(&self, key: &str, entries: impl IntoIterator<Item = String>, listed: bool) {
        let mut table = self.table();
        table.prune();
        table.keep(key, entries, listed, None);
    }

    /// Keep `entries` as the pending entries of lease `key`, whose use window closes at
    /// `until`: until then, the streams its `lines` name (the entries' and a renewal's)
    /// are covered by it (see [`Batches::join_lease`]).
    fn open_lease(&self, key: &str, lines: &[String], entries: Vec<String>, until: Instant) {
        let mut table = self.table();
        table.prune();
        for line in lines {
            let Some((stream, revision, _)) = parse_entry(line) else {
                continue;
            };
            let from = match table.leases.get(stream.as_str()) {
                Some(lease) if lease.key == key => lease.from.min(revision),
                _ => revision,
            };
            table.leases.insert(
                stream.as_str().to_owned(),
                Lease {
                    key: key.to_owned(),
                    from,
                    until,
                },
            );
        }
        table.keep(key, entries, false, Some(until));
    }

    /// Note that this process records an entry for `entry`'s stream.
    fn touch(&self, entry: &str) {
        if let Some((stream, revision, _)) = parse_entry(entry) {
            touch(&mut self.table(), &stream, revision);
        }
    }

    /// The streams to renew now, if this process recorded an entry within `active`:
    /// the ones it recorded an entry for within `horizon` whose lease (if any) closes
    /// before `lapse`, each with the highest
    /// revision recorded (no later entry of this process is below it but one that
    /// cannot land: its revision is taken) — the most recently used first, at most
    /// [`MAX_RENEWAL`]. Forgets streams not used within `horizon`.
    fn to_renew(
        &self,
        horizon: Duration,
        active: Duration,
        lapse: Instant,
    ) -> Vec<(StreamId, Revision)> {
        let mut table = self.table();
        let now = Instant::now();
        table
            .touched
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < horizon);
        if !table
            .touched
            .values()
            .any(|(at, _)| now.saturating_duration_since(*at) < active)
        {
            // Idle: let the leases lapse, so that a rebuild after the traffic finds no
            // stream named by one.
            return Vec::new();
        }
        let table = &*table;
        let mut renew: Vec<(Instant, &String, Revision)> = table
            .touched
            .iter()
            .filter(|(stream, _)| table.leases.get(*stream).is_none_or(|l| l.until < lapse))
            .map(|(stream, (at, revision))| (*at, stream, *revision))
            .collect();
        renew.sort_by_key(|r| std::cmp::Reverse(r.0));
        renew
            .into_iter()
            .take(MAX_RENEWAL)
            .filter_map(|(_, stream, revision)| Some((StreamId::parse(stream).ok()?, revision)))
            .collect()
    }

    /// The leases of this process whose window has closed by `now`: closed, and the
    /// keys of those with nothing pending (to delete; the others go with their last
    /// `done`).
    fn close_leases(&self, now: Instant) -> Vec<String> {
        let closing: Vec<String> = self
            .table()
            .open
            .iter()
            .filter(|(_, b)| b.open_until.is_some_and(|until| until <= now))
            .map(|(k, _)| k.clone())
            .collect();
        closing
            .iter()
            .filter_map(|key| self.close_lease(key))
            .collect()
    }

    /// If a lease of this process covers `entry`'s stream at its revision and its
    /// window is still open, `entry` joins it (nothing to write): true.
    fn join_lease(&self, entry: &str) -> bool {
        let Some((stream, revision, _)) = parse_entry(entry) else {
            return false;
        };
        let now = Instant::now();
        let mut table = self.table();
        let key = match table.leases.get(stream.as_str()) {
            Some(lease) if lease.until > now && lease.from <= revision => lease.key.clone(),
            _ => return false,
        };
        let Some(batch) = table.open.get_mut(&key) else {
            return false;
        };
        if batch.open_until.is_none_or(|until| until <= now) {
            return false;
        }
        batch.remaining.insert(entry.to_owned());
        table.entries.insert(entry.to_owned(), key);
        touch(&mut table, &stream, revision);
        true
    }

    /// Close lease `key`'s use window: nothing joins it any more. `Some(key)` when
    /// every entry of it was done (delete it), `None` when some are still pending (the
    /// last one's `done` deletes it).
    fn close_lease(&self, key: &str) -> Option<String> {
        let mut table = self.table();
        table.leases.retain(|_, lease| lease.key != key);
        let batch = table.open.get_mut(key)?;
        batch.open_until = None;
        if !batch.remaining.is_empty() {
            return None;
        }
        table.open.remove(key);
        table.finished.insert(key.to_owned(), Instant::now());
        Some(key.to_owned())
    }

    /// Batch `key` is not finished after all: its delete failed, so the object is still
    /// there, and the next listing is to take it up again as new.
    fn unfinish(&self, key: &str) {
        self.table().finished.remove(key);
    }

    /// Batch `key` (read from a listing) had nothing left to do.
    fn finish(&self, key: &str) {
        let mut table = self.table();
        table.forget(key);
        table.finished.insert(key.to_owned(), Instant::now());
    }

    fn done(&self, entry: &str) -> Done {
        let mut table = self.table();
        let Some(key) = table.entries.remove(entry) else {
            return Done::Unknown;
        };
        let Some(batch) = table.open.get_mut(&key) else {
            return Done::Unknown;
        };
        batch.remaining.remove(entry);
        if !batch.remaining.is_empty() || batch.open_until.is_some() {
            return Done::Pending;
        }
        table.open.remove(&key);
        table.finished.insert(key.clone(), Instant::now());
        Done::Last(key)
    }

    fn known(&self, key: &str) -> Known {
        let table = self.table();
        if table.finished.contains_key(key) {
            return Known::Finished;
        }
        match table.open.get(key) {
            Some(batch) => {
                let mut remaining: Vec<String> = batch.remaining.iter().cloned().collect();
                remaining.sort();
                Known::Remaining(remaining)
            }
            None => Known::New,
        }
    }

    /// Forget the batches read from an earlier listing that a complete listing no
    /// longer shows (deleted by their writer or another relay).
    fn forget_unlisted(&self, listed: &HashSet<String>) {
        let mut table = self.table();
        let gone: Vec<String> = table
            .open
            .iter()
            .filter(|(k, b)| b.listed && !listed.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            table.forget(&key);
        }
    }
}

impl Table {
    /// Keep `entries` as the pending entries of batch `key`.
    fn keep(
        &mut self,
        key: &str,
        entries: impl IntoIterator<Item = String>,
        listed: bool,
        open_until: Option<Instant>,
    ) {
        let remaining: HashSet<String> = entries.into_iter().collect();
        for e in &remaining {
            self.entries.insert(e.clone(), key.to_owned());
        }
        self.open.insert(
            key.to_owned(),
            Batch {
                remaining,
                since: Instant::now(),
                listed,
                open_until,
            },
        );
    }

    fn forget(&mut self, key: &str) {
        if let Some(batch) = self.open.remove(key) {
            for e in batch.remaining {
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
        let now = Instant::now();
        self.leases.retain(|_, lease| lease.until > now);
        let stale: Vec<String> = self
            .open
            .iter()
            .filter(|(_, b)| b.since.elapsed() > FORGET_AFTER)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.forget(&key);
        }
    }
}

fn touch(table: &mut Table, stream: &StreamId, revision: Revision) {
    let now = Instant::now();
    let last = table
        .touched
        .entry(stream.as_str().to_owned())
        .or_insert((now, revision));
    *last = (now, last.1.max(revision));
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

/// A lease's takeover delay from its key (`={process}-{seq}-{takeover_ms}`), if `rest`
/// (the key after `outbox/`) names one.
fn takeover_of(rest: &str) -> Option<time::Duration> {
    let ms = rest.strip_prefix(LEASE_MARK)?.rsplit_once('-')?.1;
    Some(time::Duration::milliseconds(ms.parse().ok()?))
}

/// Write what arrives on `queue` in batch objects: whatever is waiting, up to
/// [`MAX_BATCH`] entries, in one PUT, then the next batch. With leases, also every fifth
/// of a window: close the leases whose window has closed (deleting the finished ones),
/// and renew the streams in use whose lease closes before the next look — one lease
/// listing them all, with the entries waiting, if any. Ends when every store is
/// dropped.
pub(crate) async fn record_in_batches(
    store: S3EventStore,
    mut queue: mpsc::UnboundedReceiver<crate::KeyRequest>,
) {
    let tick = store
        .outbox_lease
        .map_or(Duration::from_secs(3600), |l| l.window / 5);
    let mut looks = tokio::time::interval(tick);
    looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        let mut renew = Vec::new();
        tokio::select! {
            first = queue.recv() => match first {
                Some(first) => batch.push(first),
                None => break,
            },
            _ = looks.tick(), if store.outbox_lease.is_some() => {
                let window = store.outbox_lease.map_or(Duration::ZERO, |l| l.window);
                let now = Instant::now();
                for key in store.outbox_batches.close_leases(now) {
                    let store = store.clone();
                    tokio::spawn(async move {
                        if let Err(e) = store.delete_finished(key.clone()).await {
                            tracing::warn!(%key, error = %e, "a finished outbox lease stays until a relay takes it over");
                        }
                    });
                }
                renew = store
                    .outbox_batches
                    .to_renew(window * RENEW_WINDOWS, window, now + tick * 2);
                if renew.is_empty() {
                    continue;
                }
            }
        }
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let entries: Vec<String> = batch.iter().map(|(e, _)| e.clone()).collect();
        let attempt = format!("renewal-{:016x}", fastrand::u64(..));
        let mut lines = entries.clone();
        lines.extend(
            renew
                .iter()
                .filter_map(|(stream, revision)| entry_path(stream, *revision, &attempt).ok()),
        );
        let written = write_batch(&store, &lines, entries).await;
        if let Err(e) = &written {
            if batch.is_empty() {
                tracing::debug!(error = %e, "outbox leases not renewed; the next commands write new ones");
            }
        }
        for (_, reply) in batch {
            let _ = reply.send(written.clone().map_err(StoreError::Unavailable));
        }
    }
}

/// Write one batch object listing `lines`, and keep `entries` (of them) as its pending
/// entries; with a lease, the object is a lease (closed by `record_in_batches`).
async fn write_batch(
    store: &S3EventStore,
    lines: &[String],
    entries: Vec<String>,
) -> Result<(), String> {
    let batches = &store.outbox_batches;
    let seq = batches.seq.fetch_add(1, Ordering::Relaxed);
    let key = match store.outbox_lease {
        Some(lease) => format!(
            "{}outbox/{LEASE_MARK}{}-{seq:012}-{}",
            store.prefix,
            batches.process,
            lease.takeover.as_millis()
        ),
        None => format!(
            "{}outbox/{BATCH_MARK}{}-{seq:012}",
            store.prefix, batches.process
        ),
    };
    // A lease's window counts from before the PUT is sent: the object's Last-Modified,
    // from which others count its takeover, is later.
    let sent = Instant::now();
    store
        .put(&key, Bytes::from(lines.join("\n")), "text/plain")
        .await
        .map_err(|e| e.to_string())?;
    match store.outbox_lease {
        Some(lease) => batches.open_lease(&key, lines, entries, sent + lease.window),
        None => batches.open(&key, entries, false),
    }
    Ok(())
}

impl S3EventStore {
    /// Record `entry`: nothing to write if a lease of this process covers it (it joins
    /// the lease), else in the next batch object; returns once that object is written.
    pub(crate) async fn record_batched(&self, entry: String) -> Result<(), StoreError> {
        if self.outbox_lease.is_some() {
            if self.outbox_batches.join_lease(&entry) {
                return Ok(());
            }
            self.outbox_batches.touch(&entry);
        }
        self.through(&self.outbox_records, record_in_batches, entry, "record")
            .await
    }

    /// `entry` is done: nothing, or the delete of its batch (when it was the last) or
    /// of its single-entry key.
    pub(crate) async fn done_batched(&self, entry: String) -> Result<(), StoreError> {
        match self.outbox_batches.done(&entry) {
            Done::Pending => Ok(()),
            Done::Last(key) => self.delete_finished(key).await,
            Done::Unknown => {
                self.delete_gathered(format!("{}outbox/{entry}", self.prefix))
                    .await
            }
        }
    }

    /// Delete batch `key`, finished: every entry of it done. If the delete fails, the
    /// batch is not remembered as finished, so that the next listing takes the object
    /// up again (a relay then finds its entries' commits published, or publishes them
    /// again) rather than passing over it for good.
    async fn delete_finished(&self, key: String) -> Result<(), StoreError> {
        let deleted = self.delete_gathered(key.clone()).await;
        if deleted.is_err() {
            self.outbox_batches.unfinish(&key);
        }
        deleted
    }

    /// Up to `limit` pending entries: of one listing of `outbox/`, the single-entry
    /// keys and the entries of each batch object not done here (each object read once).
    pub(crate) async fn pending_batched(
        &self,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        let prefix = format!("{}outbox/", self.prefix);
        let page = self
            .outbox_page(i32::try_from(limit.clamp(1, 1000)).unwrap_or(1000))
            .await?;
        let mut entries = Vec::new();
        let mut listed = HashSet::new();
        let mut complete = !page.is_truncated().unwrap_or(false);
        for object in page.contents() {
            if entries.len() >= limit {
                complete = false;
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
            // A lease is due to others at its takeover time, a batch once it is a
            // couple of seconds old (its writer is publishing it meanwhile).
            let lease = takeover_of(rest);
            let due_after = match lease {
                Some(takeover) => Some(takeover),
                None if rest.starts_with(BATCH_MARK) => Some(UNREAD_YOUNGER_THAN),
                None => None,
            };
            let paths = if let Some(due_after) = due_after {
                listed.insert(key.to_owned());
                match self.outbox_batches.known(key) {
                    Known::Remaining(paths) => paths,
                    Known::Finished => continue,
                    Known::New if OffsetDateTime::now_utc() - recorded_at < due_after => {
                        // Its writer may still add to it or publish it: not ours yet.
                        complete = false;
                        continue;
                    }
                    Known::New => {
                        let paths = if let Some(takeover) = lease {
                            self.take_over(key, recorded_at + takeover).await?
                        } else {
                            self.batch_paths(key).await?.inspect(|paths| {
                                self.outbox_batches.open(key, paths.clone(), true);
                            })
                        };
                        // `None`: gone since the listing, or nothing to publish.
                        let Some(paths) = paths else { continue };
                        paths
                    }
                }
            } else {
                vec![rest.to_owned()]
            };
            for path in paths {
                if let Some((stream, revision, attempt)) = parse_entry(&path) {
                    entries.push(OutboxEntry {
                        stream,
                        revision,
                        attempt,
                        recorded_at,
                    });
                }
            }
        }
        if complete {
            self.outbox_batches.forget_unlisted(&listed);
        }
        entries.truncate(limit);
        Ok(entries)
    }
}

impl S3EventStore {
    /// Whether the outbox holds no object at all — no single entry, batch object or
    /// lease, however young (one LIST of one key): what a harness waits for before it
    /// checks that every commit reached the stream.
    pub async fn outbox_is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.outbox_page(1).await?.contents().is_empty())
    }

    /// The first page of a listing of `outbox/`, up to `max_keys` keys.
    async fn outbox_page(
        &self,
        max_keys: i32,
    ) -> Result<aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output, StoreError> {
        let prefix = format!("{}outbox/", self.prefix);
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .max_keys(max_keys)
            .send()
            .await
            .map_err(|e| failed(format_args!("LIST {prefix}"), &e))
    }

    /// The entries a batch object or a lease lists (its body's lines that name one),
    /// or `None` if it is gone.
    async fn batch_paths(&self, key: &str) -> Result<Option<Vec<String>>, StoreError> {
        let Some(body) = self.get_bytes_if_any(key).await? else {
            return Ok(None);
        };
        Ok(Some(
            String::from_utf8_lossy(&body)
                .lines()
                .filter(|l| parse_entry(l).is_some())
                .map(str::to_owned)
                .collect(),
        ))
    }

    /// Take over another process's lease past its takeover time: an entry for every
    /// commit of each stream it lists from the listed revision on that was written by
    /// `until` (the lease's Last-Modified plus its takeover time), named by the listed
    /// attempt, so that two leases never name one entry; kept as the lease's pending
    /// entries. `None` if there is nothing to publish (the lease is deleted) or the
    /// lease is gone.
    ///
    /// Why `until` bounds it: an entry joins a lease only within its use window,
    /// counted from before the lease's PUT, and its append lands within the operation
    /// timeout or never — so every commit the lease promises was written, by the
    /// server's clock (the one that stamped the lease), before the lease's
    /// Last-Modified plus its window plus that timeout, which its takeover time
    /// exceeds. A commit written later joined another lease or recorded its own entry.
    /// Without the bound, a lease taken over minutes late (a relay behind after a
    /// broker outage) would republish every commit of a hot stream since, for every
    /// lease that lists it. The commits are found by listing their keys (with when each
    /// was written), not read: the relay reads each one it publishes.
    async fn take_over(
        &self,
        key: &str,
        until: OffsetDateTime,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let Some(listed) = self.batch_paths(key).await? else {
            return Ok(None);
        };
        let mut from: HashMap<StreamId, (Revision, String)> = HashMap::new();
        for (stream, revision, attempt) in listed.iter().filter_map(|p| parse_entry(p)) {
            let first = from.entry(stream).or_insert((revision, attempt.clone()));
            if revision < first.0 {
                *first = (revision, attempt);
            }
        }
        // A listing's times are whole seconds (rounded down): a commit listed in the
        // second after `until` may have been written by it.
        let until = until + time::Duration::SECOND;
        // A renewal may list many streams: list them `READ_CONCURRENCY` at a time.
        let found: Vec<Vec<String>> = stream::iter(from)
            .map(|(stream, (revision, attempt))| async move {
                let start_after = (revision.get() > 1)
                    .then(|| self.commit_key(&stream, Revision::new(revision.get() - 1)));
                let mut paths = Vec::new();
                for (commit, written) in
                    self.list(&self.stream_prefix(&stream), start_after).await?
                {
                    if written.is_some_and(|at| at > until) {
                        continue;
                    }
                    let revision = self.revision_of(&stream, &commit)?;
                    paths.push(entry_path(&stream, revision, &attempt)?);
                }
                Ok::<_, StoreError>(paths)
            })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let streams = found.len();
        let mut paths: Vec<String> = found.into_iter().flatten().collect();
        tracing::info!(%key, streams, commits = paths.len(), "took over an outbox lease past its takeover time");
        if paths.is_empty() {
            self.outbox_batches.finish(key);
            self.delete_finished(key.to_owned()).await?;
            return Ok(None);
        }
        paths.sort();
        self.outbox_batches.open(key, paths.clone(), true);
        Ok(Some(paths))
    }

    /// Every stream with an outbox entry not done yet, read completely — every page of
    /// the listing, and every batch object however young (`pending` leaves those to the
    /// writer that is publishing them): what a rebuild through a pack must read from
    /// the store. An entry this process knows done is left out; one another process did
    /// may still be in (its batch object not deleted yet), which only costs a read.
    pub(crate) async fn unpublished_streams(
        &self,
    ) -> Result<std::collections::BTreeSet<StreamId>, StoreError> {
        let prefix = format!("{}outbox/", self.prefix);
        let mut streams = std::collections::BTreeSet::new();
        for (key, _) in self.list(&prefix, None).await? {
            let Some(rest) = key.strip_prefix(&prefix) else {
                continue;
            };
            let paths = if rest.starts_with([BATCH_MARK, LEASE_MARK]) {
                // A lease names the streams it covers, as a batch does.
                match self.outbox_batches.known(&key) {
                    Known::Remaining(paths) => paths,
                    Known::Finished => continue,
                    Known::New => {
                        // `None`: deleted since the listing, every entry of it done.
                        let Some(paths) = self.batch_paths(&key).await? else {
                            continue;
                        };
                        paths
                    }
                }
            } else {
                vec![rest.to_owned()]
            };
            streams.extend(
                paths
                    .iter()
                    .filter_map(|p| parse_entry(p))
                    .map(|(stream, _, _)| stream),
            );
        }
        Ok(streams)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_path_reads_back_into_its_parts() {
        let stream = StreamId::parse("acc-1").unwrap();
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
    fn a_batch_is_finished_by_its_last_entry_only() {
        let batches = Batches::default();
        batches.open("k", ["s/1.a".to_owned(), "s/2.b".to_owned()], false);
        assert!(matches!(batches.done("s/1.a"), Done::Pending));
        assert!(matches!(batches.done("s/1.a"), Done::Unknown), "done twice");
        assert!(matches!(batches.known("k"), Known::Remaining(r) if r == ["s/2.b"]));
        assert!(matches!(batches.done("s/2.b"), Done::Last(k) if k == "k"));
        assert!(matches!(batches.known("k"), Known::Finished));
        assert!(matches!(batches.done("s/9.x"), Done::Unknown));
    }

    #[test]
    fn a_listed_batch_gone_from_a_complete_listing_is_forgotten() {
        let batches = Batches::default();
        batches.open("read", ["s/1.a".to_owned()], true);
        batches.open("mine", ["s/2.b".to_owned()], false);
        batches.forget_unlisted(&HashSet::new());
        assert!(matches!(batches.known("read"), Known::New));
        assert!(matches!(batches.known("mine"), Known::Remaining(_)));
        assert!(matches!(batches.done("s/1.a"), Done::Unknown));
    }

    #[test]
    fn an_entry_joins_an_open_lease_of_its_stream_from_the_leased_revision_on() {
        let batches = Batches::default();
        let until = Instant::now() + Duration::from_secs(60);
        let first = vec!["s/00000000000000000005.a".to_owned()];
        batches.open_lease("L", &first, first.clone(), until);
        assert!(batches.join_lease("s/00000000000000000006.b"));
        assert!(
            !batches.join_lease("s/00000000000000000004.c"),
            "before the lease's revision"
        );
        assert!(
            !batches.join_lease("t/00000000000000000006.d"),
            "another stream"
        );
        assert!(matches!(batches.known("L"), Known::Remaining(r) if r.len() == 2));
        // Every entry done while the window is open: the lease stays (others may join).
        assert!(matches!(
            batches.done("s/00000000000000000005.a"),
            Done::Pending
        ));
        assert!(matches!(
            batches.done("s/00000000000000000006.b"),
            Done::Pending
        ));
        assert_eq!(
            batches.close_lease("L").as_deref(),
            Some("L"),
            "closed with nothing left: delete it"
        );
        assert!(matches!(batches.known("L"), Known::Finished));
        assert!(
            !batches.join_lease("s/00000000000000000007.e"),
            "a closed lease takes no one"
        );
    }

    #[test]
    fn a_lease_closed_with_entries_pending_is_finished_by_its_last_done() {
        let batches = Batches::default();
        let until = Instant::now() + Duration::from_secs(60);
        let first = vec!["s/00000000000000000001.a".to_owned()];
        batches.open_lease("L", &first, first.clone(), until);
        assert!(batches.join_lease("s/00000000000000000002.b"));
        assert!(matches!(
            batches.done("s/00000000000000000001.a"),
            Done::Pending
        ));
        assert_eq!(batches.close_lease("L"), None);
        assert!(matches!(batches.done("s/00000000000000000002.b"), Done::Last(k) if k == "L"));
    }

    #[test]
    fn a_lease_past_its_window_takes_no_one_even_before_it_is_closed() {
        let batches = Batches::default();
        let first = vec!["s/00000000000000000001.a".to_owned()];
        batches.open_lease("L", &first, first.clone(), Instant::now());
        assert!(!batches.join_lease("s/00000000000000000002.b"));
    }

    #[test]
    fn streams_in_use_are_renewed_before_their_lease_closes_and_a_renewal_covers_them() {
        let batches = Batches::default();
        let until = Instant::now() + Duration::from_secs(60);
        let lines = vec![
            "s/00000000000000000003.a".to_owned(),
            "t/00000000000000000001.b".to_owned(),
        ];
        for line in &lines {
            batches.touch(line);
        }
        batches.open_lease("L", &lines, lines.clone(), until);
        assert!(batches.join_lease("s/00000000000000000004.c"));
        assert!(batches.join_lease("s/00000000000000000005.d"));
        let hour = Duration::from_secs(3600);
        assert!(
            batches
                .to_renew(hour, hour, Instant::now() + Duration::from_secs(1))
                .is_empty(),
            "their lease is open past the next look"
        );
        let mut renew = batches.to_renew(hour, hour, until + Duration::from_secs(1));
        renew.sort();
        assert_eq!(
            renew,
            vec![
                (StreamId::parse("s").unwrap(), Revision::new(5)),
                (StreamId::parse("t").unwrap(), Revision::new(1))
            ],
            "each at the highest revision recorded"
        );
        // The renewal lists them and holds no entry: it is finished once closed.
        let renewal = vec!["s/00000000000000000005.renewal-1".to_owned()];
        batches.open_lease("R", &renewal, Vec::new(), until + Duration::from_secs(30));
        assert!(
            batches.join_lease("s/00000000000000000006.e"),
            "s now joins the renewal"
        );
        assert!(
            matches!(batches.known("R"), Known::Remaining(r) if r == ["s/00000000000000000006.e"])
        );
        assert!(
            !batches.join_lease("s/00000000000000000004.f"),
            "below the renewal's revision"
        );
        assert_eq!(
            batches.to_renew(hour, hour, until + Duration::from_secs(1)),
            vec![(StreamId::parse("t").unwrap(), Revision::new(1))],
            "a stream whose lease stays open is not renewed again"
        );
        assert!(matches!(
            batches.done("s/00000000000000000006.e"),
            Done::Pending
        ));
        assert_eq!(
            batches.close_leases(until + Duration::from_secs(31)),
            vec!["R".to_owned()],
            "R finished; L still has entries pending"
        );
        assert!(
            batches
                .to_renew(Duration::ZERO, hour, until + Duration::from_secs(1))
                .is_empty(),
            "streams not used within the horizon are forgotten"
        );
    }

    #[test]
    fn an_idle_process_renews_nothing() {
        let batches = Batches::default();
        batches.touch("s/00000000000000000003.a");
        let (hour, later) = (
            Duration::from_secs(3600),
            Instant::now() + Duration::from_secs(60),
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            batches
                .to_renew(hour, Duration::from_millis(10), later)
                .is_empty(),
            "nothing recorded within the last window: the leases lapse"
        );
        assert_eq!(batches.to_renew(hour, hour, later).len(), 1);
    }

    #[test]
    fn a_lease_key_carries_its_takeover_time() {
        assert_eq!(
            takeover_of("=0123abcd-000000000007-20000"),
            Some(time::Duration::seconds(20))
        );
        assert_eq!(takeover_of("~0123abcd-000000000007"), None);
        assert_eq!(takeover_of("=nonsense"), None);
    }
}
