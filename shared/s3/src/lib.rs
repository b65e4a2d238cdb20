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
//! concurrently. Requests are built and signed (SigV4) by `rusty-s3` and sent by one
//! pooled `reqwest` client (HTTP/1.1 keep-alive; HTTPS through rustls on ring). A
//! transient failure (no connection, a timeout, a 5xx or 429) is retried twice with
//! exponential backoff and jitter (`backon`); every call has connect, attempt and
//! operation timeouts. [`S3EventStore::verify_conditional_writes`] proves at start-up that the
//! server refuses a second conditional create of one key; a store that ignores the
//! header would silently lose updates, so Tally refuses to start on it.

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use rusty_s3::actions::{ListObjectsV2, ObjectIdentifier};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tally_es::{
    check_contiguous, error_chain, AppendError, EventStore, Outbox, OutboxEntry, Revision,
    Snapshot, SnapshotStore, StoreError, StoredCommit, StreamId,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

/// How many commit objects a read fetches at once.
const READ_CONCURRENCY: usize = 16;
/// How many new commits `read_after` fetches one by one, by key, before it lists the
/// rest.
const FOLLOW_BY_GET: usize = 3;
/// Connecting to the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// One attempt of a request, its body included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// A whole call, retries included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a signed request stays valid (it is sent at once; this covers clock skew
/// and the retries).
const SIGNATURE_VALIDITY: Duration = Duration::from_secs(300);

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
    http: reqwest::Client,
    bucket: Arc<Bucket>,
    credentials: Arc<Credentials>,
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

/// A signed request, ready to send (again, on a retry).
struct Call {
    method: reqwest::Method,
    url: url::Url,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
}

/// What the server answered (any status it did not ask us to retry).
struct Answer {
    status: u16,
    body: Bytes,
}

impl Answer {
    fn success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The S3 error code (`NoSuchBucket`, `BucketAlreadyOwnedByYou`, ...), if the body
    /// is an S3 error document.
    fn code(&self) -> Option<&str> {
        xml_text(&self.body, "Code")
    }

    /// This answer if it is a success; otherwise why `what` (`PUT key`) failed.
    fn success_or(self, what: std::fmt::Arguments<'_>) -> Result<Self, StoreError> {
        if self.success() {
            Ok(self)
        } else {
            Err(unavailable(format!("{what}: {}", self.error())))
        }
    }

    /// Why the request failed, for an error message.
    fn error(&self) -> String {
        match (self.code(), xml_text(&self.body, "Message")) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => format!("HTTP {}", self.status),
        }
    }
}

/// A request that failed in a way worth trying again (no answer, or a 5xx or 429),
/// and why.
#[derive(Debug)]
struct Transient(String);

impl std::fmt::Display for Transient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The text of the first `<tag>` element of an S3 XML document (error documents hold
/// a flat `Code` and `Message`).
fn xml_text<'a>(body: &'a [u8], tag: &str) -> Option<&'a str> {
    let body = std::str::from_utf8(body).ok()?;
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = body[start..].find(&format!("</{tag}>"))?;
    Some(&body[start..start + len])
}

fn unavailable(why: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(why.to_string())
}

impl S3EventStore {
    /// A store over `config`. Does not touch the network; fails only on an endpoint
    /// that is not an `http(s)://` URL.
    pub fn new(config: &S3Config) -> Result<Self, String> {
        let endpoint = match &config.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => format!("https://s3.{}.amazonaws.com", config.region),
        };
        let url = endpoint
            .parse()
            .map_err(|e| format!("TALLY_S3_ENDPOINT {endpoint:?}: {e}"))?;
        let bucket = Bucket::new(
            url,
            UrlStyle::Path,
            config.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| format!("S3 bucket {:?} at {endpoint}: {e}", config.bucket))?;
        let credentials = match &config.session_token {
            Some(token) => {
                Credentials::new_with_token(&config.access_key_id, &config.secret_access_key, token)
            }
            None => Credentials::new(&config.access_key_id, &config.secret_access_key),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ATTEMPT_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| format!("S3 HTTP client: {}", error_chain(&e)))?;
        Ok(Self {
            http,
            bucket: Arc::new(bucket),
            credentials: Arc::new(credentials),
            prefix: config.prefix.clone(),
            outbox_deletes: Arc::default(),
        })
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        self.bucket.name()
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

    /// Sign `action` with `headers` (sent as they are signed) for a request with `body`.
    fn call<'a, A: S3Action<'a>>(
        mut action: A,
        headers: &[(&'static str, &'a str)],
        body: Bytes,
    ) -> Call {
        for (name, value) in headers {
            action.headers_mut().insert(*name, *value);
        }
        let method = match A::METHOD {
            rusty_s3::Method::Head => reqwest::Method::HEAD,
            rusty_s3::Method::Get => reqwest::Method::GET,
            rusty_s3::Method::Post => reqwest::Method::POST,
            rusty_s3::Method::Put => reqwest::Method::PUT,
            rusty_s3::Method::Delete => reqwest::Method::DELETE,
        };
        Call {
            method,
            url: action.sign(SIGNATURE_VALIDITY),
            headers: headers.iter().map(|(n, v)| (*n, (*v).to_owned())).collect(),
            body,
        }
    }

    /// Send `call`, retrying what is transient, within the operation timeout.
    async fn send(&self, call: Call) -> Result<Answer, StoreError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(20))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(2)
            .with_jitter();
        let attempts = (|| self.attempt(&call)).retry(backoff).notify(|e, after| {
            tracing::debug!(url = %call.url.path(), error = %e, ?after, "S3 request retried");
        });
        match tokio::time::timeout(OPERATION_TIMEOUT, attempts).await {
            Ok(answer) => answer.map_err(unavailable),
            Err(_) => Err(unavailable(format!(
                "S3 {} {}: no answer within {OPERATION_TIMEOUT:?}",
                call.method,
                call.url.path()
            ))),
        }
    }

    async fn attempt(&self, call: &Call) -> Result<Answer, Transient> {
        let mut request = self.http.request(call.method.clone(), call.url.clone());
        for (name, value) in &call.headers {
            request = request.header(*name, value);
        }
        if call.method == reqwest::Method::PUT || call.method == reqwest::Method::POST {
            // Always a body, if empty: S3 wants a Content-Length on every upload (411).
            request = request
                .header(reqwest::header::CONTENT_LENGTH, call.body.len())
                .body(call.body.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|e| Transient(error_chain(&e)))?;
        let status = response.status().as_u16();
        let body = response
            .bytes()
            .await
            .map_err(|e| Transient(error_chain(&e)))?;
        let answer = Answer { status, body };
        if status >= 500 || status == 429 {
            return Err(Transient(match answer.code() {
                Some(_) => format!("HTTP {status}: {}", answer.error()),
                None => answer.error(),
            }));
        }
        Ok(answer)
    }

    /// Create the bucket if it does not exist (the init step; idempotent).
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self.ready().await.is_ok() {
            return Ok(());
        }
        let create = self.bucket.create_bucket(&self.credentials);
        let body = Bytes::from(create.body());
        let answer = self.send(Self::call(create, &[], body)).await?;
        match answer.code() {
            _ if answer.success() => Ok(()),
            Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists") => Ok(()),
            _ => Err(unavailable(format!(
                "cannot create bucket {}: {}",
                self.bucket(),
                answer.error()
            ))),
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
        let put = self.bucket.put_object(Some(&self.credentials), key);
        let headers = [("if-none-match", "*"), ("content-type", content_type)];
        let answer = self.send(Self::call(put, &headers, body.into())).await?;
        match answer.status {
            _ if answer.success() => Ok(true),
            412 | 409 => Ok(false),
            _ => Err(unavailable(format!("PUT {key}: {}", answer.error()))),
        }
    }

    /// Write object `key` unconditionally.
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError> {
        let put = self.bucket.put_object(Some(&self.credentials), key);
        let headers = [("content-type", content_type)];
        self.send(Self::call(put, &headers, body))
            .await?
            .success_or(format_args!("PUT {key}"))?;
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

    /// One page of a listing under `prefix`.
    async fn list_page(
        &self,
        prefix: &str,
        configure: impl FnOnce(&mut ListObjectsV2<'_>),
    ) -> Result<rusty_s3::actions::ListObjectsV2Response, StoreError> {
        let mut list = self.bucket.list_objects_v2(Some(&self.credentials));
        list.with_prefix(prefix);
        configure(&mut list);
        let answer = self
            .send(Self::call(list, &[], Bytes::new()))
            .await?
            .success_or(format_args!("LIST {prefix}"))?;
        let text = std::str::from_utf8(&answer.body)
            .map_err(|e| unavailable(format!("LIST {prefix}: {e}")))?;
        ListObjectsV2::parse_response(text)
            .map_err(|e| unavailable(format!("LIST {prefix}: unreadable answer: {e}")))
    }

    /// Every key under `prefix` after `start_after`, in order, with when it was written.
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<String>,
    ) -> Result<Vec<(String, Option<OffsetDateTime>)>, StoreError> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .list_page(prefix, |list| {
                    if let Some(t) = &token {
                        list.with_continuation_token(t.clone());
                    } else if let Some(s) = &start_after {
                        list.with_start_after(s.clone());
                    }
                })
                .await?;
            keys.extend(
                page.contents
                    .into_iter()
                    .map(|o| (o.key, o.last_modified.as_deref().and_then(parse_time))),
            );
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => return Ok(keys),
            }
        }
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

    /// Delete `key` (S3 answers success for a key that is not there).
    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let delete = self.bucket.delete_object(Some(&self.credentials), key);
        self.send(Self::call(delete, &[], Bytes::new()))
            .await?
            .success_or(format_args!("DELETE {key}"))?;
        Ok(())
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
        let objects: Vec<ObjectIdentifier> =
            keys.map(|k| ObjectIdentifier::new(k.to_owned())).collect();
        let mut delete = self
            .bucket
            .delete_objects(Some(&self.credentials), objects.iter());
        delete.set_quiet(true);
        // The body is made from the action, so it is signed first, with its digest.
        let url = delete.sign(SIGNATURE_VALIDITY);
        let (body, md5) = delete.body_with_md5();
        let call = Call {
            method: reqwest::Method::POST,
            url,
            headers: vec![("content-md5", md5)],
            body: Bytes::from(body),
        };
        let answer = self.send(call).await.map_err(|e| e.to_string())?;
        if !answer.success() {
            return Err(format!("DeleteObjects: {}", answer.error()));
        }
        let text = std::str::from_utf8(&answer.body).map_err(|e| e.to_string())?;
        let result = rusty_s3::actions::DeleteObjectsResponse::parse(text)
            .map_err(|e| format!("DeleteObjects: unreadable answer: {e}"))?;
        Ok(result
            .errors
            .into_iter()
            .map(|e| (e.key, format!("{}: {}", e.code, e.message)))
            .collect())
    }

    /// The whole body of object `key`.
    async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        self.get_bytes_if_any(key)
            .await?
            .ok_or_else(|| unavailable(format!("{key}: no such key")))
    }

    /// The whole body of object `key`, or `None` if there is no such key.
    async fn get_bytes_if_any(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let get = self.bucket.get_object(Some(&self.credentials), key);
        let answer = self.send(Self::call(get, &[], Bytes::new())).await?;
        match answer.status {
            _ if answer.success() => Ok(Some(answer.body)),
            404 => Ok(None),
            _ => Err(unavailable(format!("GET {key}: {}", answer.error()))),
        }
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

/// A listing's `LastModified` (RFC 3339).
fn parse_time(text: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()
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

    /// The next commit's key is probed with a GET rather than listed: nothing new (the
    /// usual case for a warm stream) costs one 404, which costs a server the same
    /// however many keys the bucket holds, where a listing grows with them. Each commit
    /// found is followed the same way; past [`FOLLOW_BY_GET`] of them, the rest is
    /// listed and fetched concurrently.
    async fn read_after(
        &self,
        stream: &StreamId,
        after: Revision,
    ) -> Result<Vec<StoredCommit>, StoreError> {
        if after == Revision::ZERO {
            return self.read(stream, Revision::new(1)).await;
        }
        let mut commits: Vec<StoredCommit> = Vec::new();
        let mut next = after.next();
        while commits.len() < FOLLOW_BY_GET {
            match self.read_commit(stream, next).await? {
                Some(commit) => {
                    next = commit.last_revision().next();
                    commits.push(commit);
                }
                None => return Ok(commits),
            }
        }
        commits.extend(self.read(stream, next).await?);
        check_contiguous(stream, after.next(), &commits)?;
        Ok(commits)
    }

    async fn streams(&self) -> Result<Vec<StreamId>, StoreError> {
        let prefix = format!("{}streams/", self.prefix);
        let mut streams = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .list_page(&prefix, |list| {
                    list.with_delimiter("/");
                    if let Some(t) = &token {
                        list.with_continuation_token(t.clone());
                    }
                })
                .await?;
            for p in &page.common_prefixes {
                let name = p
                    .prefix
                    .strip_prefix(&prefix)
                    .and_then(|p| p.strip_suffix('/'))
                    .unwrap_or_default();
                streams
                    .push(StreamId::parse(name).map_err(|e| {
                        StoreError::Corrupt(format!("stream prefix {name:?}: {e}"))
                    })?);
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        streams.sort();
        Ok(streams)
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let head = self.bucket.head_bucket(Some(&self.credentials));
        let answer = self.send(Self::call(head, &[], Bytes::new())).await?;
        match answer.status {
            _ if answer.success() => Ok(()),
            404 => Err(unavailable(format!(
                "bucket {} does not exist (run the init step: migrate)",
                self.bucket()
            ))),
            _ => Err(unavailable(format!(
                "bucket {}: {}",
                self.bucket(),
                answer.error()
            ))),
        }
    }
}

#[async_trait]
impl Outbox for S3EventStore {
    async fn record(&self, stream: &StreamId, revision: Revision) -> Result<(), StoreError> {
        self.put(
            &self.outbox_key(stream, revision),
            Bytes::new(),
            "application/octet-stream",
        )
        .await
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
            .list_page(&prefix, |list| list.with_max_keys(limit.clamp(1, 1000)))
            .await?;
        let mut entries = Vec::new();
        for object in page.contents {
            let (key, modified) = (
                object.key,
                object.last_modified.as_deref().and_then(parse_time),
            );
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
        self.put(&key, snapshot.to_bytes().into(), "application/json")
            .await?;
        for (old, _) in self.list(&prefix, None).await? {
            if old < key {
                let _ = self.delete(&old).await;
            }
        }
        Ok(())
    }
}
