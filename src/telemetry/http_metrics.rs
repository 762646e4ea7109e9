//! HTTP request counters and a latency histogram per route template.
//!
//! A typed `Layer` + `Service` pair because it sits on every request. The per-route handles are
//! resolved once at start-up for every route template, so a request does one read-only map
//! lookup and two atomic updates: no label hashing inside prometheus, no lock, no allocation.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::MatchedPath;
use http::{Request, Response};
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts};
use tower::{Layer, Service};

use super::registry::Metrics;

/// The label value for requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// Handles of one route: a counter per status class (1xx..5xx) and a latency histogram.
#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [IntCounter; 5],
    latency: Histogram,
}

type RouteHandles = RouteMetrics;

impl RouteMetrics {
    /// Counts an answer with `status`, timed from `start`.
    pub fn observe(&self, status: http::StatusCode, start: Instant) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.latency.observe(start.elapsed().as_secs_f64());
    }
}

/// Resolved handles for every route; read-only after start-up.
#[derive(Clone)]
pub struct HttpMetricsLayer {
    routes: Arc<HashMap<&'static str, RouteHandles>>,
}

impl HttpMetricsLayer {
    /// Registers `botgate_http_requests_total{route,status}` and
    /// `botgate_http_request_duration_seconds{route}` and resolves the handles of `routes`
    /// (route templates as given to the router) plus `unmatched`.
    pub fn new(metrics: &Metrics, routes: &[&'static str]) -> Result<Self, prometheus::Error> {
        let counter = IntCounterVec::new(
            Opts::new(
                "botgate_http_requests_total",
                "HTTP requests answered, by route template and status class.",
            ),
            &["route", "status"],
        )?;
        let histogram = HistogramVec::new(
            HistogramOpts::new(
                "botgate_http_request_duration_seconds",
                "Time from request to response head, by route template.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                5.0, 15.0,
            ]),
            &["route"],
        )?;
        metrics.registry().register(Box::new(counter.clone()))?;
        metrics.registry().register(Box::new(histogram.clone()))?;
        let mut map = HashMap::new();
        for route in routes.iter().copied().chain([UNMATCHED]) {
            let by_class =
                ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| counter.with_label_values(&[route, c]));
            let latency = histogram.with_label_values(&[route]);
            map.insert(route, RouteHandles { by_class, latency });
        }
        Ok(Self { routes: Arc::new(map) })
    }

    /// The handles of one route template given at start-up.
    pub fn route(&self, template: &str) -> Option<RouteMetrics> {
        self.routes.get(template).cloned()
    }
}

impl<S> Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        HttpMetrics { inner, routes: self.routes.clone() }
    }
}

/// The service [`HttpMetricsLayer`] builds.
#[derive(Clone)]
pub struct HttpMetrics<S> {
    inner: S,
    routes: Arc<HashMap<&'static str, RouteHandles>>,
}

pin_project_lite::pin_project! {
    /// The response future: counts and times the response when it is ready (no allocation).
    pub struct CountedFuture<F> {
        #[pin]
        inner: F,
        handles: Option<Arc<HashMap<&'static str, RouteHandles>>>,
        key: &'static str,
        start: Instant,
    }
}

impl<F, RB, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx));
        if let (Ok(res), Some(routes)) = (&res, this.handles.take())
            && let Some(h) = routes.get(*this.key)
        {
            h.observe(res.status(), *this.start);
        }
        Poll::Ready(res)
    }
}

impl<S, B, RB> Service<Request<B>> for HttpMetrics<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str()).unwrap_or(UNMATCHED);
        // Unknown templates (none exist: every route is listed at start-up) count as unmatched.
        let routes = self.routes.clone();
        let key: &'static str = routes.get_key_value(route).map(|(k, _)| *k).unwrap_or(UNMATCHED);

        let start = Instant::now();
        CountedFuture { inner: self.inner.call(req), handles: Some(routes), key, start }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn counts_by_route_and_class() {
        let metrics = Metrics::new();
        let layer = HttpMetricsLayer::new(&metrics, &["/x"]).unwrap();
        let svc = layer.layer(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, std::convert::Infallible>(Response::builder().status(404).body(()).unwrap())
        }));
        svc.clone().oneshot(Request::new(())).await.unwrap();
        svc.oneshot(Request::new(())).await.unwrap();
        let text = metrics.encode();
        assert!(text.contains(r#"botgate_http_requests_total{route="unmatched",status="4xx"} 2"#), "{text}");
        assert!(
            text.contains(r#"botgate_http_request_duration_seconds_count{route="unmatched"} 2"#),
            "{text}"
        );
    }
}
