//! What every handler can reach.

use std::sync::Arc;
use tally_app::{CommandHandler, Projector, Queries, Saga};
use tally_domain::{Account, AmountPolicy};

/// Shared state of the handlers: built once in `main`, cloned per request.
#[derive(Clone)]
pub struct AppState {
    pub commands: Arc<CommandHandler<Account>>,
    pub queries: Queries,
    pub projector: Projector,
    /// Transfers: requests, reads, and (where this process runs it) the saga.
    pub saga: Saga,
    /// Currency and maximum of amounts; the currency of new accounts.
    pub policy: AmountPolicy,
    /// How requests are authenticated.
    pub auth: crate::Auth,
    /// Seals and opens holders' personal data; `None`: no master key (holder details are
    /// refused).
    pub vault: Option<tally_vault::Vault>,
}
