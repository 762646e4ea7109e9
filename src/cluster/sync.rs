//! Control-plane reloads: a thread holds a Redis subscription to `bg:changes`; each message (and
//! each reconnection, which may have missed some) asks the reload task to re-read the store and
//! replace the licensing snapshot and the stored bots. Bursts of changes collapse into one reload.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::state::AppState;
use crate::store::redis::CHANGES_CHANNEL;

/// Starts the subscription thread and the reload task; both end with the process.
pub fn start(state: AppState) {
    let Some(redis) = state.redis().cloned() else { return };
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let client = redis.client().clone();
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
            let mut pubsub = conn.as_pubsub();
            if pubsub.subscribe(CHANGES_CHANNEL).is_err() {
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
            reload(&state).await;
        }
    });
}

/// Re-reads the control plane and applies it.
pub async fn reload(state: &AppState) {
    let store = state.store().clone();
    let data = match tokio::task::spawn_blocking(move || store.load_control()).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "Reloading the control plane failed; the next change retries.");
            return;
        }
        Err(_) => return,
    };
    state.licensing().reload(&data).await;
    state.authoring().reload(
        &data.bots,
        &state.channel().bots,
        state.config().upstream.max_concurrency_per_bot,
    );
    tracing::debug!("Reloaded the control plane.");
}
