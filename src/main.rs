//! `switchboard`: the command line. Parses flags, loads the config, sets up
//! logging, starts the parts and waits for Ctrl-C or SIGTERM.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use switchboard::app::{self, Mode};
use switchboard::config::{Config, LogFormat, Sources};

#[derive(Parser, Debug)]
#[command(name = "switchboard", version, about = "A Matrix calling system in one binary")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file.
    #[arg(long, global = true, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database and generated secrets).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Server name in Matrix ids.
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// HTTP listen address, e.g. 127.0.0.1:8008 (port 0 picks a free port).
    #[arg(long, global = true)]
    bind: Option<String>,
    /// Log format: human or json.
    #[arg(long, global = true)]
    log_format: Option<String>,
    /// Set any config key: --set rate_limit.login_burst=20 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    set: Vec<String>,
    /// Print the effective config (secrets masked) and exit.
    #[arg(long, global = true)]
    print_config: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Only the companion homeserver.
    Homeserver,
    /// The conference bot and the SFU, attached to another homeserver (Synapse,
    /// tuwunel, another Switchboard). Give its password in SWITCHBOARD_BOT_PASSWORD
    /// or its access token in SWITCHBOARD_BOT_ACCESS_TOKEN (or the config file).
    Bot {
        /// The homeserver's client URL, e.g. https://matrix.example.org.
        #[arg(long)]
        homeserver: String,
        /// The bot user's localpart or full user id.
        #[arg(long, default_value = "conference")]
        user: String,
    },
    /// Only the TURN relay (instead of coturn): give it the homeserver's TURN
    /// secret (turn.static_auth_secret, Synapse's turn_shared_secret).
    Turn,
}

fn sources(cli: &Cli) -> Result<Sources> {
    let mut overrides = Vec::new();
    if let Some(Command::Bot { homeserver, user }) = &cli.command {
        overrides.push(("bot.homeserver_url".to_string(), homeserver.clone()));
        let localpart = user.trim_start_matches('@').split(':').next().unwrap_or(user);
        overrides.push(("bot.localpart".to_string(), localpart.to_string()));
    }
    let mut flag = |key: &str, value: Option<String>| {
        if let Some(value) = value {
            overrides.push((key.to_string(), value));
        }
    };
    flag("data_dir", cli.data_dir.as_ref().map(|p| p.display().to_string()));
    flag("server_name", cli.server_name.clone());
    flag("http.bind", cli.bind.clone());
    flag("log.format", cli.log_format.clone());
    for pair in &cli.set {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set expects KEY=VALUE, got '{pair}'"))?;
        overrides.push((key.trim().to_string(), value.to_string()));
    }
    Ok(Sources {
        file: cli.config.clone(),
        env: std::env::vars().collect(),
        overrides,
    })
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[allow(clippy::print_stdout)]
async fn run(cli: Cli) -> Result<()> {
    let config = Config::load(&sources(&cli)?)?;
    if cli.print_config {
        print!("{}", config.to_masked_toml());
        return Ok(());
    }
    init_logging(&config);
    let mode = match cli.command {
        None => Mode::AllInOne,
        Some(Command::Homeserver) => Mode::Homeserver,
        Some(Command::Bot { .. }) => Mode::Bot,
        Some(Command::Turn) => Mode::Turn,
    };
    let mut running = app::start(config, mode).await?;
    let what = match mode {
        Mode::AllInOne => "all-in-one",
        Mode::Homeserver => "homeserver",
        Mode::Bot => "conference bot and SFU",
        Mode::Turn => "TURN relay",
    };
    println!("Switchboard is running ({what}). Open:");
    for (what, url) in running.urls() {
        println!("  {what}: {url}");
    }
    println!("Press Ctrl-C to stop.");
    tokio::select! {
        result = running.wait() => result?,
        () = shutdown_signal() => {
            tracing::info!("shutting down");
            running.shutdown().await;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: {e:#}");
            ExitCode::FAILURE
        }
    }
}
