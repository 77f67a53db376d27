use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::memory::return_large_blocks();
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
