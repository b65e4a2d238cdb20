//! `tally-kafka`: the event stream on Kafka (or any broker that speaks its protocol).
//!
//! * [`KafkaStream::publish`] — a producer with `acks=all` sends each commit keyed by its
//!   stream id, so a stream's commits go to one partition, with headers `event-types`,
//!   `schema-versions`, `revision` and `x-request-id`. It resolves when the broker
//!   acknowledged. Not the idempotent producer: `make torture` measured tansu 0.6
//!   fencing it after a broker outage (`ProducerFenced`) and then losing messages it had
//!   acknowledged; the projections apply each commit once by its revision anyway, so a
//!   duplicate from a retry costs nothing, and a producer that fails fatally is replaced.
//! * [`KafkaStream::subscribe`] — a consumer in a consumer group, auto-commit off: the
//!   offset of a message is committed only when the projector acknowledges it, after its
//!   read-model transaction committed; `try_next` hands out what librdkafka already
//!   fetched, so a projector applies a burst as one batch and acknowledges it once.
//! * [`decode_lambda_batch`] — the commits of an `aws_lambda_events` `KafkaEvent`, for
//!   the projector under the Lambda runtime.
//! * [`mac`] — with a [`StreamKey`] configured, every message produced carries an
//!   HMAC of its value (`tally-mac`), and every consumer passes over a message without
//!   a valid one: a commit the store did not produce changes nothing.

pub mod mac;
mod marks;
pub use mac::{StreamKey, MAC_HEADER};

use async_trait::async_trait;
use aws_lambda_events::event::kafka::KafkaEvent;
use base64::Engine;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tally_es::{Delivery, EventPublisher, EventStream, PublishError, StoredCommit, Subscription};

/// Where the stream is.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `host:port[,host:port]`
    pub brokers: String,
    pub topic: String,
    /// How long a publish may wait for the broker before it fails (the outbox covers it).
    pub publish_timeout: Duration,
    /// How long the broker may hold a consumer's fetch that has no data yet
    /// (librdkafka's `fetch.wait.max.ms`, `TALLY_KAFKA_FETCH_WAIT_MS`). Kafka answers as
    /// soon as a record arrives, so there a longer wait only makes an idle consumer ask
    /// less often; tansu holds every fetch for the whole wait, so there it is also the
    /// projection's delay. Default [`DEFAULT_FETCH_WAIT`].
    pub fetch_wait: Duration,
    /// The key messages are signed and checked with; `None`: neither (a warning at
    /// start says the topic is then trusted).
    pub key: Option<StreamKey>,
}

/// [`KafkaConfig::fetch_wait`]'s default. On tansu, which holds every fetch for the
/// whole wait, it is the projection's delay and the consumers' rate: the projection lag
/// was ≈ 400 ms at librdkafka's default 500 ms, p50/p99 41/68 ms at 25 ms, and 11/18 ms
/// at 5 ms (make bench, stack, concurrency 1). At 5 ms each idle consumer asked 200
/// times a second (tansu 12–14 % of a core with the stack idle), and under load each
/// fetch carried a handful of commits: the projector's batches were small. At 20 ms the
/// stack spent 1.5–3 ms less CPU per command outside moto, and answered 20–40 % more
/// commands at c=64 (bench/README, "The consumers' fetch wait"); the lag's p50 at
/// concurrency 1 went from 18 to 35 ms.
pub const DEFAULT_FETCH_WAIT: Duration = Duration::from_millis(20);

/// librdkafka's range for `fetch.wait.max.ms`, in milliseconds: 0 would have an idle
/// consumer ask without pause, and past 5 minutes librdkafka refuses the consumer.
pub const FETCH_WAIT_RANGE_MS: std::ops::RangeInclusive<u64> = 1..=300_000;

/// `TALLY_KAFKA_FETCH_WAIT_MS`'s milliseconds as a [`KafkaConfig::fetch_wait`], within
/// [`FETCH_WAIT_RANGE_MS`].
pub fn fetch_wait_of_ms(ms: u64) -> Result<Duration, String> {
    if FETCH_WAIT_RANGE_MS.contains(&ms) {
        return Ok(Duration::from_millis(ms));
    }
    Err(format!(
        "TALLY_KAFKA_FETCH_WAIT_MS is {ms}: it must be {} to {} (ms)",
        FETCH_WAIT_RANGE_MS.start(),
        FETCH_WAIT_RANGE_MS.end()
    ))
}

impl KafkaConfig {
    /// From `TALLY_KAFKA_BROKERS`, `TALLY_KAFKA_TOPIC` (default `tally.commits`) and
    /// `TALLY_KAFKA_FETCH_WAIT_MS` (default [`DEFAULT_FETCH_WAIT`]).
    pub fn from_env() -> Result<Self, String> {
        let brokers = std::env::var("TALLY_KAFKA_BROKERS")
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or("TALLY_KAFKA_BROKERS is not set")?;
        Ok(Self {
            brokers,
            topic: std::env::var("TALLY_KAFKA_TOPIC").unwrap_or_else(|_| "tally.commits".into()),
            publish_timeout: Duration::from_secs(10),
            fetch_wait: match std::env::var("TALLY_KAFKA_FETCH_WAIT_MS") {
                Ok(ms) if !ms.is_empty() => fetch_wait_of_ms(
                    ms.parse()
                        .map_err(|e| format!("TALLY_KAFKA_FETCH_WAIT_MS `{ms}`: {e}"))?,
                )?,
                _ => DEFAULT_FETCH_WAIT,
            },
            key: std::env::var("TALLY_STREAM_KEY")
                .ok()
                .filter(|v| !v.is_empty())
                .map(|k| StreamKey::parse(&k))
                .transpose()?,
        })
    }
}

/// The Kafka stream: a producer, and subscriptions on demand.
#[derive(Clone)]
pub struct KafkaStream {
    config: KafkaConfig,
    /// Made on the first publish — a function that never publishes (a query, the
    /// projector) runs no producer's threads — and replaced by a new one when it fails
    /// fatally (see [`KafkaStream::publish`]).
    producer: std::sync::Arc<std::sync::RwLock<Option<FutureProducer>>>,
    /// The plain consumer of the topic's marks (`tally_es::packs`), made on first use.
    marks_consumer: marks::MarksConsumer,
}

fn kafka(e: KafkaError) -> PublishError {
    PublishError(e.to_string())
}

impl KafkaStream {
    /// The stream of `config`; its producer is made on the first publish, and connects
    /// then.
    pub fn new(config: KafkaConfig) -> Result<Self, PublishError> {
        Ok(Self {
            config,
            producer: std::sync::Arc::default(),
            marks_consumer: Default::default(),
        })
    }

    fn producer(config: &KafkaConfig) -> Result<FutureProducer, PublishError> {
        ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "false")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set(
                "message.timeout.ms",
                config.publish_timeout.as_millis().to_string(),
            )
            .set("socket.connection.setup.timeout.ms", "3000")
            .set("topic.metadata.refresh.interval.ms", "2000")
            .create()
            .map_err(kafka)
    }

    /// The producer, made now if this is the first publish.
    fn current(&self) -> Result<FutureProducer, PublishError> {
        if let Some(producer) = self
            .producer
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
        {
            return Ok(producer.clone());
        }
        let mut slot = self
            .producer
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(producer) = slot.as_ref() {
            return Ok(producer.clone()); // Another publish made it meanwhile.
        }
        let producer = Self::producer(&self.config)?;
        *slot = Some(producer.clone());
        Ok(producer)
    }

    /// A producer that failed fatally refuses every later message: put a new one in its
    /// place, once.
    fn renew_if_fatal(&self, failed: &FutureProducer) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut producer = self
            .producer
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if producer
            .as_ref()
            .is_none_or(|p| p.client().fatal_error().is_none())
        {
            return; // Another publish renewed it already.
        }
        match Self::producer(&self.config) {
            Ok(fresh) => {
                tracing::warn!(
                    ?code,
                    reason,
                    "the Kafka producer failed fatally; replaced it"
                );
                *producer = Some(fresh);
            }
            Err(e) => {
                tracing::error!(error = %e, "the Kafka producer failed fatally and could not be replaced")
            }
        }
    }

    /// Create the topic with `partitions` partitions if it does not exist (the init
    /// step; idempotent).
    pub async fn ensure_topic(&self, partitions: i32) -> Result<(), PublishError> {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .create()
            .map_err(kafka)?;
        let topic = NewTopic::new(&self.config.topic, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let results = admin
            .create_topics([&topic], &options)
            .await
            .map_err(kafka)?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(PublishError(format!("create topic {name}: {code}")))
                }
            }
        }
        Ok(())
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.config.topic
    }
}

fn headers(commit: &StoredCommit, payload: &[u8], key: Option<&StreamKey>) -> OwnedHeaders {
    let types: Vec<&str> = commit
        .events
        .iter()
        .map(|e| e.event_type.as_str())
        .collect();
    let versions: Vec<String> = commit
        .events
        .iter()
        .map(|e| e.version.to_string())
        .collect();
    let revision = commit.revision.to_string();
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: "event-types",
            value: Some(types.join(",").as_str()),
        })
        .insert(Header {
            key: "schema-versions",
            value: Some(versions.join(",").as_str()),
        })
        .insert(Header {
            key: "revision",
            value: Some(revision.as_str()),
        });
    if let Some(request_id) = &commit.metadata.request_id {
        headers = headers.insert(Header {
            key: "x-request-id",
            value: Some(request_id.as_str()),
        });
    }
    if let Some(key) = key {
        let mac = key.sign(payload);
        headers = headers.insert(Header {
            key: MAC_HEADER,
            value: Some(mac.as_str()),
        });
    }
    headers
}

#[async_trait]
impl EventPublisher for KafkaStream {
    async fn publish(&self, commit: &StoredCommit) -> Result<(), PublishError> {
        let payload = commit.to_bytes();
        let record = FutureRecord::to(&self.config.topic)
            .key(commit.stream.as_str())
            .payload(&payload)
            .headers(headers(commit, &payload, self.config.key.as_ref()));
        let producer = self.current()?;
        let sent = producer.send(record, Duration::ZERO).await;
        match sent {
            Ok(_) => Ok(()),
            Err((e, _)) => {
                // The commit stays in the outbox; the relay publishes it again with the
                // new producer.
                self.renew_if_fatal(&producer);
                Err(kafka(e))
            }
        }
    }
}

#[async_trait]
impl EventStream for KafkaStream {
    async fn subscribe(&self, group: &str) -> Result<Box<dyn Subscription>, PublishError> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.config.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "10000")
            // See `KafkaConfig::fetch_wait`.
            .set("fetch.wait.max.ms", fetch_wait_ms(&self.config))
            .set("topic.metadata.refresh.interval.ms", "2000")
            .create()
            .map_err(kafka)?;
        consumer
            .subscribe(&[self.config.topic.as_str()])
            .map_err(kafka)?;
        Ok(Box::new(KafkaSubscription {
            consumer: Arc::new(consumer),
            pending: BTreeMap::new(),
            unacked: false,
            key: self.config.key.clone(),
        }))
    }
}

/// [`KafkaConfig::fetch_wait`] as librdkafka takes it: whole milliseconds within
/// [`FETCH_WAIT_RANGE_MS`] (a `KafkaConfig` may be built by hand, unchecked).
fn fetch_wait_ms(config: &KafkaConfig) -> String {
    let ms = u64::try_from(config.fetch_wait.as_millis()).unwrap_or(u64::MAX);
    ms.clamp(*FETCH_WAIT_RANGE_MS.start(), *FETCH_WAIT_RANGE_MS.end())
        .to_string()
}

/// A consumer-group member. Offsets are committed by [`Subscription::ack`] — every
/// partition's, up to the last message handed out — and, while no commit handed out
/// waits for its acknowledgement, when a message is passed over.
pub struct KafkaSubscription {
    consumer: Arc<StreamConsumer>,
    /// The offset to commit per topic and partition (one past the last message handed
    /// out or passed over), for those not committed yet.
    pending: BTreeMap<(String, i32), i64>,
    /// A commit was handed out and not acknowledged yet: a message passed over meanwhile
    /// is committed with it, not before (its offset would cover the unhandled commit).
    unacked: bool,
    /// Messages without a valid MAC under it are passed over.
    key: Option<StreamKey>,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let consumer = self.consumer.clone();
            match consumer.recv().await {
                Ok(message) => {
                    if let Some(delivery) = self.accept(&message) {
                        return Some(delivery);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka receive failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// A message librdkafka already fetched: `recv` polls its queue before it waits, and
    /// a receive given up while waiting has taken nothing from it.
    async fn try_next(&mut self) -> Option<Delivery> {
        loop {
            let consumer = self.consumer.clone();
            match consumer.recv().now_or_never()? {
                Ok(message) => {
                    if let Some(delivery) = self.accept(&message) {
                        return Some(delivery);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka receive failed");
                    return None;
                }
            }
        }
    }

    async fn ack(&mut self, _commit: &StoredCommit) -> Result<(), PublishError> {
        self.unacked = false;
        self.commit_pending()
    }
}

impl KafkaSubscription {
    /// What to make of one message: the commit to hand out, or `None` when it is passed
    /// over (no valid MAC under the key, or not a commit: nothing the store accepted is
    /// lost by passing it — projections read commits from the store, not from here).
    fn accept(&mut self, message: &BorrowedMessage<'_>) -> Option<Delivery> {
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        self.pending
            .insert((topic.to_owned(), partition), offset + 1);
        if let Some(key) = &self.key {
            let mac = message.headers().and_then(|headers| {
                headers
                    .iter()
                    .find(|h| h.key == MAC_HEADER)
                    .and_then(|h| h.value)
            });
            if let Err(why) = key.verify(message.payload().unwrap_or_default(), mac) {
                mac::passed_over(why, topic, partition.into(), offset);
                self.passed_over();
                return None;
            }
        }
        match message.payload().map(StoredCommit::from_bytes) {
            Some(Ok(commit)) => {
                self.unacked = true;
                Some(Delivery::Commit(commit))
            }
            other => {
                tracing::error!(topic, partition, offset, error = ?other.map(|r| r.err()),
                    "undecodable message on the commit topic; skipping");
                self.passed_over();
                None
            }
        }
    }

    /// A message was passed over: commit its offset now unless a commit handed out
    /// before it waits for its acknowledgement.
    fn passed_over(&mut self) {
        if !self.unacked {
            if let Err(e) = self.commit_pending() {
                tracing::warn!(error = %e, "offset commit failed; the message may be delivered again");
            }
        }
    }

    /// Commit every partition's pending offset (asynchronously: a failure the broker
    /// reports later only means a redelivery, which the projections skip).
    fn commit_pending(&mut self) -> Result<(), PublishError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in std::mem::take(&mut self.pending) {
            list.add_partition_offset(&topic, partition, Offset::Offset(offset))
                .map_err(kafka)?;
        }
        self.consumer
            .commit(&list, CommitMode::Async)
            .map_err(kafka)
    }
}

/// The commits of a Lambda Kafka batch, in order per partition. A record that is not a
/// commit is an error: the batch is refused (and retried by Lambda) rather than skipped.
/// With a `key`, a record without a valid MAC is passed over (logged and counted): it
/// is not Tally's, and refusing the batch would only have Lambda deliver it again.
pub fn decode_lambda_batch(
    event: &KafkaEvent,
    key: Option<&StreamKey>,
) -> Result<Vec<StoredCommit>, String> {
    let mut partitions: Vec<_> = event.records.iter().collect();
    partitions.sort_by(|a, b| a.0.cmp(b.0));
    let mut commits = Vec::new();
    for (partition, records) in partitions {
        let mut records: Vec<_> = records.iter().collect();
        records.sort_by_key(|r| r.offset);
        for record in records {
            let value = record.value.as_deref().ok_or_else(|| {
                format!("{partition}@{:?}: record without a value", record.offset)
            })?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|e| {
                    format!("{partition}@{:?}: value is not base64: {e}", record.offset)
                })?;
            if let Some(key) = key {
                // Lambda gives header values as signed bytes.
                let mac: Option<Vec<u8>> = record
                    .headers
                    .iter()
                    .find_map(|h| h.get(MAC_HEADER))
                    .map(|v| v.iter().map(|b| *b as u8).collect());
                if let Err(why) = key.verify(&bytes, mac.as_deref()) {
                    let topic = record.topic.as_deref().unwrap_or(partition);
                    mac::passed_over(why, topic, record.partition, record.offset);
                    continue;
                }
            }
            let commit = StoredCommit::from_bytes(&bytes)
                .map_err(|e| format!("{partition}@{:?}: not a commit: {e}", record.offset))?;
            commits.push(commit);
        }
    }
    Ok(commits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafka_takes_the_fetch_wait_in_whole_milliseconds_within_its_range() {
        let wait = |fetch_wait| {
            fetch_wait_ms(&KafkaConfig {
                brokers: String::new(),
                topic: String::new(),
                publish_timeout: Duration::ZERO,
                fetch_wait,
                key: None,
            })
        };
        assert_eq!(wait(DEFAULT_FETCH_WAIT), "20");
        assert_eq!(wait(Duration::from_micros(7_900)), "7");
        assert_eq!(wait(Duration::ZERO), "1");
        assert_eq!(wait(Duration::from_secs(600)), "300000");
    }

    /// A function that never publishes (a query, the projector) runs no producer: its
    /// threads cost every process ≈ 1 % of a core while idle.
    #[tokio::test]
    async fn the_producer_is_made_on_the_first_publish() {
        let stream = KafkaStream::new(KafkaConfig {
            // Nothing listens there: the publish fails, after the producer is made.
            brokers: "127.0.0.1:1".into(),
            topic: "lazy".into(),
            publish_timeout: Duration::from_millis(300),
            fetch_wait: DEFAULT_FETCH_WAIT,
            key: None,
        })
        .unwrap();
        assert!(
            stream.producer.read().unwrap().is_none(),
            "no producer before a publish"
        );
        let commit = StoredCommit::from_bytes(
            br#"{"stream":"lazy-1","revision":1,"recorded_at":"2026-12-07T10:00:00Z","events":[{"type":"Probe","version":1,"data":{}}]}"#,
        )
        .unwrap();
        assert!(stream.publish(&commit).await.is_err(), "no broker there");
        assert!(
            stream.producer.read().unwrap().is_some(),
            "made by the publish"
        );
    }
}
