//! The event stream inside one process.

use async_trait::async_trait;
use tally_es::{Delivery, EventPublisher, EventStream, PublishError, StoredCommit, Subscription};
use tokio::sync::broadcast;

/// A broadcast channel of commits. A subscriber that falls behind by more than the
/// channel's capacity is told it lagged, and catches up from the store.
#[derive(Clone)]
pub struct InProcessStream {
    sender: broadcast::Sender<StoredCommit>,
}

impl InProcessStream {
    /// A stream buffering up to `capacity` commits per subscriber.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        Self { sender }
    }

    /// A new receiver, getting every commit published from now on.
    pub fn receiver(&self) -> broadcast::Receiver<StoredCommit> {
        self.sender.subscribe()
    }
}

/// A subscription to an [`InProcessStream`]. In one process every subscriber is its own
/// group; there are no offsets to store, so `ack` does nothing.
pub struct InProcessSubscription(broadcast::Receiver<StoredCommit>);

#[async_trait]
impl Subscription for InProcessSubscription {
    async fn next(&mut self) -> Option<Delivery> {
        match self.0.recv().await {
            Ok(commit) => Some(Delivery::Commit(commit)),
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Delivery::Lagged { missed }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    async fn try_next(&mut self) -> Option<Delivery> {
        match self.0.try_recv() {
            Ok(commit) => Some(Delivery::Commit(commit)),
            Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                Some(Delivery::Lagged { missed })
            }
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed) => {
                None
            }
        }
    }

    async fn ack(&mut self, _commit: &StoredCommit) -> Result<(), PublishError> {
        Ok(())
    }
}

#[async_trait]
impl EventStream for InProcessStream {
    async fn subscribe(&self, _group: &str) -> Result<Box<dyn Subscription>, PublishError> {
        Ok(Box::new(InProcessSubscription(self.receiver())))
    }
}

#[async_trait]
impl EventPublisher for InProcessStream {
    async fn publish(&self, commit: &StoredCommit) -> Result<(), PublishError> {
        // No subscriber is not an error: projections catch up from the store.
        let _ = self.sender.send(commit.clone());
        Ok(())
    }
}
