//! The `botgate` command: serve (the default), check a configuration file, print a token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use botgate::clock::SystemClock;
use botgate::config::Config;
use botgate::telemetry::{LogFormat, init_tracing};
use clap::{Args, Parser, Subcommand};

/// botgate: a Direct Line 3.0 gateway in front of chat bots, with licensing and exact metering.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the gateway (the default when no command is given).
    Serve(ServeArgs),
    /// Validate a configuration file and exit: 0 when valid, 1 naming the key when not.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// Configuration file (TOML). Default: the embedded config/default.toml.
    #[arg(long, short = 'c', env = "BOTGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Public listen address, overriding `server.listen`.
    #[arg(long, env = "BOTGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin (metrics, health) listen address, overriding `server.admin_listen`.
    #[arg(long, env = "BOTGATE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Data folder, overriding `store.data_dir`.
    #[arg(long, env = "BOTGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Log line format on stderr; filter with RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "BOTGATE_LOG_FORMAT")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match Config::load(&file) {
            Ok(_) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Serve(args)) => serve(args),
        None => serve(cli.serve),
    }
}

fn load_config(args: &ServeArgs) -> Result<Config, String> {
    let mut config = match &args.config {
        Some(path) => Config::load(path),
        None => Config::embedded_default(),
    }
    .map_err(|e| e.to_string())?;
    if let Some(a) = args.listen {
        config.server.listen = a;
    }
    if let Some(a) = args.admin_listen {
        config.server.admin_listen = a;
    }
    if let Some(d) = &args.data_dir {
        config.store.data_dir = d.clone();
    }
    Ok(config)
}

fn serve(args: ServeArgs) -> ExitCode {
    init_tracing(args.log_format);
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("botgate: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("botgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(botgate::server::run(config, Arc::new(SystemClock))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("botgate: cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}
