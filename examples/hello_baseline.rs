//! A bare hyper 1 hello-world server: the baseline `benches/load.sh` compares botgate against.
//!
//! Same stack as botgate underneath (tokio multi-thread, hyper-util's auto HTTP/1+2 builder,
//! TCP_NODELAY) and nothing else: no router, no middleware, no JSON. Prints
//! `hello listening ADDR` on stdout once bound.
//!
//! `cargo run --release --example hello_baseline -- --listen 127.0.0.1:0`

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// A hello-world HTTP server for baselines.
#[derive(Parser, Debug)]
struct Args {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
}

async fn hello(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut res = Response::new(Full::new(Bytes::from_static(b"Hello, world!")));
    res.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    Ok(res)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    println!("hello listening {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of file descriptors and the like: keep serving the connections we have.
            Err(_) => continue,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service_fn(hello))
                .await;
        });
    }
}
