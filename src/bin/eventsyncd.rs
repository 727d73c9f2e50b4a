//! `eventsyncd`: the eventsync daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use eventsync::config::Config;

/// Turns MongoDB change streams into gap-free, versioned diff event logs and serves them.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML); every key can be overridden by EVENTSYNC__SECTION__KEY.
    #[arg(long, short, env = "EVENTSYNC_CONFIG", default_value = "config.toml")]
    config: PathBuf,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Operator commands against a running daemon's admin routes
    /// (e.g. `eventsyncd admin resync app.players`).
    Admin {
        /// The sync port, e.g. http://127.0.0.1:8080; default: the configuration's sync.listen.
        #[arg(long, env = "EVENTSYNC_ADMIN_URL")]
        url: Option<String>,
        /// An admin token; default: the configuration's first auth.admin_tokens (or sync.tokens) entry.
        #[arg(long, env = "EVENTSYNC_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(subcommand)]
        cmd: eventsync::api::cli::AdminCommand,
    },
}

fn admin(
    config: &std::path::Path,
    url: Option<String>,
    token: Option<String>,
    cmd: &eventsync::api::cli::AdminCommand,
) -> ExitCode {
    let loaded = Config::load(config).ok();
    let url = url.or_else(|| {
        loaded.as_ref().map(|c| {
            let mut a = c.sync.listen;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{a}")
        })
    });
    let Some(url) = url else {
        eprintln!("eventsyncd admin: give --url (or a readable --config)");
        return ExitCode::from(2);
    };
    let token = token.or_else(|| {
        loaded.as_ref().and_then(|c| {
            c.auth
                .admin_tokens
                .first()
                .or_else(|| c.sync.tokens.first())
                .cloned()
        })
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("eventsyncd admin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(eventsync::api::cli::run(&url, token.as_deref(), cmd)) {
        Ok(out) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("eventsyncd admin: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Admin { url, token, cmd }) = &args.command {
        return admin(&args.config, url.clone(), token.clone(), cmd);
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("eventsyncd: {} ({})", e, args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("configuration {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    config.log.init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("eventsyncd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(eventsync::daemon::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "eventsyncd failed");
            eprintln!("eventsyncd: {e}");
            ExitCode::FAILURE
        }
    }
}
