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

use crate::{failed, to_time, S3EventStore};
use bytes::Bytes;
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
    pruned: Option<Instant>,
}

#[derive(Debug)]
struct Batch {
    remaining: HashSet<String>,
    since: Instant,
    /// Read from a listing (a relay's), not written by this process.
    listed: bool,
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
        let remaining: HashSet<String> = entries.into_iter().collect();
        for e in &remaining {
            table.entries.insert(e.clone(), key.to_owned());
        }
        table.open.insert(
            key.to_owned(),
            Batch {
                remaining,
                since: Instant::now(),
                listed,
            },
        );
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
        if !batch.remaining.is_empty() {
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

/// Write what arrives on `queue` in batch objects: whatever is waiting, up to
/// [`MAX_BATCH`] entries, in one PUT, then the next batch. Ends when every store is
/// dropped.
pub(crate) async fn record_in_batches(
    store: S3EventStore,
    mut queue: mpsc::UnboundedReceiver<crate::KeyRequest>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let batches = &store.outbox_batches;
        let key = format!(
            "{}outbox/{BATCH_MARK}{}-{:012}",
            store.prefix,
            batches.process,
            batches.seq.fetch_add(1, Ordering::Relaxed)
        );
        let body = batch
            .iter()
            .map(|(e, _)| e.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let written = store
            .put(&key, Bytes::from(body), "text/plain")
            .await
            .map_err(|e| e.to_string());
        if written.is_ok() {
            batches.open(&key, batch.iter().map(|(e, _)| e.clone()), false);
        }
        for (_, reply) in batch {
            let _ = reply.send(written.clone().map_err(StoreError::Unavailable));
        }
    }
}

impl S3EventStore {
    /// Record `entry` in the next batch object; returns once that object is written.
    pub(crate) async fn record_batched(&self, entry: String) -> Result<(), StoreError> {
        self.through(&self.outbox_records, record_in_batches, entry, "record")
            .await
    }

    /// `entry` is done: nothing, or the delete of its batch (when it was the last) or
    /// of its single-entry key.
    pub(crate) async fn done_batched(&self, entry: String) -> Result<(), StoreError> {
        match self.outbox_batches.done(&entry) {
            Done::Pending => Ok(()),
            Done::Last(key) => self.delete_gathered(key).await,
            Done::Unknown => {
                self.delete_gathered(format!("{}outbox/{entry}", self.prefix))
                    .await
            }
        }
    }

    /// Up to `limit` pending entries: of one listing of `outbox/`, the single-entry
    /// keys and the entries of each batch object not done here (each object read once).
    pub(crate) async fn pending_batched(
        &self,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
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
            let paths = if rest.starts_with(BATCH_MARK) {
                listed.insert(key.to_owned());
                match self.outbox_batches.known(key) {
                    Known::Remaining(paths) => paths,
                    Known::Finished => continue,
                    Known::New if OffsetDateTime::now_utc() - recorded_at < UNREAD_YOUNGER_THAN => {
                        complete = false;
                        continue;
                    }
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
                        self.outbox_batches.open(key, paths.clone(), true);
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
            let paths = if rest.starts_with(BATCH_MARK) {
                match self.outbox_batches.known(&key) {
                    Known::Remaining(paths) => paths,
                    Known::Finished => continue,
                    Known::New => {
                        // Deleted since the listing: every entry of it was done.
                        let Some(body) = self.get_bytes_if_any(&key).await? else {
                            continue;
                        };
                        String::from_utf8_lossy(&body)
                            .lines()
                            .map(str::to_owned)
                            .collect()
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
}
