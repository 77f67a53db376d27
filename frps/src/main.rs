common::define_pow!();

fn main() -> anyhow::Result<()> {
    common::memory::run(tokio::runtime::Builder::new_multi_thread(), serve())?
}

async fn serve() -> anyhow::Result<()> {
    let cli = frps::config_file::load().unwrap_or_else(|e| e.exit());
    match cli.command {
        Some(admin) => {
            common::telemetry::init_on_stderr("warn");
            let stdin = std::io::stdin();
            frps::admin::run(
                admin,
                &cli.config,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
                &mut stdin.lock(),
            )
            .await
        }
        None if cli.config.monitor => {
            common::telemetry::init_on_stderr("warn");
            frps::monitor::run(&cli.config, &mut std::io::stdout()).await
        }
        None => {
            let _log = common::telemetry::init(&cli.config.log);
            if let Some(limit) = common::process::raise_fd_limit() {
                tracing::info!("open-file limit: {limit}");
            }
            frps::run(cli.config).await
        }
    }
}
