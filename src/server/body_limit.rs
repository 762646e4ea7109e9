//! The request body limit, by route: uploads may be larger than every other body.
//!
//! Two `tower_http` body limits over the same router, picked by path. tower's `Steer` does the
//! same, but each clone of it allocates two collections, and the stack is cloned per connection.

use std::task::{Context, Poll};

use http::Request;
use tower::Service;
use tower_http::limit::RequestBodyLimit;

/// The limit layer's service: `uploads` for upload routes, `others` for the rest.
#[derive(Clone)]
pub struct BodyLimits<S> {
    others: RequestBodyLimit<S>,
    uploads: RequestBodyLimit<S>,
}

impl<S: Clone> BodyLimits<S> {
    /// Limits `inner`'s bodies to `limit` bytes, and upload bodies to `upload_limit`.
    pub fn new(inner: S, limit: usize, upload_limit: usize) -> Self {
        Self {
            others: RequestBodyLimit::new(inner.clone(), limit),
            uploads: RequestBodyLimit::new(inner, upload_limit),
        }
    }
}

/// `POST /v3/directline/conversations/{id}/upload`.
fn is_upload(path: &str) -> bool {
    path.len() > 37 && path.starts_with("/v3/directline/conversations/") && path.ends_with("/upload")
}

impl<S, B> Service<Request<B>> for BodyLimits<S>
where
    RequestBodyLimit<S>: Service<Request<B>>,
{
    type Response = <RequestBodyLimit<S> as Service<Request<B>>>::Response;
    type Error = <RequestBodyLimit<S> as Service<Request<B>>>::Error;
    type Future = <RequestBodyLimit<S> as Service<Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both wrap clones of one router, which is always ready.
        match self.others.poll_ready(cx) {
            Poll::Ready(Ok(())) => self.uploads.poll_ready(cx),
            other => other,
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if is_upload(req.uri().path()) { self.uploads.call(req) } else { self.others.call(req) }
    }
}

#[cfg(test)]
mod tests {
    use super::is_upload;

    #[test]
    fn only_the_upload_route_is_an_upload() {
        assert!(is_upload("/v3/directline/conversations/abc/upload"));
        assert!(!is_upload("/v3/directline/conversations/abc/activities"));
        assert!(!is_upload("/v3/directline/conversations//upload"));
        assert!(!is_upload("/api/v1/bots/x/upload"));
    }
}
