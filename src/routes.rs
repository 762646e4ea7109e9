//! The public route table: every route template, with its handler, in one list, so the router
//! and the per-route metrics are built from the same source.

use axum::Router;
use axum::routing::{MethodRouter, get, post};

use crate::channel::{connector, directline, stream, turn};
use crate::state::AppState;

/// The public router's routes (without the stack) and their templates.
pub fn public(_state: &AppState) -> (Router<AppState>, Vec<&'static str>) {
    let table: Vec<(&'static str, MethodRouter<AppState>)> = vec![
        // Direct Line 3.0, for bot users.
        ("/v3/directline/tokens/generate", post(directline::generate_token)),
        ("/v3/directline/tokens/refresh", post(directline::refresh_token)),
        ("/v3/directline/conversations", post(directline::start_conversation)),
        ("/v3/directline/conversations/{id}", get(directline::resume_conversation)),
        (
            "/v3/directline/conversations/{id}/activities",
            post(turn::post_activity).get(directline::get_activities),
        ),
        ("/v3/directline/conversations/{id}/upload", post(directline::upload)),
        ("/v3/directline/conversations/{id}/stream", get(stream::stream)),
        // The website channel's token endpoint for open bots.
        ("/api/v1/bots/{bot_id}/directline/token", get(directline::open_bot_token)),
        // The connector upstream bots call back on.
        ("/connector/{key}/v3/conversations/{id}/activities", post(connector::send)),
        ("/connector/{key}/v3/conversations/{id}/activities/{reply_to}", post(connector::reply)),
    ];
    let mut router = Router::new();
    let mut templates = Vec::with_capacity(table.len());
    for (path, handler) in table {
        router = router.route(path, handler);
        templates.push(path);
    }
    (router, templates)
}
