//! Parse the command line, start logging, call the library, map errors to exit codes.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    // candle's and rayon's pools read these once: set them before the first candle op, while
    // the process is still single-threaded.
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get()).to_string();
            // SAFETY: no other thread exists yet.
            #[allow(unsafe_code)]
            unsafe {
                std::env::set_var(var, n)
            };
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let result = match &args.command {
        cli::Command::Demo(a) => sewa::demo::run(a).map(|_| ()),
        cli::Command::Report(a) => sewa::report::run(a),
    };
    if let Err(e) = result {
        eprintln!("sewa: {e}");
        std::process::exit(e.exit_code());
    }
}
