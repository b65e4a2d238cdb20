//! The compactor: copies streams' commits into segments ([`tally_es::Compact`]) in the
//! background, as they grow, so that a rebuild or a long stream's load reads a handful
//! of objects per stream. Never on the command path: the projector notes each commit it
//! handles ([`Compactor::note`]) and a loop of the projector's process compacts the
//! streams that are due ([`Compactor::round`]).
//!
//! A stream is due once [`COMPACT_AFTER`] revisions are not in its segments, or once it
//! has gone [`QUIET`] with any: a busy stream is copied in runs, a quiet one as soon as
//! it settles (a rebuild shortly after a burst of writes then finds it whole). What the
//! compactor knows is only a hint: after a restart it starts from the segments
//! themselves, and a failed compaction is tried again in the next round.

use futures::stream::{self, StreamExt};
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tally_es::{Compact, Compacted, Revision, StoreError, StreamId};

/// Revisions not in a stream's segments that make it due at once.
pub const COMPACT_AFTER: u64 = 64;

/// How long a stream with revisions not in its segments stays untouched before it is
/// due anyway: long enough that a stream written every few seconds is copied in runs
/// (a compaction costs a read and a write of the stream's head besides a read of each
/// new commit), short enough that a rebuild soon after a burst finds it whole.
pub const QUIET: Duration = Duration::from_secs(10);

/// How many streams one round compacts at once.
const COMPACT_CONCURRENCY: usize = 4;

/// How many streams the compactor keeps track of (the least recently written are
/// forgotten first: their next commit makes them known again).
const TRACKED: usize = 100_000;

/// What the compactor knows of one stream.
#[derive(Clone, Copy, Debug)]
struct Tracked {
    /// The newest revision noted.
    known: Revision,
    /// The last revision its segments hold, as far as the compactor knows (zero until
    /// its first compaction tells).
    covered: Revision,
    /// When `known` last moved (or a compaction of it last failed).
    touched: Instant,
}

impl Tracked {
    fn due(&self, now: Instant, quiet: Duration) -> bool {
        let behind = self.known.get().saturating_sub(self.covered.get());
        behind >= COMPACT_AFTER || (behind > 0 && now.duration_since(self.touched) >= quiet)
    }
}

/// What one round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// Streams compacted.
    pub streams: usize,
    /// Commits copied into segments.
    pub commits: usize,
    /// Segment objects written.
    pub segments: usize,
    /// Streams whose compaction failed (tried again later).
    pub failed: usize,
}

/// Tracks which streams have commits their segments do not hold and compacts them.
pub struct Compactor {
    store: Arc<dyn Compact>,
    tracked: Mutex<LruCache<StreamId, Tracked>>,
    quiet: Duration,
}

impl Compactor {
    pub fn new(store: Arc<dyn Compact>) -> Self {
        Self {
            store,
            tracked: Mutex::new(LruCache::new(NonZeroUsize::new(TRACKED).expect("not zero"))),
            quiet: QUIET,
        }
    }

    /// Wait `quiet` instead of [`QUIET`] before a stream with fewer than
    /// [`COMPACT_AFTER`] revisions to copy is due.
    pub fn with_quiet(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    /// `stream` has a commit whose last event is `revision`.
    pub fn note(&self, stream: &StreamId, revision: Revision) {
        let mut tracked = self.tracked.lock().expect("compactor poisoned");
        let now = Instant::now();
        match tracked.get_mut(stream) {
            Some(t) if revision > t.known => {
                t.known = revision;
                t.touched = now;
            }
            Some(_) => {}
            None => {
                tracked.put(
                    stream.clone(),
                    Tracked {
                        known: revision,
                        covered: Revision::ZERO,
                        touched: now,
                    },
                );
            }
        }
    }

    /// How many streams have revisions their segments do not hold yet (as far as the
    /// compactor knows).
    pub fn behind(&self) -> usize {
        let tracked = self.tracked.lock().expect("compactor poisoned");
        tracked.iter().filter(|(_, t)| t.known > t.covered).count()
    }

    /// The streams due now, with the newest revision noted for each.
    fn due(&self) -> Vec<(StreamId, Revision)> {
        let now = Instant::now();
        let tracked = self.tracked.lock().expect("compactor poisoned");
        tracked
            .iter()
            .filter(|(_, t)| t.due(now, self.quiet))
            .map(|(s, t)| (s.clone(), t.known))
            .collect()
    }

    /// Compact every stream that is due, [`COMPACT_CONCURRENCY`] at a time.
    pub async fn round(&self) -> CompactionReport {
        let due = self.due().into_iter().map(|(s, known)| (s, Some(known)));
        compact_each(&*self.store, due, |stream, outcome| {
            let mut tracked = self.tracked.lock().expect("compactor poisoned");
            let Some(t) = tracked.peek_mut(stream) else {
                return;
            };
            match outcome {
                Ok(done) => {
                    t.covered = t.covered.max(done.covered);
                    t.known = match done.commits {
                        // Nothing to copy where something was noted: the hint was
                        // wrong; the next commit noted raises it again.
                        0 => t.covered,
                        _ => t.known.max(t.covered),
                    };
                }
                Err(e) => {
                    tracing::warn!(%stream, error = %e, "compaction failed; tried again later");
                }
            }
            t.touched = Instant::now();
        })
        .await
    }
}

/// Compact every account stream of `store` through `compact`, [`COMPACT_CONCURRENCY`]
/// at a time, whatever the compactor knows: for streams written before a compactor
/// followed them, or where none runs (under the Lambda runtime: `admin compact` on a
/// schedule). A stream that fails is logged and counted; the others go on.
pub async fn compact_every_stream(
    store: &dyn tally_es::EventStore,
    compact: &dyn Compact,
) -> Result<CompactionReport, tally_es::StoreError> {
    let streams = store.streams().await?;
    let accounts = streams
        .into_iter()
        .filter(|s| tally_domain::AccountId::of_stream(s).is_some())
        .map(|s| (s, None));
    Ok(compact_each(compact, accounts, |stream, outcome| {
        if let Err(e) = outcome {
            tracing::error!(%stream, error = %e, "compaction of this stream failed");
        }
    })
    .await)
}

/// Compact each `(stream, known)` through `compact`, [`COMPACT_CONCURRENCY`] at a
/// time, telling `each` how every one went; the totals.
async fn compact_each(
    compact: &dyn Compact,
    streams: impl Iterator<Item = (StreamId, Option<Revision>)>,
    mut each: impl FnMut(&StreamId, &Result<Compacted, StoreError>),
) -> CompactionReport {
    let mut report = CompactionReport::default();
    let mut compactions = stream::iter(streams)
        .map(|(stream, known)| async move {
            let outcome = compact.compact(&stream, known).await;
            (stream, outcome)
        })
        .buffer_unordered(COMPACT_CONCURRENCY);
    while let Some((stream, outcome)) = compactions.next().await {
        match &outcome {
            Ok(done) => {
                report.streams += 1;
                report.commits += done.commits;
                report.segments += done.segments;
            }
            Err(_) => report.failed += 1,
        }
        each(&stream, &outcome);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Records what it is asked to compact; copies up to what it is told is known.
    #[derive(Default)]
    struct Fake {
        asked: Mutex<Vec<(String, Option<u64>)>>,
        failing: AtomicBool,
    }

    #[async_trait]
    impl Compact for Fake {
        async fn compact(
            &self,
            stream: &StreamId,
            known: Option<Revision>,
        ) -> Result<Compacted, StoreError> {
            self.asked
                .lock()
                .unwrap()
                .push((stream.to_string(), known.map(Revision::get)));
            if self.failing.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable("down".into()));
            }
            Ok(Compacted {
                covered: known.unwrap_or_default(),
                commits: 1,
                segments: 1,
            })
        }
    }

    fn asked(fake: &Fake) -> Vec<(String, Option<u64>)> {
        std::mem::take(&mut *fake.asked.lock().unwrap())
    }

    fn stream(name: &str) -> StreamId {
        StreamId::parse(name).unwrap()
    }

    const SHORT: Duration = Duration::from_millis(100);

    #[tokio::test]
    async fn a_stream_is_due_at_once_past_compact_after_and_once_quiet_otherwise() {
        let fake = Arc::new(Fake::default());
        let compactor = Compactor::new(fake.clone()).with_quiet(SHORT);
        compactor.note(&stream("busy"), Revision::new(COMPACT_AFTER));
        compactor.note(&stream("quiet"), Revision::new(3));
        compactor.note(&stream("quiet"), Revision::new(2));
        assert_eq!(compactor.behind(), 2);

        let report = compactor.round().await;
        assert_eq!(asked(&fake), [("busy".into(), Some(COMPACT_AFTER))]);
        assert_eq!((report.streams, report.failed), (1, 0));
        assert_eq!(compactor.behind(), 1, "the quiet one waits");

        tokio::time::sleep(SHORT).await;
        compactor.round().await;
        assert_eq!(
            asked(&fake),
            [("quiet".into(), Some(3))],
            "the newest noted"
        );
        assert_eq!(compactor.behind(), 0);

        compactor.round().await;
        assert!(asked(&fake).is_empty(), "nothing left to copy");
        compactor.note(&stream("busy"), Revision::new(COMPACT_AFTER + 1));
        compactor.round().await;
        assert!(asked(&fake).is_empty(), "one more revision waits for quiet");
        tokio::time::sleep(SHORT).await;
        compactor.round().await;
        assert_eq!(asked(&fake), [("busy".into(), Some(COMPACT_AFTER + 1))]);
    }

    #[tokio::test]
    async fn a_failed_compaction_is_tried_again_once_quiet_and_a_wrong_hint_is_dropped() {
        let fake = Arc::new(Fake::default());
        let compactor = Compactor::new(fake.clone()).with_quiet(SHORT);
        fake.failing.store(true, Ordering::SeqCst);
        compactor.note(&stream("s"), Revision::new(100));
        let report = compactor.round().await;
        assert_eq!((report.streams, report.failed), (0, 1));
        assert_eq!(asked(&fake).len(), 1);
        fake.failing.store(false, Ordering::SeqCst);
        compactor.round().await;
        assert_eq!(
            asked(&fake).len(),
            1,
            "still behind by 100: tried again at once"
        );
        assert_eq!(compactor.behind(), 0);

        /// Copies nothing: the hint was past what the store has.
        struct Nothing;
        #[async_trait]
        impl Compact for Nothing {
            async fn compact(
                &self,
                _: &StreamId,
                _: Option<Revision>,
            ) -> Result<Compacted, StoreError> {
                Ok(Compacted {
                    covered: Revision::new(5),
                    ..Compacted::default()
                })
            }
        }
        let compactor = Compactor::new(Arc::new(Nothing)).with_quiet(SHORT);
        compactor.note(&stream("s"), Revision::new(1_000));
        compactor.round().await;
        assert_eq!(compactor.behind(), 0, "a hint nothing answers is dropped");
    }
}
