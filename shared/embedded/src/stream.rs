//! The event stream inside one process.

use async_trait::async_trait;
use tally_es::{EventPublisher, PublishError, StoredCommit};
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

    /// A new subscriber, receiving every commit published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<StoredCommit> {
        self.sender.subscribe()
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
