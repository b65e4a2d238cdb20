//! A command's stages are spans, so `TALLY_LOG_SPANS=1` with
//! `RUST_LOG=tally_app=debug` shows where its time goes (see bench/README.md).

use std::sync::{Arc, Mutex};
use tally_app::{CommandContext, CommandHandler};
use tally_domain::{Account, AccountCommand, AccountId, Currency};
use tally_embedded::{DirEventStore, InProcessStream};
use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Records the name of every span opened.
struct SpanNames(Arc<Mutex<Vec<&'static str>>>);

impl<S: tracing::Subscriber> Layer<S> for SpanNames {
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        self.0.lock().unwrap().push(attrs.metadata().name());
    }
}

#[tokio::test]
async fn a_command_opens_a_span_for_each_of_its_stages() {
    let names = Arc::new(Mutex::new(Vec::new()));
    let _subscriber = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(SpanNames(names.clone())),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DirEventStore::open(dir.path()).unwrap());
    let handler = CommandHandler::<Account>::new(store.clone(), Arc::new(InProcessStream::new(16)))
        .with_outbox(store);
    let id = AccountId::parse("spans").unwrap();
    handler
        .execute(
            id.stream_id(),
            AccountCommand::Open {
                id: id.clone(),
                currency: Currency::USD,
            },
            &CommandContext::default(),
        )
        .await
        .unwrap();
    let names = names.lock().unwrap().clone();
    for stage in [
        "command.turn",
        "command.load",
        "command.outbox_record",
        "command.append",
        "command.publish",
        "command.outbox_done",
    ] {
        assert!(names.contains(&stage), "{stage} missing from {names:?}");
    }
}
