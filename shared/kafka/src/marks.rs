//! The commit topic's side of a pack (`tally_es::packs`): each partition's end with the
//! message before it, and the streams the messages since a pack's marks name. A plain
//! consumer with no group (nothing is committed), assigned partitions and offsets.

use crate::KafkaStream;
use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tally_es::packs::{Mark, TopicMarks};
use tally_es::{PublishError, Revision, StreamId};

/// How long one question to the broker may take.
const ASK: Duration = Duration::from_secs(5);
/// How long reading a tail may take in all (a broker down the whole time: then the
/// packer tries again later, and a rebuild reads every stream).
const READ_FOR: Duration = Duration::from_secs(30);

/// An error of the connection to the broker, which the client recovers from.
fn transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
    )
}

fn failed(what: &str, e: impl std::fmt::Display) -> PublishError {
    PublishError(format!("{what}: {e}"))
}

/// The plain consumer a stream keeps for its marks (made on first use).
pub(crate) type MarksConsumer = std::sync::Arc<std::sync::Mutex<Option<BaseConsumer>>>;

/// A reader of `topic`: its partitions, with each one's (low, high) watermarks.
struct Reader<'a> {
    consumer: &'a BaseConsumer,
    topic: String,
    ends: BTreeMap<i32, (i64, i64)>,
}

impl KafkaStream {
    /// Run `task` with this stream's plain consumer, on a thread that may block.
    async fn with_consumer<T: Send + 'static>(
        &self,
        task: impl FnOnce(&BaseConsumer, &str) -> Result<T, PublishError> + Send + 'static,
    ) -> Result<T, PublishError> {
        let (held, brokers, topic) = (
            self.marks_consumer.clone(),
            self.config.brokers.clone(),
            self.config.topic.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut held = held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if held.is_none() {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", "tally-pack-marks")
                    .set("enable.auto.commit", "false")
                    .set("enable.partition.eof", "false")
                    // tansu holds a fetch for the whole wait even when it has the
                    // records (see `subscribe`): 500 ms by default, per read.
                    .set("fetch.wait.max.ms", "5")
                    .create()
                    .map_err(|e| failed("a consumer", e))?;
                *held = Some(consumer);
            }
            task(held.as_ref().expect("made above"), &topic)
        })
        .await
        .map_err(|e| PublishError(e.to_string()))?
    }
}

impl<'a> Reader<'a> {
    fn open(consumer: &'a BaseConsumer, topic: &str) -> Result<Self, PublishError> {
        let metadata = consumer
            .fetch_metadata(Some(topic), ASK)
            .map_err(|e| failed(&format!("metadata of {topic}"), e))?;
        let mut ends = BTreeMap::new();
        for t in metadata.topics() {
            if let Some(e) = t.error() {
                return Err(failed(&format!("metadata of {topic}"), format!("{e:?}")));
            }
            for p in t.partitions() {
                let marks = consumer
                    .fetch_watermarks(topic, p.id(), ASK)
                    .map_err(|e| failed(&format!("watermarks of {topic}/{}", p.id()), e))?;
                ends.insert(p.id(), marks);
            }
        }
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            ends,
        })
    }

    /// Read each partition in `from` from its offset to its end (as `open` found it),
    /// handing each message's partition, offset, stream and revision to `seen`.
    fn read(
        &self,
        from: &BTreeMap<i32, i64>,
        mut seen: impl FnMut(i32, i64, Option<StreamId>, Option<Revision>) -> Result<(), PublishError>,
    ) -> Result<(), PublishError> {
        let mut assignment = TopicPartitionList::new();
        let mut remaining = BTreeMap::new();
        for (&p, &offset) in from {
            let high = self.ends.get(&p).map_or(0, |e| e.1);
            if offset < high {
                assignment
                    .add_partition_offset(&self.topic, p, Offset::Offset(offset))
                    .map_err(|e| failed("an assignment", e))?;
                remaining.insert(p, high);
            }
        }
        if remaining.is_empty() {
            return Ok(());
        }
        self.consumer
            .assign(&assignment)
            .map_err(|e| failed("an assignment", e))?;
        let deadline = Instant::now() + READ_FOR;
        let read = (|| {
            while !remaining.is_empty() {
                if Instant::now() > deadline {
                    return Err(PublishError(format!(
                        "{}: partitions {:?} not read to their end within {READ_FOR:?}",
                        self.topic,
                        remaining.keys().collect::<Vec<_>>()
                    )));
                }
                let Some(message) = self.consumer.poll(Duration::from_millis(500)) else {
                    continue;
                };
                let message = match message {
                    Ok(message) => message,
                    // The client reconnects by itself: a broker that was down (now, or
                    // when this consumer last read: the events wait in its queue) only
                    // delays the read, up to the deadline.
                    Err(KafkaError::MessageConsumption(code)) if transient(code) => {
                        tracing::debug!(?code, topic = %self.topic, "the broker is not answering yet");
                        continue;
                    }
                    Err(e) => return Err(failed(&format!("reading {}", self.topic), e)),
                };
                let (p, offset) = (message.partition(), message.offset());
                let stream = message
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .and_then(|k| StreamId::parse(k).ok());
                let revision = message.headers().and_then(|headers| {
                    headers
                        .iter()
                        .find(|h| h.key == "revision")
                        .and_then(|h| h.value)
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(|v| v.parse::<u64>().ok())
                });
                seen(p, offset, stream, revision.map(Revision::new))?;
                if remaining.get(&p).is_some_and(|high| offset + 1 >= *high) {
                    remaining.remove(&p);
                }
            }
            Ok(())
        })();
        // Not left fetching in the background.
        let _ = self.consumer.unassign();
        read
    }
}

fn marks_now(consumer: &BaseConsumer, topic: &str) -> Result<Vec<Mark>, PublishError> {
    let reader = Reader::open(consumer, topic)?;
    let mut marks: BTreeMap<i32, Mark> = reader
        .ends
        .iter()
        .map(|(&partition, &(_, high))| {
            (
                partition,
                Mark {
                    partition,
                    offset: high,
                    before: None,
                },
            )
        })
        .collect();
    let before: BTreeMap<i32, i64> = marks
        .values()
        .filter(|m| m.offset > 0)
        .map(|m| (m.partition, m.offset - 1))
        .collect();
    reader.read(&before, |p, offset, stream, revision| {
        if let Some(mark) = marks.get_mut(&p) {
            if offset + 1 == mark.offset {
                mark.before = stream.zip(revision);
            }
        }
        Ok(())
    })?;
    if let Some(m) = marks.values().find(|m| m.offset > 0 && m.before.is_none()) {
        return Err(PublishError(format!(
            "{topic}/{}: the message before offset {} names no commit",
            m.partition, m.offset
        )));
    }
    Ok(marks.into_values().collect())
}

fn streams_since_now(
    consumer: &BaseConsumer,
    topic: &str,
    marks: &[Mark],
) -> Result<Option<BTreeSet<StreamId>>, PublishError> {
    let reader = Reader::open(consumer, topic)?;
    let by_partition: BTreeMap<i32, &Mark> = marks.iter().map(|m| (m.partition, m)).collect();
    if by_partition.keys().any(|p| !reader.ends.contains_key(p)) {
        return Ok(None); // A partition the marks name is gone.
    }
    if marks.iter().any(|m| m.offset > 0 && m.before.is_none()) {
        return Ok(None); // A mark that cannot be checked.
    }
    let mut from = BTreeMap::new();
    for (&p, &(low, high)) in &reader.ends {
        // A partition added since the pack: read from its start.
        let start = by_partition.get(&p).map_or(0, |m| (m.offset - 1).max(0));
        let offset = by_partition.get(&p).map_or(0, |m| m.offset);
        if offset > high || low > start {
            return Ok(None); // The topic went back, or retention took the mark.
        }
        if start < high {
            from.insert(p, start);
        }
    }
    let mut streams = BTreeSet::new();
    let mut checked: BTreeSet<i32> = BTreeSet::new();
    let mut borne_out = true;
    reader.read(&from, |p, offset, stream, revision| {
        let mark = by_partition.get(&p);
        match mark.and_then(|m| m.before.as_ref().map(|b| (m.offset, b))) {
            Some((at, before)) if !checked.contains(&p) => {
                checked.insert(p);
                let message = stream.clone().zip(revision);
                if offset + 1 != at || message.as_ref() != Some(before) {
                    borne_out = false;
                }
                if offset + 1 == at {
                    return Ok(());
                }
            }
            _ => {}
        }
        // Any message's stream, whatever else it carries: a name too many costs a read.
        if let Some(stream) = stream {
            streams.insert(stream);
        }
        Ok(())
    })?;
    Ok(borne_out.then_some(streams))
}

#[async_trait]
impl TopicMarks for KafkaStream {
    fn topic(&self) -> &str {
        &self.config.topic
    }

    async fn ends(&self) -> Result<Vec<(i32, i64)>, PublishError> {
        self.with_consumer(|consumer, topic| {
            let reader = Reader::open(consumer, topic)?;
            Ok(reader
                .ends
                .iter()
                .map(|(&p, &(_, high))| (p, high))
                .collect())
        })
        .await
    }

    async fn marks(&self) -> Result<Vec<Mark>, PublishError> {
        self.with_consumer(marks_now).await
    }

    async fn streams_since(
        &self,
        marks: &[Mark],
    ) -> Result<Option<BTreeSet<StreamId>>, PublishError> {
        let marks = marks.to_vec();
        self.with_consumer(move |consumer, topic| streams_since_now(consumer, topic, &marks))
            .await
    }
}
