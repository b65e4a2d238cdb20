//! The one route table.

use crate::handlers;
use crate::{ApiError, AppState, Who};
use axum::extract::State;
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use serde_json::{json, Value};
use tally_auth::Scope;

/// A public route: the method and path the gateway exposes, and the function that
/// serves it. Paths use `{param}` syntax (axum, matchit, cargo-lambda, OpenAPI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub function: &'static str,
    pub method: &'static str,
    pub path: &'static str,
}

/// Every public route. Everything else that routes is built from or checked against
/// this table.
pub const ROUTES: &[Route] = &[
    Route {
        function: "open-account",
        method: "POST",
        path: "/accounts",
    },
    Route {
        function: "get-account",
        method: "GET",
        path: "/accounts/{id}",
    },
    Route {
        function: "deposit",
        method: "POST",
        path: "/accounts/{id}/deposit",
    },
    Route {
        function: "withdraw",
        method: "POST",
        path: "/accounts/{id}/withdraw",
    },
    Route {
        function: "close-account",
        method: "POST",
        path: "/accounts/{id}/close",
    },
    Route {
        function: "forget-holder",
        method: "POST",
        path: "/accounts/{id}/forget",
    },
    Route {
        function: "get-balance",
        method: "GET",
        path: "/accounts/{id}/balance",
    },
    Route {
        function: "list-transactions",
        method: "GET",
        path: "/accounts/{id}/transactions",
    },
    Route {
        function: "list-transactions",
        method: "GET",
        path: "/accounts/{id}/statement",
    },
    Route {
        function: "transfer",
        method: "POST",
        path: "/transfers",
    },
    Route {
        function: "get-transfer",
        method: "GET",
        path: "/transfers/{id}",
    },
];

/// The projector's operational routes (not public, not behind the gateway).
pub const PROJECTOR_ROUTES: &[Route] = &[
    Route {
        function: "projector",
        method: "POST",
        path: "/projector/catch-up",
    },
    Route {
        function: "projector",
        method: "POST",
        path: "/projector/rebuild",
    },
];

fn handler(route: &Route) -> MethodRouter<AppState> {
    match (route.function, route.path) {
        ("open-account", _) => post(handlers::open_account::handle),
        ("get-account", _) => get(handlers::get_account::handle),
        ("deposit", _) => post(handlers::deposit::handle),
        ("withdraw", _) => post(handlers::withdraw::handle),
        ("close-account", _) => post(handlers::close_account::handle),
        ("forget-holder", _) => post(handlers::forget_holder::handle),
        ("get-balance", _) => get(handlers::get_balance::handle),
        ("list-transactions", "/accounts/{id}/transactions") => {
            get(handlers::list_transactions::handle)
        }
        ("list-transactions", "/accounts/{id}/statement") => get(handlers::get_statement::handle),
        ("transfer", _) => post(handlers::request_transfer::handle),
        ("get-transfer", _) => get(handlers::get_transfer::handle),
        ("projector", "/projector/catch-up") => post(catch_up),
        ("projector", "/projector/rebuild") => post(rebuild),
        (function, path) => unreachable!("route table names {function} {path} without a handler"),
    }
}

/// A router of the routes (public and projector) for which `include` is true, each
/// behind the bearer-token check ([`crate::auth::authenticate`]).
pub fn router(state: AppState, include: impl Fn(&Route) -> bool) -> Router {
    let mut router = Router::new();
    for route in ROUTES.iter().chain(PROJECTOR_ROUTES).filter(|r| include(r)) {
        router = router.route(route.path, handler(route));
    }
    protect(router, state.auth.clone()).with_state(state)
}

/// `router`'s routes behind the bearer-token check (`/healthz`, `/readyz` and
/// `/metrics`, added later by the runtime, stay open). A router without routes (the
/// saga's: it serves only those) is returned as it is.
pub fn protect<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    auth: crate::Auth,
) -> Router<S> {
    if !router.has_routes() {
        return router;
    }
    router.route_layer(axum::middleware::from_fn_with_state(
        auth,
        crate::auth::authenticate,
    ))
}

/// Every function name, from the tables.
pub fn functions() -> Vec<&'static str> {
    let mut names: Vec<_> = ROUTES
        .iter()
        .chain(PROJECTOR_ROUTES)
        .map(|r| r.function)
        .collect();
    names.dedup();
    names
}

async fn catch_up(State(state): State<AppState>, who: Who) -> Result<Json<Value>, ApiError> {
    who.require(Scope::Ops)?;
    let report = state
        .projector
        .catch_up_all()
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(Json(
        json!({"streams": report.streams, "commits_applied": report.commits}),
    ))
}

async fn rebuild(State(state): State<AppState>, who: Who) -> Result<Json<Value>, ApiError> {
    who.require(Scope::Ops)?;
    let report = state.projector.rebuild().await.map_err(|e| match e {
        tally_app::ProjectionError::RebuildRunning => ApiError::RebuildRunning,
        e => ApiError::Unavailable(e.to_string()),
    })?;
    Ok(Json(json!({
        "streams": report.streams, "commits": report.commits, "events": report.events,
        "packed": report.packed, "after_pack": report.after_pack
    })))
}
