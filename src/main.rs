//! The `botgate` command: serve (the default), check a configuration file, print a token or a
//! new operator key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use botgate::clock::SystemClock;
use botgate::config::{Config, StoreBackend};
use botgate::telemetry::{LogFormat, init_tracing};
use clap::{Args, Parser, Subcommand};

/// mimalloc instead of the system allocator: a message allocates a few dozen small buffers
/// (headers, JSON values, activity strings), and under load glibc's malloc and free were a
/// quarter of the server's CPU (a `perf record` of `benches/load.sh`'s msg_sys scenario; see
/// BENCHMARKS.md for the before and after).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Print an author token signed by the development issuer (HS256 key in the data folder).
    Token(TokenArgs),
    /// Print a new random operator API key and the SHA-256 to list in `operator.api_key_sha256`.
    OperatorKey,
}

#[derive(Args, Debug)]
struct TokenArgs {
    /// Tenant id (`tid`).
    #[arg(long)]
    tenant: String,
    /// User id (`oid`).
    #[arg(long)]
    user: String,
    /// Display name (`name`).
    #[arg(long)]
    name: Option<String>,
    /// A group id (`groups`); repeat for several.
    #[arg(long = "group")]
    groups: Vec<String>,
    /// Add the TenantAdmin role.
    #[arg(long)]
    admin: bool,
    /// Add the PlatformOperator role (accepted where `operator.jwt_role` is on).
    #[arg(long)]
    operator: bool,
    /// Lifetime: 90s, 30m, 1h, 2d.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Configuration file (for the issuer, audience and data folder). Default: the embedded one.
    #[arg(long, short = 'c', env = "BOTGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data folder holding the development key, overriding `store.data_dir`.
    #[arg(long, env = "BOTGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
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
            // The files the configuration names are read as at start.
            Ok(c) => match botgate::identity::jwt::Verifier::new(&c.identity, None, Arc::new(SystemClock)) {
                Ok(_) => {
                    println!("{}: valid", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let key = match &e {
                        botgate::identity::jwt::VerifierError::Jwks { key, .. } => key.as_str(),
                        _ => "identity.jwks_file",
                    };
                    eprintln!("{}: key `{key}`: {e}", file.display());
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Token(args)) => token(args),
        Some(Command::OperatorKey) => {
            let key = format!("bgop_{}", botgate::bots::secrets::random_id(32));
            println!("key:    {key}");
            println!(
                "config: [operator] api_key_sha256 = [\"{}\"]",
                botgate::licensing::operator::key_hash(&key)
            );
            ExitCode::SUCCESS
        }
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

/// `path` made absolute against the working directory (unchanged when that cannot be read).
fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

fn token(args: TokenArgs) -> ExitCode {
    use botgate::identity::dev_issuer;
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Config::embedded_default(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("botgate: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ttl_secs = match dev_issuer::parse_ttl(&args.ttl) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("botgate token: --ttl {e}");
            return ExitCode::FAILURE;
        }
    };
    // The data folder as `serve` resolves it: `--data-dir`/BOTGATE_DATA_DIR, else
    // `store.data_dir` of the configuration, relative to the working directory.
    let data_dir = absolute(args.data_dir.unwrap_or(config.store.data_dir.clone()));
    let key = match config.store.backend {
        StoreBackend::Sqlite => {
            let path = dev_issuer::key_path(&data_dir);
            let existed = path.exists();
            let key = dev_issuer::load_or_create(&data_dir)
                .map_err(|e| format!("cannot use {}: {e}", path.display()));
            if key.is_ok() && !existed {
                eprintln!(
                    "botgate token: created a new development key at {}. A server serving another data folder refuses this token; start it on this folder (--data-dir {}), or run this command where the server runs.",
                    path.display(),
                    data_dir.display()
                );
            }
            key
        }
        StoreBackend::Redis => {
            use botgate::store::Store;
            botgate::store::redis::RedisStore::connect(&config.store, 0, 0)
                .and_then(|s| s.shared_key(dev_issuer::KEY_NAME, &rand::random::<[u8; 32]>()))
                .map_err(|e| e.to_string())
        }
    };
    let key = match key {
        Ok(k) => k,
        Err(e) => {
            eprintln!("botgate token: {e}");
            return ExitCode::FAILURE;
        }
    };
    let req = dev_issuer::TokenRequest {
        tenant: args.tenant,
        user: args.user,
        name: args.name,
        groups: args.groups,
        admin: args.admin,
        operator: args.operator,
        ttl_secs,
    };
    let now = botgate::clock::Clock::now_secs(&SystemClock);
    println!("{}", dev_issuer::sign(&key, &config.identity.issuer, &config.identity.audience, &req, now));
    ExitCode::SUCCESS
}
