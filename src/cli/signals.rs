//! SIGINT and SIGTERM: the first cancels the shutdown token (in-flight
//! work drains), the second exits at once.

use tokio_util::sync::CancellationToken;

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.
pub(super) async fn forward_signals(shutdown: CancellationToken) {
    let mut signals = 0;
    loop {
        if wait_for_signal().await.is_err() {
            return;
        }
        signals += 1;
        if signals == 1 {
            tracing::info!("shutdown requested; send the signal again to exit at once");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal; exiting without waiting for in-flight work");
            std::process::exit(130);
        }
    }
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}
