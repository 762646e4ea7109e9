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
    let client = redis.client().clone();
    let quiet = Duration::from_millis(state.config().cluster.change_probe_ms);
    let spawned = std::thread::Builder::new().name("botgate-sync".into()).spawn(move || {
        loop {
            let mut conn = match client.get_connection_with_timeout(Duration::from_secs(1)) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "The change subscription cannot connect; retrying.");
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            let _ = conn.set_write_timeout(Some(quiet));
            let mut pubsub = conn.as_pubsub();
            if pubsub.set_read_timeout(Some(quiet)).is_err() || pubsub.subscribe(CHANGES_CHANNEL).is_err() {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            // What changed while we were not subscribed is read in full.
            if tx.send(()).is_err() {
                return;
            }
            loop {
                match pubsub.get_message() {
                    Ok(_) => {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.is_timeout() => {
                        // Quiet: is the server still there? (PING is allowed while subscribed.)
                        if let Err(e) = pubsub.ping::<redis::Value>() {
                            tracing::warn!(error = %e, "The change subscription does not answer; reconnecting and reloading.");
                            break;
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
