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
}

fn main() -> ExitCode {
    let args = Args::parse();
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
