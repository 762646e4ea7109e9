//! CORS for browsers: Web Chat calls the channel from the bot owner's website.
//!
//! Preflights carry no Authorization, so they are answered for any origin here; which origins a
//! bot accepts is enforced on the real request, once the bot is known from its token.
//!
//! A typed `Layer` + `Service` of our own rather than tower-http's `CorsLayer`: that one clones
//! its configuration on every request, about 3,000 instructions per message (4%) in the callgrind
//! profile of `benches/instructions.sh`; this one adds three constant headers to responses of
//! requests that carry an `Origin`, and does nothing for the others.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use tower::{Layer, Service};

/// The request headers browsers may send (named: `*` does not cover `Authorization`).
const ALLOW_HEADERS: &str = "authorization, content-type, x-ms-bot-agent, x-requested-with, x-request-id";
/// The methods the API uses.
const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
/// Response headers scripts may read.
const EXPOSE_HEADERS: &str = "x-request-id, retry-after";
/// How long browsers may cache a preflight, seconds.
const MAX_AGE: &str = "600";

/// The headers of a real (not preflight) response to a browser request from `origin`.
pub fn allow(h: &mut http::HeaderMap, origin: HeaderValue) {
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSE_HEADERS));
    h.append(header::VARY, HeaderValue::from_static("origin"));
}

/// Builds [`Cors`] services.
#[derive(Debug, Clone, Copy, Default)]
pub struct CorsLayer;

/// The CORS layer: mirrors the request's origin and names the allowed headers explicitly.
pub fn layer() -> CorsLayer {
    CorsLayer
}

impl<S> Layer<S> for CorsLayer {
    type Service = Cors<S>;
    fn layer(&self, inner: S) -> Cors<S> {
        Cors { inner }
    }
}

/// Answers preflights and adds the allow-origin headers to responses for browsers.
#[derive(Debug, Clone)]
pub struct Cors<S> {
    inner: S,
}

pin_project_lite::pin_project! {
    /// The response future: the inner one (a real request), or a preflight answered at once.
    pub struct CorsFuture<F, B> {
        #[pin]
        fut: Option<F>,
        origin: Option<HeaderValue>,
        preflight: Option<Response<B>>,
    }
}

impl<F, B, E> Future for CorsFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: Default,
{
    type Output = Result<Response<B>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(fut) = this.fut.as_pin_mut() else {
            return Poll::Ready(Ok(this.preflight.take().unwrap_or_default()));
        };
        let mut res = std::task::ready!(fut.poll(cx))?;
        if let Some(origin) = this.origin.take() {
            allow(res.headers_mut(), origin);
        }
        Poll::Ready(Ok(res))
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Cors<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Default,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = CorsFuture<S::Future, ResB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let origin = req.headers().get(header::ORIGIN).cloned();
        let preflight = req.method() == Method::OPTIONS
            && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if !preflight {
            return CorsFuture { fut: Some(self.inner.call(req)), origin, preflight: None };
        }
        let mut res = Response::new(ResB::default());
        *res.status_mut() = StatusCode::OK;
        let h = res.headers_mut();
        if let Some(origin) = origin {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOW_METHODS));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOW_HEADERS));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
        h.insert(
            header::VARY,
            HeaderValue::from_static("origin, access-control-request-method, access-control-request-headers"),
        );
        CorsFuture { fut: None, origin: None, preflight: Some(res) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    fn svc()
    -> Cors<impl Service<Request<()>, Response = Response<String>, Error = std::convert::Infallible> + Clone>
    {
        layer().layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::new("inner".to_string()))
        }))
    }

    #[tokio::test]
    async fn preflights_are_answered_without_reaching_the_service() {
        let req = Request::builder()
            .method(Method::OPTIONS)
            .header(header::ORIGIN, "https://shop.example")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .body(())
            .unwrap();
        let res = svc().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(res.body(), "");
        assert_eq!(res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://shop.example");
        assert!(
            res.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap().contains("authorization")
        );
    }

    #[tokio::test]
    async fn real_requests_get_the_origin_only_from_browsers() {
        let req = Request::builder().header(header::ORIGIN, "https://a.example").body(()).unwrap();
        let res = svc().oneshot(req).await.unwrap();
        assert_eq!(res.body(), "inner");
        assert_eq!(res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://a.example");
        let res = svc().oneshot(Request::new(())).await.unwrap();
        assert!(res.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
    }
}
