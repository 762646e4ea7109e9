//! The public route table: every route template, with its handler, in one list, so the router
//! and the per-route metrics are built from the same source.

use axum::Router;
use axum::routing::{MethodRouter, get, post, put};

use crate::authoring::{bots, me, reports};
use crate::channel::{connector, directline, stream, turn, upload};
use crate::console;
use crate::licensing::layer::AuthorLayer;
use crate::licensing::{admin, operator};
use crate::notify::api as webhooks;
use crate::state::AppState;

/// The public router's routes (without the stack) and their templates.
pub fn public(state: &AppState) -> (Router<AppState>, Vec<&'static str>) {
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
        ("/v3/directline/conversations/{id}/upload", post(upload::upload)),
        ("/v3/directline/attachments/{conversation}/{key}", get(upload::file)),
        ("/v3/directline/conversations/{id}/stream", get(stream::stream)),
        // The website channel's token endpoint for open bots.
        ("/api/v1/bots/{bot_id}/directline/token", get(directline::open_bot_token)),
        // The connector upstream bots call back on.
        ("/connector/{key}/v3/conversations/{id}/activities", post(connector::send)),
        ("/connector/{key}/v3/conversations/{id}/activities/{reply_to}", post(connector::reply)),
        // The web console (its page signs in with a bearer token and calls the APIs below).
        ("/console", get(console::index)),
        ("/console/{file}", get(console::asset)),
        ("/api/v1/dev/token", post(console::dev_token)),
        ("/api/v1/openapi.json", get(crate::openapi::openapi_json)),
        // The platform operator (its own credentials, not the author layer).
        ("/api/v1/operator/tenants", get(operator::list_tenants).post(operator::create_tenant)),
        ("/api/v1/operator/tenants/{tenant_id}", get(operator::get_tenant)),
        ("/api/v1/operator/tenants/{tenant_id}/subscriptions", post(operator::add_subscription)),
        (
            "/api/v1/operator/tenants/{tenant_id}/subscriptions/{subscription_id}/end",
            post(operator::end_subscription),
        ),
        (
            "/api/v1/operator/tenants/{tenant_id}/subscriptions/{subscription_id}/cancel",
            post(operator::cancel_subscription),
        ),
    ];
    // Authors and admins: every route behind the author layer (JWT, then license resolution).
    let authoring: Vec<(&'static str, MethodRouter<AppState>)> = vec![
        ("/api/v1/me", get(me::me)),
        ("/api/v1/trial", post(me::start_trial)),
        ("/api/v1/trial/extend", post(me::extend_trial)),
        ("/api/v1/bots", get(bots::list).post(bots::create)),
        ("/api/v1/bots/{bot_id}", get(bots::get).patch(bots::patch).delete(bots::delete)),
        ("/api/v1/bots/{bot_id}/publish", post(bots::publish)),
        ("/api/v1/bots/{bot_id}/unpublish", post(bots::unpublish)),
        ("/api/v1/bots/{bot_id}/secrets", get(bots::list_secrets)),
        ("/api/v1/bots/{bot_id}/secrets/{slot}/regenerate", post(bots::regenerate)),
        ("/api/v1/bots/{bot_id}/testchat", post(me::test_chat)),
        ("/api/v1/bots/{bot_id}/analytics", get(reports::analytics)),
        ("/api/v1/bots/{bot_id}/editors/{user_id}", put(bots::add_editor).delete(bots::remove_editor)),
        ("/api/v1/admin/subscriptions", get(admin::list_subscriptions).post(admin::add_subscription)),
        ("/api/v1/admin/licenses", get(admin::licenses)),
        ("/api/v1/admin/licenses/users/{user_id}", put(admin::assign_user).delete(admin::remove_user)),
        ("/api/v1/admin/licenses/groups/{group_id}", put(admin::assign_group).delete(admin::remove_group)),
        ("/api/v1/admin/settings", get(admin::settings).patch(admin::patch_settings)),
        ("/api/v1/admin/audit", get(admin::audit)),
        ("/api/v1/admin/usage", get(reports::tenant_usage)),
        ("/api/v1/admin/usage/daily", get(reports::tenant_daily)),
        ("/api/v1/admin/usage/monthly", get(reports::tenant_monthly)),
        ("/api/v1/admin/trials", get(admin::trials)),
        ("/api/v1/admin/webhooks", get(webhooks::list).post(webhooks::create)),
        ("/api/v1/admin/webhooks/deliveries", get(webhooks::deliveries)),
        ("/api/v1/admin/webhooks/events", get(webhooks::events)),
        (
            "/api/v1/admin/webhooks/{endpoint_id}",
            get(webhooks::get).patch(webhooks::patch).delete(webhooks::delete),
        ),
        ("/api/v1/admin/webhooks/{endpoint_id}/rotate", post(webhooks::rotate)),
        ("/api/v1/admin/webhooks/{endpoint_id}/test", post(webhooks::test)),
        ("/api/v1/bots/{bot_id}/usage/daily", get(reports::bot_daily)),
    ];
    let mut templates = Vec::with_capacity(table.len() + authoring.len());
    let mut router = Router::new();
    for (path, handler) in table {
        router = router.route(path, handler);
        templates.push(path);
    }
    let mut authored = Router::new();
    for (path, handler) in authoring {
        authored = authored.route(path, handler);
        templates.push(path);
    }
    let authored =
        authored.route_layer(AuthorLayer::new(state.verifier().clone(), state.licensing().clone()));
    (router.merge(authored), templates)
}
