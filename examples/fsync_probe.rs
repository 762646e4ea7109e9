//! The machine's durable-write latency, for `benches/load.sh`: appends a small record to a file
//! in the given folder and `fdatasync`s it, as fast as it can for the given seconds, and prints
//! the latency of each append plus sync as percentiles. The ledger's commit cannot be faster
//! than this; the message that begins a billed session waits for one such commit.
//!
//!   cargo run --release --example fsync_probe -- --dir /tmp --seconds 5

use std::fs::OpenOptions;
use std::io::Write;
use std::time::{Duration, Instant};

fn main() {
    let mut dir = std::env::temp_dir();
    let mut seconds = 5.0_f64;
    let mut record = 256_usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next();
        match (a.as_str(), value) {
            ("--dir", Some(v)) => dir = v.into(),
            ("--seconds", Some(v)) => seconds = v.parse().unwrap_or(seconds),
            ("--bytes", Some(v)) => record = v.parse().unwrap_or(record),
            _ => {
                eprintln!("usage: fsync_probe [--dir DIR] [--seconds S] [--bytes N]");
                std::process::exit(2);
            }
        }
    }
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut file = match OpenOptions::new().create_new(true).append(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fsync_probe: cannot create {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    let buf = vec![b'x'; record];
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).expect("bounds");
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut failed = None;
    while Instant::now() < until {
        let t = Instant::now();
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            failed = Some(e);
            break;
        }
        let _ = hist.record((t.elapsed().as_micros() as u64).clamp(1, 10_000_000));
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    if let Some(e) = failed {
        eprintln!("fsync_probe: write or fdatasync failed: {e}");
        std::process::exit(1);
    }
    println!(
        "fsync_probe bytes={record} n={} p50_us={} p90_us={} p99_us={} p999_us={} max_us={}",
        hist.len(),
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
}
