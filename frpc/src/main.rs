use tokio_util::sync::CancellationToken;

// One thread: frpc's work is moving bytes between sockets, which one core
// does at many Gbit/s; a second worker only added cross-thread wakeups (SSE
// events came later) and a second malloc arena (benchmark case d and e).
// Blocking work (metrics, the password prompt) runs on spawn_blocking.
fn main() -> anyhow::Result<()> {
    common::memory::run(tokio::runtime::Builder::new_current_thread(), serve())?
}

async fn serve() -> anyhow::Result<()> {
    let config = frpc::config_file::load().unwrap_or_else(|e| e.exit());
    common::telemetry::init(&config.log);
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });
    frpc::run(config, shutdown).await
}
