//! Several nodes sharing one Redis: the heartbeat that renews this node's leases and
//! registration, the node registry used to forward requests to a conversation's owner, and the
//! subscription that reloads the control plane when another node changes it.

use crate::state::AppState;

/// Renews this node's capacity leases (reading each tenant's use across nodes for the gauges).
pub async fn heartbeat(state: &AppState) {
    let metering = state.metering().clone();
    let Some(leases) = metering.leases().cloned() else { return };
    let pools = metering.pools();
    let month = metering.current_month();
    match tokio::task::spawn_blocking(move || leases.renew_blocking(&pools, month)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "Renewing capacity leases failed; retrying at the next heartbeat.")
        }
        Err(e) => tracing::warn!(error = %e, "The lease heartbeat panicked."),
    }
}
