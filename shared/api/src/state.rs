//! What every handler can reach.

use std::sync::Arc;
use tally_app::{CommandHandler, Projector, Queries};
use tally_domain::{Account, AmountPolicy};

/// Shared state of the handlers: built once in `main`, cloned per request.
#[derive(Clone)]
pub struct AppState {
    pub commands: Arc<CommandHandler<Account>>,
    pub queries: Queries,
    pub projector: Projector,
    /// Currency and maximum of amounts; the currency of new accounts.
    pub policy: AmountPolicy,
}
