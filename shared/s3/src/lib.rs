//! `tally-s3`: the event store in an S3 bucket (AWS S3, MinIO, or any server that
//! implements conditional writes).
//!
//! Layout under an optional key prefix:
//!
//! * `streams/{stream}/{revision:020}.json` — one object per commit, written with
//!   `If-None-Match: *`: the server creates it only if the key is free, so of two writers
//!   that loaded the same revision exactly one wins; the other gets 412 (or 409 while
//!   the first write is in flight), which becomes [`AppendError::Conflict`].
//! * `outbox/~{process}-{seq}` — the outbox (see `tally_es::Outbox`): the entries a
//!   process recorded together, one object per group; with a lease,
//!   `outbox/={process}-{seq}-{takeover_ms}`: such a group that also covers every
//!   commit its writer appends to the streams it lists for a few seconds (see the
//!   `outbox` module).
//!
//! Reads list a stream's keys from a start-after cursor and fetch the commits
//! concurrently. Requests go through `aws-sdk-s3`, which sends them with the pooled
//! `reqwest` client the gateway's proxy also uses (HTTP/1.1 keep-alive; HTTPS through
//! rustls on ring), so every binary carries one HTTP stack. The SDK retries what is
//! transient (no answer, a 5xx, a throttling code; and a 429) twice, with exponential
//! backoff and jitter; every call has connect, attempt and operation timeouts.
//! [`S3EventStore::verify_conditional_writes`] proves at start-up that the server refuses
//! a second conditional create of one key; a store that ignores the header would
//! silently lose updates, so Tally refuses to start on it.

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::interceptors::InterceptorContext;
use aws_sdk_s3::config::retry::{ClassifyRetry, RetryAction, RetryConfig};
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tally_es::{
    check_contiguous, error_chain, AppendError, EventStore, Outbox, OutboxEntry, Revision,
    Snapshot, SnapshotStore, StoreError, StoredCommit, StreamId,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

mod http;
mod outbox;
mod packs;
mod segments;

pub use tally_es::segments::SEGMENT_COMMITS;

/// How many commit objects a read fetches at once.
pub(crate) const READ_CONCURRENCY: usize = 16;
/// How many new commits `read_after` fetches one by one, by key, before it lists the
/// rest.
const FOLLOW_BY_GET: usize = 3;
/// How far before a revision a read looks for the commit holding it, before it lists
/// the whole stream (a commit holds one event or a few).
const LOOK_BACK: u64 = 64;
/// Connecting to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One attempt of a request, its body included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// A whole call, retries included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the store is.
#[derive(Clone, Debug)]
pub struct S3Config {
    /// A custom endpoint (MinIO, a test server): `http://127.0.0.1:9000`. `None` for AWS.
    pub endpoint: Option<String>,
    pub bucket: String,
    /// A key prefix, e.g. `tally/`; empty for none.
    pub prefix: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl S3Config {
    /// From the environment: `TALLY_S3_ENDPOINT`, `TALLY_S3_BUCKET`, `TALLY_S3_PREFIX`,
    /// `AWS_REGION` (default `us-east-1`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Ok(Self {
            endpoint: var("TALLY_S3_ENDPOINT"),
            bucket: var("TALLY_S3_BUCKET").ok_or("TALLY_S3_BUCKET is not set")?,
            prefix: var("TALLY_S3_PREFIX").unwrap_or_default(),
            region: var("AWS_REGION").unwrap_or_else(|| "us-east-1".into()),
            access_key_id: var("AWS_ACCESS_KEY_ID").ok_or("AWS_ACCESS_KEY_ID is not set")?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")
                .ok_or("AWS_SECRET_ACCESS_KEY is not set")?,
            session_token: var("AWS_SESSION_TOKEN"),
        })
    }
}

/// The S3 event store.
#[derive(Clone, Debug)]
pub struct S3EventStore {
    client: Client,
    bucket: String,
    prefix: String,
    /// Outbox entries to delete, gathered into multi-object deletes (started on first
    /// use, inside the runtime).
    outbox_deletes: Arc<OnceLock<KeyQueue>>,
    /// Outbox entries to record, gathered into batch objects (started on first use).
    outbox_records: Arc<OnceLock<KeyQueue>>,
    /// The batch objects this process wrote or read, and their entries not done.
    outbox_batches: Arc<outbox::Batches>,
    /// How many commits a sealed segment holds (see the `segments` module).
    segment_commits: usize,
    /// Outbox batches are leases (see the `outbox` module); `None`: plain batches.
    outbox_lease: Option<LeaseTimes>,
}

/// An outbox lease's use window, and when after its write another process takes it
/// over.
#[derive(Clone, Copy, Debug)]
struct LeaseTimes {
    window: Duration,
    takeover: Duration,
}

/// A key (to delete, or an outbox entry to record) and where its outcome goes.
type KeyRequest = (String, oneshot::Sender<Result<(), StoreError>>);
type KeyQueue = mpsc::UnboundedSender<KeyRequest>;

/// The most keys one DeleteObjects request may carry.
const MAX_DELETE_BATCH: usize = 1000;
/// How long a delete waits for others to go with it: outbox objects are deleted once
/// published, off the command's path, and a few hundred milliseconds more of an
/// object's life cost nothing, where a request each costs one.
const DELETE_LINGER: Duration = Duration::from_millis(500);

/// The HTTP status of a failed call, if the server answered.
fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// Why `what` (`PUT key`) failed: the status and S3's error code and message if the
/// server answered, else why there was no answer.
fn failed<E>(what: std::fmt::Arguments<'_>, e: &SdkError<E, HttpResponse>) -> StoreError
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let why = match (status(e), e.code(), e.message()) {
        (Some(status), Some(code), Some(message)) => {
            format!("HTTP {status}: {code}: {message}")
        }
        (Some(status), Some(code), None) => format!("HTTP {status}: {code}"),
        (Some(status), None, _) => format!("HTTP {status}"),
        (None, ..) => error_chain(e),
    };
    StoreError::Unavailable(format!("{what}: {why}"))
}

/// S3 itself throttles with 503 SlowDown, which the SDK retries; a 429 from a proxy or
/// another S3 server is retried too.
#[derive(Debug)]
struct TooManyRequests;

impl ClassifyRetry for TooManyRequests {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        match ctx.response().map(|r| r.status().as_u16()) {
            Some(429) => RetryAction::throttling_error(),
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "429 Too Many Requests"
    }
}

impl S3EventStore {
    /// A store over `config`. Does not touch the network; fails only on an endpoint
    /// that is not an `http(s)://` URL.
    pub fn new(config: &S3Config) -> Result<Self, String> {
        let credentials = Credentials::new(
            &config.access_key_id,
            &config.secret_access_key,
            config.session_token.clone(),
            None,
            "tally-environment",
        );
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http::client(CONNECT_TIMEOUT)?)
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(true)
            // Checksums only where S3 requires one (DeleteObjects): a commit is a few
            // hundred bytes sent once over TCP, and its key, not its checksum, is what
            // makes the write safe.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // Bodies are small and whole; the attempt timeout bounds a slow answer.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(Duration::from_millis(20))
                    .with_max_backoff(Duration::from_secs(1)),
            )
            .retry_classifier(TooManyRequests)
            // The connect timeout is the reqwest client's (`http::client`): the SDK's
            // would only reach a connector that reads it from its settings.
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            let url = url::Url::parse(endpoint)
                .map_err(|e| format!("TALLY_S3_ENDPOINT {endpoint:?}: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || !url.has_host() {
                return Err(format!(
                    "TALLY_S3_ENDPOINT {endpoint:?}: not an http:// or https:// URL"
                ));
            }
            builder = builder.endpoint_url(endpoint);
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            outbox_deletes: Arc::default(),
            outbox_records: Arc::default(),
            outbox_batches: Arc::default(),
            segment_commits: SEGMENT_COMMITS,
            outbox_lease: None,
        })
    }

    /// Make each outbox batch a lease open for `window` (see the `outbox` module): a
    /// command on a stream this process recorded an entry for less than `window` ago
    /// writes no outbox object. Another process takes a lease over `window` plus the
    /// operation timeout plus a margin after it was written — how long a crashed
    /// process's last commits may wait for the relay. `Duration::ZERO`: no leases.
    pub fn with_outbox_lease(self, window: Duration) -> Self {
        self.with_outbox_lease_taken_over_after(
            window,
            window + OPERATION_TIMEOUT + outbox::TAKEOVER_MARGIN,
        )
    }

    /// [`S3EventStore::with_outbox_lease`] with a takeover time of the caller's (tests:
    /// it must be past the window by more than any append can take).
    #[doc(hidden)]
    pub fn with_outbox_lease_taken_over_after(
        mut self,
        window: Duration,
        takeover: Duration,
    ) -> Self {
        self.outbox_lease = (!window.is_zero()).then_some(LeaseTimes { window, takeover });
        self
    }

    /// Seal segments of `commits` commits instead of [`SEGMENT_COMMITS`] (tests, to
    /// seal some without writing hundreds). Every process compacting one bucket must
    /// use the same size: it decides where segments begin.
    pub fn with_segment_commits(mut self, commits: usize) -> Self {
        self.segment_commits = commits.max(1);
        self
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn stream_prefix(&self, stream: &StreamId) -> String {
        format!("{}streams/{}/", self.prefix, stream.as_str())
    }

    fn commit_key(&self, stream: &StreamId, revision: Revision) -> String {
        format!("{}{:020}.json", self.stream_prefix(stream), revision.get())
    }

    fn snapshot_key(&self, stream: &StreamId) -> String {
        format!("{}snapshots/{}/latest.json", self.prefix, stream.as_str())
    }

    /// Create the bucket if it does not exist (the init step; idempotent).
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self.ready().await.is_ok() {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(failed(
                format_args!("cannot create bucket {}", self.bucket),
                &e,
            )),
        }
    }

    /// Create object `key` holding `body` only if no object has that key
    /// (`If-None-Match: *`): `Ok(true)` if this call created it, `Ok(false)` if the key
    /// was taken (412) or another conditional write of it was in flight (409).
    pub async fn create(
        &self,
        key: &str,
        body: impl Into<Bytes>,
        content_type: &str,
    ) -> Result<bool, StoreError> {
        let outcome = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .content_type(content_type)
            .body(ByteStream::from(body.into()))
            .send()
            .await;
        match outcome {
            Ok(_) => Ok(true),
            Err(e) if matches!(status(&e), Some(412 | 409)) => Ok(false),
            Err(e) => Err(failed(format_args!("PUT {key}"), &e)),
        }
    }

    /// Write object `key` unconditionally.
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| failed(format_args!("PUT {key}"), &e))?;
        Ok(())
    }

    /// Prove the server enforces `If-None-Match: *`: create a probe key twice; the second
    /// create must be refused. Returns an error saying why Tally must not run here.
    pub async fn verify_conditional_writes(&self) -> Result<(), String> {
        let key = format!("{}_probe/{:032x}", self.prefix, fastrand::u128(..));
        let put = || {
            self.create(
                &key,
                Bytes::from_static(b"probe"),
                "application/octet-stream",
            )
        };
        put()
            .await
            .map_err(|e| format!("cannot write to bucket {}: {e}", self.bucket()))?;
        let second = put().await;
        let _ = self.delete(&key).await;
        match second {
            Ok(false) => Ok(()),
            Ok(true) => Err(format!(
                "the S3 server at bucket {} ignores If-None-Match: a second conditional \
                 create of one key succeeded. Tally needs conditional writes to prevent lost \
                 updates; use AWS S3, MinIO or another server that implements them",
                self.bucket()
            )),
            Err(e) => Err(format!("conditional-write probe failed: {e}")),
        }
    }

    /// Every key under `prefix` after `start_after`, in order, with when it was written.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<String>,
    ) -> Result<Vec<(String, Option<OffsetDateTime>)>, StoreError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_start_after(start_after)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| failed(format_args!("LIST {prefix}"), &e))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    keys.push((key.to_owned(), object.last_modified().and_then(to_time)));
                }
            }
        }
        Ok(keys)
    }

    /// Every key in the bucket that starts with `prefix` (the store's own key prefix is
    /// not added), in order: for tools and tests.
    pub async fn keys(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .list(prefix, None)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    /// The bytes at `key` (the store's own key prefix is not added), if any: for tools
    /// and tests.
    pub async fn object(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.get_bytes_if_any(key).await
    }

    /// Write `body` at `key` (the store's own key prefix is not added), or delete the
    /// key when `body` is `None`, around every rule of the store: for tests that play
    /// a bug or tampering.
    pub async fn overwrite(&self, key: &str, body: Option<Bytes>) -> Result<(), StoreError> {
        match body {
            Some(body) => self.put(key, body, "application/json").await,
            None => self.delete(key).await,
        }
    }

    /// Delete `key` (S3 answers success for a key that is not there).
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| failed(format_args!("DELETE {key}"), &e))?;
        Ok(())
    }

    /// This store without its delete and record queues (what a queue's own task holds,
    /// so that the task ends when the last store is dropped).
    fn clone_without_queue(&self) -> Self {
        Self {
            outbox_deletes: Arc::default(),
            outbox_records: Arc::default(),
            ..self.clone()
        }
    }

    /// Delete `keys` with one DeleteObjects request; the keys that failed, with why.
    async fn delete_many(
        &self,
        keys: impl Iterator<Item = &str>,
    ) -> Result<Vec<(String, String)>, String> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        let objects = keys
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(|e| e.to_string())?;
        let answer = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(|e| failed(format_args!("DeleteObjects"), &e).to_string())?;
        Ok(answer
            .errors()
            .iter()
            .map(|e| {
                (
                    e.key().unwrap_or_default().to_owned(),
                    format!(
                        "{}: {}",
                        e.code().unwrap_or("error"),
                        e.message().unwrap_or("")
                    ),
                )
            })
            .collect())
    }

    /// The whole body of object `key`.
    async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        self.get_bytes_if_any(key)
            .await?
            .ok_or_else(|| StoreError::Unavailable(format!("GET {key}: no such key")))
    }

    /// The whole body of object `key`, or `None` if there is no such key.
    async fn get_bytes_if_any(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let object = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(object) => object,
            Err(e) if status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(failed(format_args!("GET {key}"), &e)),
        };
        let body = object.body.collect().await.map_err(|e| {
            StoreError::Unavailable(format!(
                "GET {key}: the body broke off: {}",
                error_chain(&e)
            ))
        })?;
        Ok(Some(body.into_bytes()))
    }

    async fn get(&self, key: String) -> Result<StoredCommit, StoreError> {
        let bytes = self.get_bytes(&key).await?;
        parse_commit(&key, &bytes)
    }

    fn revision_of(&self, stream: &StreamId, key: &str) -> Result<Revision, StoreError> {
        key.strip_prefix(&self.stream_prefix(stream))
            .and_then(|k| k.strip_suffix(".json"))
            .and_then(|k| Revision::parse(k).ok())
            .ok_or_else(|| StoreError::Corrupt(format!("unexpected key {key}")))
    }
}

impl S3EventStore {
    /// The commits of `stream` whose last event is at or after `from`: from its
    /// segments as far as they hold them, then the commits after; from the commits
    /// alone when it has no segments that reach `from`. `at_boundary` as for
    /// [`S3EventStore::read_commits_from`].
    async fn read_from(
        &self,
        stream: &StreamId,
        from: Revision,
        at_boundary: bool,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        match self.read_through_segments(stream, from).await? {
            Some(commits) => Ok(commits),
            None => self.read_commits_from(stream, from, at_boundary).await,
        }
    }

    /// The commits of `stream` whose last event is at or after `from`, from its
    /// segments and the commits after them; `None` when it has no segments that reach
    /// `from` (the caller reads the commits alone).
    async fn read_through_segments(
        &self,
        stream: &StreamId,
        from: Revision,
    ) -> Result<Option<Vec<StoredCommit>>, StoreError> {
        let Some((mut commits, covered)) = self.read_segments(stream, from).await? else {
            return Ok(None);
        };
        commits.extend(self.read_commits_after(stream, covered).await?);
        if let Some(first) = commits.first() {
            check_contiguous(stream, first.revision, &commits)?;
        }
        Ok(Some(commits))
    }

    /// The commits after `after` (a commit boundary), from the commit objects alone:
    /// `read_after` without segments.
    pub(crate) async fn read_commits_after(
        &self,
        stream: &StreamId,
        after: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        if after == Revision::ZERO {
            return self
                .read_commits_from(stream, Revision::new(1), false)
                .await;
        }
        self.read_commits_after_probing(stream, after).await
    }

    /// [`S3EventStore::read_commits_after`] probing the first keys by GET also from
    /// the start of the stream (where a gap at revision 1 then reads as an empty
    /// stream, as `read_after` may answer it).
    async fn read_commits_after_probing(
        &self,
        stream: &StreamId,
        after: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        let (mut commits, more) = self.probe_after(stream, after).await?;
        if let Some(next) = more {
            commits.extend(self.read_commits_from(stream, next, true).await?);
            check_contiguous(stream, after.next(), &commits)?;
        }
        Ok(commits)
    }

    /// The commits after `after`, a commit boundary, probed with a GET of each next key
    /// rather than listed: nothing new (the usual case for a warm stream) costs one 404,
    /// which costs a server the same however many keys the bucket holds, where a
    /// listing grows with them. Stops after [`FOLLOW_BY_GET`] commits and then returns
    /// the revision to go on from.
    async fn probe_after(
        &self,
        stream: &StreamId,
        after: Revision,
    ) -> Result<(Vec<StoredCommit>, Option<Revision>), StoreError> {
        let mut commits: Vec<StoredCommit> = Vec::new();
        let mut next = after.next();
        while commits.len() < FOLLOW_BY_GET {
            match self.read_commit(stream, next).await? {
                Some(commit) => {
                    next = commit.last_revision().next();
                    commits.push(commit);
                }
                None => return Ok((commits, None)),
            }
        }
        Ok((commits, Some(next)))
    }

    /// The commits of `stream` whose last event is at or after `from`, from the commit
    /// objects. With `at_boundary` the caller knows a commit ends just before `from`
    /// (`read_after`), so when no key starts at or after `from` there is nothing to
    /// read, and no need to look back for a commit holding it.
    async fn read_commits_from(
        &self,
        stream: &StreamId,
        from: Revision,
        at_boundary: bool,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        let prefix = self.stream_prefix(stream);
        // Keys from `from` on. If none starts at `from` — the first starts later, or
        // there is none — the commit holding `from` (if any) started before it: look
        // back for it.
        let start_after =
            (from.get() > 1).then(|| self.commit_key(stream, Revision::new(from.get() - 1)));
        let mut keys = self.list(&prefix, start_after.clone()).await?;
        if start_after.is_some() {
            let first = keys
                .first()
                .map(|(k, _)| self.revision_of(stream, k))
                .transpose()?;
            if first != Some(from) && !(at_boundary && first.is_none()) {
                keys = self.keys_from_the_holder_of(stream, &prefix, from).await?;
            }
        }
        let commits: Vec<StoredCommit> = stream::iter(keys.into_iter().map(|(k, _)| self.get(k)))
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        if let Some(first) = commits.first() {
            check_contiguous(stream, first.revision, &commits)?;
            if from.get() <= 1 && first.revision != Revision::new(1) {
                return Err(StoreError::Corrupt(format!(
                    "stream `{stream}` starts at revision {}",
                    first.revision
                )));
            }
        }
        Ok(commits
            .into_iter()
            .filter(|c| c.last_revision() >= from)
            .collect())
    }

    /// The keys of `stream` from the commit that holds `from` (the last one starting at
    /// or before it) on: a listing from [`LOOK_BACK`] revisions before `from`, or of the
    /// whole stream when no commit starts in that window (a commit of more events than
    /// that, or a stream that ends before it).
    async fn keys_from_the_holder_of(
        &self,
        stream: &StreamId,
        prefix: &str,
        from: Revision,
    ) -> Result<Vec<(String, Option<OffsetDateTime>)>, StoreError> {
        let back = from.get().saturating_sub(LOOK_BACK + 1);
        let window = (back >= 1).then(|| self.commit_key(stream, Revision::new(back)));
        let windowed = window.is_some();
        let mut keys = self.list(prefix, window).await?;
        let starts_in_window = match keys.first() {
            Some((k, _)) => self.revision_of(stream, k)? <= from,
            None => false,
        };
        if windowed && !starts_in_window {
            keys = self.list(prefix, None).await?;
        }
        let mut revisions = Vec::with_capacity(keys.len());
        for (k, _) in &keys {
            revisions.push(self.revision_of(stream, k)?);
        }
        let start = revisions.partition_point(|r| *r <= from).saturating_sub(1);
        Ok(keys.split_off(start))
    }
}

/// A listing's `LastModified`.
fn to_time(t: &aws_sdk_s3::primitives::DateTime) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(t.secs()).ok()
}

#[async_trait]
impl EventStore for S3EventStore {
    async fn append(&self, commit: &StoredCommit) -> Result<(), AppendError> {
        let key = self.commit_key(&commit.stream, commit.revision);
        match self
            .create(&key, commit.to_bytes(), "application/json")
            .await
        {
            Ok(true) => Ok(()),
            // 412: the key exists. 409: a conditional write of this key is in flight.
            Ok(false) => Err(AppendError::Conflict {
                stream: commit.stream.clone(),
                revision: commit.revision,
            }),
            Err(StoreError::Unavailable(why) | StoreError::Corrupt(why)) => {
                Err(AppendError::Unavailable(why))
            }
        }
    }

    async fn read(
        &self,
        stream: &StreamId,
        from: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        self.read_from(stream, from, false).await
    }

    /// One GET of the commit's own key (not a listing): the relay's path.
    async fn read_commit(
        &self,
        stream: &StreamId,
        revision: Revision,
    ) -> Result<Option<StoredCommit>, StoreError> {
        let key = self.commit_key(stream, revision);
        let Some(bytes) = self.get_bytes_if_any(&key).await? else {
            return Ok(None);
        };
        let commit = parse_commit(&key, &bytes)?;
        check_contiguous(stream, revision, std::slice::from_ref(&commit))?;
        Ok(Some(commit))
    }

    /// The next keys are probed with a GET (see [`S3EventStore::probe_after`]); past a
    /// few new commits, the rest is read from the segments if they hold it, else
    /// listed and fetched concurrently. From the start of a stream: from its segments
    /// as `read` does when it has them; a stream without (a new one, a transfer's) is
    /// probed by key like a warm one — a GET per commit and one 404, where `read` lists
    /// its keys (a listing costs moto several GETs, the more the more keys the bucket
    /// holds, and AWS a dozen).
    async fn read_after(
        &self,
        stream: &StreamId,
        after: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        if after == Revision::ZERO {
            return match self.read_through_segments(stream, Revision::new(1)).await? {
                Some(commits) => Ok(commits),
                None => self.read_commits_after_probing(stream, after).await,
            };
        }
        let (mut commits, more) = self.probe_after(stream, after).await?;
        if let Some(next) = more {
            commits.extend(self.read_from(stream, next, true).await?);
            check_contiguous(stream, after.next(), &commits)?;
        }
        Ok(commits)
    }

    async fn streams(&self) -> Result<Vec<StreamId>, StoreError> {
        let prefix = format!("{}streams/", self.prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .delimiter("/")
            .into_paginator()
            .send();
        let mut streams = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| failed(format_args!("LIST {prefix}"), &e))?;
            for p in page.common_prefixes() {
                let name = p
                    .prefix()
                    .and_then(|p| p.strip_prefix(&prefix))
                    .and_then(|p| p.strip_suffix('/'))
                    .unwrap_or_default();
                streams
                    .push(StreamId::parse(name).map_err(|e| {
                        StoreError::Corrupt(format!("stream prefix {name:?}: {e}"))
                    })?);
            }
        }
        streams.sort();
        Ok(streams)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Err(StoreError::Unavailable(format!(
                "bucket {} does not exist (run the init step: migrate)",
                self.bucket
            ))),
            Err(e) => Err(failed(format_args!("bucket {}", self.bucket), &e)),
        }
    }
}

#[async_trait]
impl Outbox for S3EventStore {
    /// Recorded in a batch object with the entries recorded meanwhile (see the
    /// `outbox` module): returns once that object is written.
    async fn record(
        &self,
        stream: &StreamId,
        revision: Revision,
        attempt: &str,
    ) -> Result<(), StoreError> {
        self.record_batched(outbox::entry_path(stream, revision, attempt)?)
            .await
    }

    /// The last entry of a batch deletes the batch object; deletes are gathered: while
    /// one delete request is in flight, the ones due meanwhile wait and go in the next,
    /// a single DeleteObjects. Returns once the entry is gone.
    async fn done(
        &self,
        stream: &StreamId,
        revision: Revision,
        attempt: &str,
    ) -> Result<(), StoreError> {
        self.done_batched(outbox::entry_path(stream, revision, attempt)?)
            .await
    }

    async fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.pending_batched(limit).await
    }
}

impl S3EventStore {
    /// Delete `key` with the deletes due meanwhile (one DeleteObjects); returns once it
    /// is gone.
    async fn delete_gathered(&self, key: String) -> Result<(), StoreError> {
        self.through(&self.outbox_deletes, delete_in_batches, key, "delete")
            .await
    }

    /// Hand `item` to the task behind `queue` (`task`, started on first use, inside the
    /// runtime) and wait for its outcome.
    async fn through<Task>(
        &self,
        queue: &OnceLock<KeyQueue>,
        task: fn(S3EventStore, mpsc::UnboundedReceiver<KeyRequest>) -> Task,
        item: String,
        what: &str,
    ) -> Result<(), StoreError>
    where
        Task: std::future::Future<Output = ()> + Send + 'static,
    {
        let queue = queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(task(self.clone_without_queue(), rx));
            tx
        });
        let (tx, rx) = oneshot::channel();
        let stopped = || StoreError::Unavailable(format!("the outbox {what} queue stopped"));
        queue.send((item, tx)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// The commit stored under `key`; unreadable bytes are corruption.
fn parse_commit(key: &str, bytes: &[u8]) -> Result<StoredCommit, StoreError> {
    StoredCommit::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
}

/// Delete what arrives on `queue`: whatever arrives within [`DELETE_LINGER`] of the
/// first, up to [`MAX_DELETE_BATCH`] keys, in one request, then the next batch. Ends when every store is dropped.
async fn delete_in_batches(store: S3EventStore, mut queue: mpsc::UnboundedReceiver<KeyRequest>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        let linger = tokio::time::sleep(DELETE_LINGER);
        tokio::pin!(linger);
        while batch.len() < MAX_DELETE_BATCH {
            tokio::select! {
                next = queue.recv() => match next {
                    Some(next) => batch.push(next),
                    None => break,
                },
                () = &mut linger => break,
            }
        }
        if batch.len() == 1 {
            let (key, reply) = batch.pop().expect("one");
            let _ = reply.send(store.delete(&key).await);
            continue;
        }
        let outcome = store
            .delete_many(batch.iter().map(|(k, _)| k.as_str()))
            .await;
        for (key, reply) in batch {
            let result = match &outcome {
                Ok(failed) => match failed.iter().find(|(k, _)| *k == key) {
                    Some((_, why)) => Err(StoreError::Unavailable(why.clone())),
                    None => Ok(()),
                },
                Err(e) => Err(StoreError::Unavailable(e.clone())),
            };
            let _ = reply.send(result);
        }
    }
}

/// A stream's newest snapshot as `snapshots/{stream}/latest.json`: finding it is one
/// GET (a listing costs a server more the more keys the bucket holds), and saving one
/// reads it first so that an older snapshot saved late does not replace a newer one.
/// (Snapshots named by revision, as earlier versions wrote them, are no longer read: a
/// stream without `latest.json` loads from its commits and gets one at its next
/// snapshot revision.)
#[async_trait]
impl SnapshotStore for S3EventStore {
    async fn latest(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let Some(bytes) = self.get_bytes_if_any(&self.snapshot_key(stream)).await? else {
            return Ok(None);
        };
        Ok(Snapshot::from_bytes(&bytes)
            .ok()
            .filter(|s| s.stream == *stream))
    }

    async fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        if self
            .latest(&snapshot.stream)
            .await?
            .is_some_and(|newest| newest.revision >= snapshot.revision)
        {
            return Ok(());
        }
        let key = self.snapshot_key(&snapshot.stream);
        self.put(&key, snapshot.to_bytes().into(), "application/json")
            .await
    }
}

/// Data keys as `keys/{id}` objects; destroying one deletes the object. (On a bucket
/// with versioning, a deleted object's older versions stay: keep the keys in a bucket
/// without it, or use a KMS — see `tally_vault::KeyWrap`.)
#[async_trait]
impl tally_es::KeyStore for S3EventStore {
    async fn put(&self, id: &str, wrapped: &[u8]) -> Result<(), StoreError> {
        let key = format!("{}keys/{id}", self.prefix);
        self.put(
            &key,
            Bytes::copy_from_slice(wrapped),
            "application/octet-stream",
        )
        .await
    }

    async fn get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = format!("{}keys/{id}", self.prefix);
        Ok(self.get_bytes_if_any(&key).await?.map(|b| b.to_vec()))
    }

    async fn destroy(&self, id: &str) -> Result<(), StoreError> {
        let key = format!("{}keys/{id}", self.prefix);
        self.delete(&key).await
    }
}
