//! What a SIGHUP reload cannot apply to a running daemon: the keys whose new value waits for a
//! restart, named so the log says which (pure). Everything else is applied by the reload: a
//! new watcher and settler (`[watch]`, `rescan_s` included), the window resized, the objective
//! and selector rebuilt, the output and runtime settings taken on.

use crate::config::Config;

/// The changed keys that only a restart applies, by name.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    // candle's and rayon's compute pools (the builtin objective) and the runtime's blocking
    // pool are sized once, at start (`main::cap_threads`, `commands::watch`); the averaging
    // kernel reads the new value at its next publication.
    if old.runtime.threads != new.runtime.threads {
        keys.push("[runtime] threads");
    }
    // The endpoint is bound once, before the pipeline starts (`daemon::metrics`).
    if old.runtime.metrics_addr != new.runtime.metrics_addr {
        keys.push("[runtime] metrics_addr");
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_and_the_metrics_address_wait_for_a_restart() {
        let base = "[watch]\ndir = \"runs\"\n[publish]\nout = \"avg/model.safetensors\"\n";
        let parse = |extra: &str| {
            Config::parse(&format!("{base}{extra}"), std::path::Path::new("t.toml")).unwrap()
        };
        let old = parse("");
        assert!(needs_restart(&old, &old).is_empty());
        assert_eq!(needs_restart(&old, &parse("[runtime]\nthreads = 2\n")), ["[runtime] threads"]);
        let metrics = parse("[runtime]\nmetrics_addr = \"127.0.0.1:9464\"\n");
        assert_eq!(needs_restart(&old, &metrics), ["[runtime] metrics_addr"]);
        let applied = parse("[window]\nsize = 8\n[runtime]\nrecompute_every = 3\n");
        assert!(needs_restart(&old, &applied).is_empty());
    }
}
