use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = frps::Config::parse();
    common::telemetry::init(&config.log);
    frps::run(config).await
}
