//! `tally-s3`: the event store in an S3 bucket (AWS S3, MinIO, or any server that
//! implements conditional writes).
//!
//! Layout under an optional key prefix:
//!
//! * `streams/{stream}/{revision:020}.json` — one object per commit, written with
//!   `If-None-Match: *`: the server creates it only if the key is free, so of two writers
//!   that loaded the same revision exactly one wins; the other gets 412 (or 409 while
//!   the first write is in flight), which becomes [`AppendError::Conflict`].
//! * `outbox/{stream}/{revision:020}` — the outbox (see `tally_es::Outbox`).
//!
//! Reads list a stream's keys from a start-after cursor and fetch the commits
//! concurrently. The SDK retries transient errors (standard mode: bounded attempts,
//! exponential backoff with jitter) and every call has connect, attempt and operation
//! timeouts. [`S3EventStore::verify_conditional_writes`] proves at start-up that the
//! server refuses a second conditional create of one key; a store that ignores the
//! header would silently lose updates, so Tally refuses to start on it.

use async_trait::async_trait;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls;
use futures::stream::{self, StreamExt, TryStreamExt};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tally_es::{
    check_contiguous, AppendError, EventStore, Outbox, OutboxEntry, Revision, Snapshot,
    SnapshotStore, StoreError, StoredCommit, StreamId,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

/// How many commit objects a read fetches at once.
const READ_CONCURRENCY: usize = 16;

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
    outbox_deletes: Arc<OnceLock<DeleteQueue>>,
}

/// A key to delete and where its outcome goes.
type DeleteRequest = (String, oneshot::Sender<Result<(), StoreError>>);
type DeleteQueue = mpsc::UnboundedSender<DeleteRequest>;

/// The most keys one DeleteObjects request may carry.
const MAX_DELETE_BATCH: usize = 1000;

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;

fn unavailable<E>(e: SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    match &e {
        SdkError::ServiceError(se) => format!(
            "{}: {}",
            se.err().code().unwrap_or("error"),
            se.err().message().unwrap_or("")
        ),
        other => aws_sdk_s3::error::DisplayErrorContext(other)
            .to_string()
            .chars()
            .take(300)
            .collect(),
    }
}

fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl S3EventStore {
    /// A store over `config`. Does not touch the network.
    pub fn new(config: &S3Config) -> Self {
        let credentials = Credentials::new(
            &config.access_key_id,
            &config.secret_access_key,
            config.session_token.clone(),
            None,
            "tally-environment",
        );
        // HTTPS through rustls on ring (plain HTTP for a local endpoint such as MinIO's).
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut builder = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(config.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(true)
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(1))
                    .operation_attempt_timeout(Duration::from_secs(3))
                    .operation_timeout(Duration::from_secs(10))
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        Self {
            client: Client::from_conf(builder.build()),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            outbox_deletes: Arc::default(),
        }
    }

    /// The SDK client (for tools and tests).
    pub fn client(&self) -> &Client {
        &self.client
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

    fn snapshot_prefix(&self, stream: &StreamId) -> String {
        format!("{}snapshots/{}/", self.prefix, stream.as_str())
    }

    fn outbox_key(&self, stream: &StreamId, revision: Revision) -> String {
        format!(
            "{}outbox/{}/{:020}",
            self.prefix,
            stream.as_str(),
            revision.get()
        )
    }

    /// Create the bucket if it does not exist (the init step; idempotent).
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
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
            Err(e) => Err(StoreError::Unavailable(unavailable(e))),
        }
    }

    /// Prove the server enforces `If-None-Match: *`: create a probe key twice; the second
    /// create must be refused. Returns an error saying why Tally must not run here.
    pub async fn verify_conditional_writes(&self) -> Result<(), String> {
        let key = format!("{}_probe/{:032x}", self.prefix, fastrand::u128(..));
        let put = || {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .if_none_match("*")
                .content_type("application/octet-stream")
                .body(ByteStream::from_static(b"probe"))
                .send()
        };
        put()
            .await
            .map_err(|e| format!("cannot write to bucket {}: {}", self.bucket, unavailable(e)))?;
        let second = put().await;
        let _ = self.delete(&key).await;
        match second {
            Err(e) if matches!(status(&e), Some(412 | 409)) => Ok(()),
            Ok(_) => Err(format!(
                "the S3 server at bucket {} ignores If-None-Match: a second conditional \
                 create of one key succeeded. Tally needs conditional writes to prevent lost \
                 updates; use AWS S3, MinIO or another server that implements them",
                self.bucket
            )),
            Err(e) => Err(format!(
                "conditional-write probe failed: {}",
                unavailable(e)
            )),
        }
    }

    /// Every key under `prefix` after `start_after`, in order.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<String>,
    ) -> Result<Vec<(String, Option<OffsetDateTime>)>, StoreError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix);
            if let Some(t) = &token {
                req = req.continuation_token(t);
            } else if let Some(s) = &start_after {
                req = req.start_after(s);
            }
            let page = req
                .send()
                .await
                .map_err(|e| StoreError::Unavailable(unavailable(e)))?;
            for object in page.contents() {
                if let Some(key) = object.key() {
                    let modified = object
                        .last_modified()
                        .and_then(|t| OffsetDateTime::from_unix_timestamp(t.secs()).ok());
                    keys.push((key.to_owned(), modified));
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(keys),
            }
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
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(unavailable(e)))
    }

    /// This store without its delete queue (what the queue's own task holds, so that
    /// the task ends when the last store is dropped).
    fn clone_without_queue(&self) -> Self {
        Self {
            outbox_deletes: Arc::default(),
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
            .map_err(unavailable)?;
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
    async fn get_bytes(
        &self,
        key: &str,
    ) -> Result<impl std::ops::Deref<Target = [u8]>, StoreError> {
        self.get_bytes_if_any(key)
            .await?
            .ok_or_else(|| StoreError::Unavailable(format!("{key}: no such key")))
    }

    /// The whole body of object `key`, or `None` if there is no such key.
    async fn get_bytes_if_any(
        &self,
        key: &str,
    ) -> Result<Option<impl std::ops::Deref<Target = [u8]>>, StoreError> {
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
            Err(e) => return Err(StoreError::Unavailable(unavailable(e))),
        };
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .into_bytes();
        Ok(Some(bytes))
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

#[async_trait]
impl EventStore for S3EventStore {
    async fn append(&self, commit: &StoredCommit) -> Result<(), AppendError> {
        let result = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.commit_key(&commit.stream, commit.revision))
            .if_none_match("*")
            .content_type("application/json")
            .body(ByteStream::from(commit.to_bytes()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // 412: the key exists. 409: a conditional write of this key is in flight.
            Err(e) if matches!(status(&e), Some(412 | 409)) => Err(AppendError::Conflict {
                stream: commit.stream.clone(),
                revision: commit.revision,
            }),
            Err(e) => Err(AppendError::Unavailable(unavailable(e))),
        }
    }

    async fn read(
        &self,
        stream: &StreamId,
        from: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        let prefix = self.stream_prefix(stream);
        // Keys from `from` on; if the first one starts later, the commit holding `from`
        // started before it, so list from the beginning instead.
        let start_after =
            (from.get() > 1).then(|| self.commit_key(stream, Revision::new(from.get() - 1)));
        let mut keys = self.list(&prefix, start_after.clone()).await?;
        if start_after.is_some() {
            let first = keys
                .first()
                .map(|(k, _)| self.revision_of(stream, k))
                .transpose()?;
            if first.is_some_and(|r| r != from) {
                let all = self.list(&prefix, None).await?;
                let mut revisions = Vec::with_capacity(all.len());
                for (k, _) in &all {
                    revisions.push(self.revision_of(stream, k)?);
                }
                let start = revisions.partition_point(|r| *r <= from).saturating_sub(1);
                keys = all[start..].to_vec();
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

    async fn streams(&self) -> Result<Vec<StreamId>, StoreError> {
        let prefix = format!("{}streams/", self.prefix);
        let mut streams = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .delimiter("/");
            if let Some(t) = &token {
                req = req.continuation_token(t);
            }
            let page = req
                .send()
                .await
                .map_err(|e| StoreError::Unavailable(unavailable(e)))?;
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
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        streams.sort();
        Ok(streams)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(unavailable(e)))
    }
}

#[async_trait]
impl Outbox for S3EventStore {
    async fn record(&self, stream: &StreamId, revision: Revision) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.outbox_key(stream, revision))
            .content_type("application/octet-stream")
            .body(ByteStream::from_static(b""))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(unavailable(e)))
    }

    /// Deletes are gathered: while one delete request is in flight, the entries done
    /// meanwhile wait and go in the next one, a single DeleteObjects (one S3 request
    /// for up to 1,000 entries instead of one each). Returns once the entry is gone.
    async fn done(&self, stream: &StreamId, revision: Revision) -> Result<(), StoreError> {
        let queue = self.outbox_deletes.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(delete_in_batches(self.clone_without_queue(), rx));
            tx
        });
        let (tx, rx) = oneshot::channel();
        queue
            .send((self.outbox_key(stream, revision), tx))
            .map_err(|_| StoreError::Unavailable("the outbox delete queue stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("the outbox delete queue stopped".into()))?
    }

    async fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let prefix = format!("{}outbox/", self.prefix);
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .max_keys(i32::try_from(limit.min(1000)).unwrap_or(1000))
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(unavailable(e)))?;
        let keys = page.contents().iter().filter_map(|o| {
            let modified = o
                .last_modified()
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t.secs()).ok());
            o.key().map(|k| (k.to_owned(), modified))
        });
        let mut entries = Vec::new();
        for (key, modified) in keys {
            let rest = key.strip_prefix(&prefix).unwrap_or_default();
            let Some((stream, revision)) = rest.split_once('/') else {
                continue;
            };
            let (Ok(stream), Ok(revision)) = (StreamId::parse(stream), Revision::parse(revision))
            else {
                continue;
            };
            entries.push(OutboxEntry {
                stream,
                revision,
                recorded_at: modified.unwrap_or_else(OffsetDateTime::now_utc),
            });
        }
        Ok(entries)
    }
}

/// The commit stored under `key`; unreadable bytes are corruption.
fn parse_commit(key: &str, bytes: &[u8]) -> Result<StoredCommit, StoreError> {
    StoredCommit::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
}

/// Delete what arrives on `queue`: whatever is waiting, up to [`MAX_DELETE_BATCH`]
/// keys, in one request, then the next batch. Ends when every store is dropped.
async fn delete_in_batches(store: S3EventStore, mut queue: mpsc::UnboundedReceiver<DeleteRequest>) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_DELETE_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
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

/// Snapshots as `snapshots/{stream}/{revision:020}.json`; older ones are deleted after a
/// newer one is written, so finding the newest is one short listing.
#[async_trait]
impl SnapshotStore for S3EventStore {
    async fn latest(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let keys = self.list(&self.snapshot_prefix(stream), None).await?;
        let Some((key, _)) = keys.last() else {
            return Ok(None);
        };
        let bytes = self.get_bytes(key).await?;
        Ok(Snapshot::from_bytes(&bytes).ok())
    }

    async fn save(&self, snapshot: &Snapshot) -> Result<(), StoreError> {
        let prefix = self.snapshot_prefix(&snapshot.stream);
        let key = format!("{prefix}{:020}.json", snapshot.revision.get());
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(snapshot.to_bytes()))
            .send()
            .await
            .map_err(|e| StoreError::Unavailable(unavailable(e)))?;
        for (old, _) in self.list(&prefix, None).await? {
            if old < key {
                let _ = self.delete(&old).await;
            }
        }
        Ok(())
    }
}
