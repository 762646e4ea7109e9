//! CORS for browsers: Web Chat calls the channel from the bot owner's website.
//!
//! Preflights carry no Authorization, so they are answered for any origin here; which origins a
//! bot accepts is enforced on the real request, once the bot is known from its token.

use std::time::Duration;

use http::{HeaderName, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The CORS layer: allows the Direct Line headers explicitly (`*` would not cover
/// `Authorization`), mirrors the request's origin, and lets browsers cache preflights.
pub fn layer() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-ms-bot-agent"),
            HeaderName::from_static("x-requested-with"),
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([HeaderName::from_static("x-request-id"), header::RETRY_AFTER])
        .max_age(Duration::from_secs(600))
}
