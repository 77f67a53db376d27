use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = frps::Cli::parse();
    match cli.command {
        Some(admin) => {
            common::telemetry::init("warn");
            let stdin = std::io::stdin();
            frps::admin::run(
                admin,
                &cli.config,
                &mut std::io::stdout(),
                &mut stdin.lock(),
            )
            .await
        }
        None => {
            common::telemetry::init(&cli.config.log);
            frps::run(cli.config).await
        }
    }
}
