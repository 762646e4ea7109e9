//! The public route table: every route template, with its handler, in one list, so the router
//! and the per-route metrics are built from the same source.

use axum::Router;
use axum::routing::MethodRouter;

use crate::state::AppState;

/// The public router's routes (without the stack) and their templates.
pub fn public(state: &AppState) -> (Router<AppState>, Vec<&'static str>) {
    let _ = state;
    let table: Vec<(&'static str, MethodRouter<AppState>)> = Vec::new();
    let mut router = Router::new();
    let mut templates = Vec::with_capacity(table.len());
    for (path, handler) in table {
        router = router.route(path, handler);
        templates.push(path);
    }
    (router, templates)
}
