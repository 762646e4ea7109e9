//! A minimal Bot Framework bot for load runs (`benches/load.sh`, scenario msg_upstream): on a
//! `message` it calls back on the activity's `serviceUrl`
//! (`POST {serviceUrl}/v3/conversations/{id}/activities/{replyToId}`, an `Echo: ` reply) and
//! answers the gateway's POST once the callback is answered, as an SDK bot does; every other
//! activity is answered at once. So little work that, pinned beside the load generator, its CPU
//! stays out of the gateway's figure.
//!
//! `cargo run --release --example echo_bot -- --listen 127.0.0.1:0` prints
//! `echo-bot listening ADDR`.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// A minimal echo bot for load runs.
#[derive(Parser, Debug)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:3978")]
    listen: SocketAddr,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn answer(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    res
}

async fn turn(client: HttpClient, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::POST || req.uri().path() != "/api/messages" {
        return Ok(answer(StatusCode::NOT_FOUND, "{}"));
    }
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return Ok(answer(StatusCode::BAD_REQUEST, "{}"));
    };
    let Ok(a) = serde_json::from_slice::<Value>(&body) else {
        return Ok(answer(StatusCode::BAD_REQUEST, "{}"));
    };
    if a["type"] != "message" {
        return Ok(answer(StatusCode::OK, "{}"));
    }
    let (Some(service), Some(conv), Some(id)) =
        (a["serviceUrl"].as_str(), a["conversation"]["id"].as_str(), a["id"].as_str())
    else {
        return Ok(answer(StatusCode::BAD_REQUEST, "{}"));
    };
    let reply = json!({
        "type": "message",
        "text": format!("Echo: {}", a["text"].as_str().unwrap_or("")),
        "replyToId": id,
    });
    let url =
        format!("{}/v3/conversations/{}/activities/{}", service.trim_end_matches('/'), pct(conv), pct(id));
    let callback = Request::post(url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(reply.to_string())))
        .expect("a valid request");
    match client.request(callback).await {
        Ok(res) => {
            let ok = res.status().is_success();
            let _ = res.into_body().collect().await;
            Ok(answer(if ok { StatusCode::OK } else { StatusCode::BAD_GATEWAY }, "{}"))
        }
        Err(_) => Ok(answer(StatusCode::BAD_GATEWAY, "{}")),
    }
}

/// Percent-encodes a path segment as an SDK bot does (`|` in activity ids among others).
fn pct(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, botgate::channel::upload::UNRESERVED).to_string()
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    println!("echo-bot listening {}", listener.local_addr()?);
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| turn(client.clone(), req));
            let _ =
                auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
