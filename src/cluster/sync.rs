//! Control-plane reloads: a thread holds a Redis subscription to `bg:changes`; each message (and
//! each reconnection, which may have missed some) asks the reload task to re-read the store and
//! replace the licensing snapshot and the stored bots. Bursts of changes collapse into one reload.
//!
//! A half-open socket would otherwise stall reloads for good (revoked secrets and licenses
//! would keep working on this node): a subscription quiet for `cluster.change_probe_ms` sends a
//! PING, and one that does not answer within that time either is dropped, reconnected and
//! followed by a full reload. A reload that fails is retried until one succeeds. A change is
//! therefore seen within twice the probe time plus a reload, whatever the network.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::state::AppState;
use crate::store::redis::CHANGES_CHANNEL;

/// Time between attempts of a reload that failed.
const RELOAD_RETRY: Duration = Duration::from_millis(500);

/// Starts the subscription thread and the reload task; both end with the process.
pub fn start(state: AppState) {
    let Some(redis) = state.redis().cloned() else { return };
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let quiet = Duration::from_millis(state.config().cluster.change_probe_ms);
    let spawned = std::thread::Builder::new().name("botgate-sync".into()).spawn(move || {
        // On a cluster the channel is a shard channel, served by the node of its slot; a slot
        // moved elsewhere, or that node failing over, ends the subscription (the server says
        // `sunsubscribe`, or the socket drops): reconnect, where the slot is now, and reload.
        let (subscribe, message) =
            if redis.topology().sharded() { ("SSUBSCRIBE", "smessage") } else { ("SUBSCRIBE", "message") };
        loop {
            let mut conn = match redis.topology().subscriber(CHANGES_CHANNEL, quiet) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "The change subscription cannot connect; retrying.");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            let subscribed = conn
                .set_read_timeout(Some(quiet))
                .and_then(|()| redis::cmd(subscribe).arg(CHANGES_CHANNEL).exec(&mut conn));
            if let Err(e) = subscribed {
                tracing::debug!(error = %e, "The change subscription was refused; retrying.");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            // What changed while we were not subscribed is read in full.
            if tx.send(()).is_err() {
                return;
            }
            loop {
                match conn.recv_response() {
                    Ok(redis::Value::Array(parts)) => match parts.first() {
                        Some(redis::Value::BulkString(kind))
                            if kind == message.as_bytes() && tx.send(()).is_err() =>
                        {
                            return;
                        }
                        // The server ended the subscription (a shard channel's slot moved).
                        Some(redis::Value::BulkString(kind)) if kind.ends_with(b"unsubscribe") => {
                            tracing::info!("The change subscription was ended by Redis; resubscribing and reloading.");
                            break;
                        }
                        // The answer to our PING (`pong`), or a subscription's confirmation.
                        _ => {}
                    },
                    Ok(_) => {}
                    Err(e) if e.is_timeout() => {
                        // Quiet: is the server still there? (PING is allowed while subscribed;
                        // its answer arrives as a message, read by this loop.)
                        if let Err(e) = conn.send_packed_command(&redis::cmd("PING").get_packed_command()) {
                            tracing::warn!(error = %e, "The change subscription does not answer; reconnecting and reloading.");
                            break;
                        }
                        match conn.recv_response() {
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "The change subscription does not answer; reconnecting and reloading.");
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "The change subscription dropped; reconnecting and reloading.");
                        break;
                    }
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "Cannot start the change subscription; changes made on other nodes will not be seen.");
        return;
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            while rx.try_recv().is_ok() {}
            while !reload(&state).await {
                tokio::time::sleep(RELOAD_RETRY).await;
            }
        }
    });
}

/// Re-reads the control plane and applies it; returns whether it could.
pub async fn reload(state: &AppState) -> bool {
    let store = state.store().clone();
    let data = match tokio::task::spawn_blocking(move || store.load_control()).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Reloading the control plane failed; retrying.");
            return false;
        }
        Err(_) => return false,
    };
    state.licensing().reload(&data).await;
    state.authoring().reload(
        &data.bots,
        &state.channel().bots,
        state.config().upstream.max_concurrency_per_bot,
    );
    tracing::debug!("Reloaded the control plane.");
    true
}
