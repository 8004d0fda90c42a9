//! The config's parsing and cross-field rules.

use super::*;
use crate::checked::Positive;
use crate::select::Method;

const MIN: &str = "[watch]\ndir = \"runs\"\n[publish]\nout = \"runs/avg/model.safetensors\"\n";

fn parse(text: &str) -> Result<Config> {
    Config::parse(text, Path::new("t.toml"))
}

#[test]
fn minimal_config_gets_defaults() {
    let c = parse(MIN).unwrap();
    assert_eq!(c.watch.quiet_ms, 2000);
    assert_eq!(c.window.size, Positive(20));
    assert_eq!(c.select.method, Method::Lawa);
    assert_eq!(c.select.k, Positive(5));
    assert_eq!(c.publish.policy, Policy::Latest);
    assert_eq!(c.state_dir(), PathBuf::from("runs/avg/.sewa"));
    assert_eq!(
        crate::publish::manifest_path(&c.publish.out),
        PathBuf::from("runs/avg/model.safetensors.manifest.json")
    );
}

#[test]
fn unknown_key_is_rejected_with_line() {
    let err = parse(&format!("{MIN}[window]\nsise = 3\n")).unwrap_err().to_string();
    assert!(err.contains("sise") && err.contains("line 6"), "{err}");
}

#[test]
fn bad_values_reject_themselves_with_position() {
    let err = parse(&format!("{MIN}[window]\nsize = 0\n")).unwrap_err().to_string();
    assert!(err.contains("at least 1") && err.contains("line 6"), "{err}");
    let err = parse(&format!("{MIN}[select]\nema_decay = 1.5\n")).unwrap_err().to_string();
    assert!(err.contains("between 0 and 1"), "{err}");
    let err = parse(&format!("{MIN}[select]\nmethod = \"lava\"\n")).unwrap_err().to_string();
    assert!(err.contains("lava") && err.contains("lawa"), "{err}");
}

#[test]
fn cross_field_rules() {
    let err = parse(&format!("{MIN}[window]\nsize = 3\n[select]\nk = 5\n")).unwrap_err();
    assert!(err.to_string().contains("larger than [window] size"), "{err}");
    assert_eq!(err.exit_code(), 78);
    let err = parse(&format!("{MIN}policy = \"best\"\n")).unwrap_err().to_string();
    assert!(err.contains("policy = \"best\""), "{err}");
    let err = parse(&format!("{MIN}[select]\nmethod = \"sewa\"\n")).unwrap_err().to_string();
    assert!(err.contains("needs an [objective]"), "{err}");
}

/// Issue 19 item 14: `k` is refused beyond the window only for methods that read it; a method
/// that ignores it (uniform averages the whole window) says so instead, and `[runtime] threads`
/// has a bound.
#[test]
fn k_binds_only_methods_that_read_it_and_threads_are_bounded() {
    let err = parse(&format!("{MIN}[window]\nsize = 4\n[select]\nmethod = \"lawa\"\nk = 5\n"));
    assert!(err.unwrap_err().to_string().contains("k = 5 is larger than [window] size = 4"));
    // The default k = 5 with a window of 4 was refused for uniform, which never reads it.
    let cfg = parse(&format!("{MIN}[window]\nsize = 4\n[select]\nmethod = \"uniform\"\n")).unwrap();
    assert!(cfg.notes.is_empty(), "{:?}", cfg.notes);
    let cfg = parse(&format!("{MIN}[window]\nsize = 4\n[select]\nmethod = \"uniform\"\nk = 5\n"));
    let notes = cfg.unwrap().notes;
    assert!(
        notes.len() == 1 && notes[0].contains("k = 5 is ignored") && notes[0].contains("uniform")
    );
    let cfg = parse(&format!("{MIN}[select]\nmethod = \"lawa\"\nk = 3\n")).unwrap();
    assert!(cfg.notes.is_empty(), "lawa reads k");
    assert_eq!(
        parse(&format!("{MIN}[runtime]\nthreads = 1024\n")).unwrap().runtime.threads.get(),
        1024
    );
    let err = parse(&format!("{MIN}[runtime]\nthreads = 1025\n")).unwrap_err().to_string();
    assert!(err.contains("threads = 1025 is more than 1024"), "{err}");
}

#[test]
fn reserved_tables_parse() {
    let text = format!(
        "{MIN}policy = \"best\"\n[select]\nmethod = \"sewa\"\n[select.sewa]\nsamples = 8\n\
         [objective]\nkind = \"builtin\"\ndata = \"sel.safetensors\"\n"
    );
    let c = parse(&text).unwrap();
    assert_eq!(c.select.sewa.samples, 8);
    assert_eq!(c.objective.unwrap().as_builtin().unwrap().data, PathBuf::from("sel.safetensors"));
}

/// The model-based tables used to be kept raw and parsed again later, which lost the
/// position of their errors; parsed in the one pass, they point at the line.
#[test]
fn errors_inside_objective_and_sewa_tables_have_line_and_column() {
    let head = format!("{MIN}[select]\nmethod = \"sewa\"\n");
    let cases = [
        ("[select.sewa]\nsamples = 4\nsampels = 8\n", "sampels", "line 9, column 1"),
        ("[select.sewa]\nsamples = 0\n", "at least 1", "line 8, column 11"),
        ("[select.sewa]\nlr = -1.0\n", "positive", "line 8, column 6"),
        ("[objective]\ndata = \"d\"\nmodle = \"mlp\"\n", "modle", "line 9, column 1"),
        ("[objective]\ndata = \"d\"\nbatch = 0\n", "at least 1", "line 9, column 9"),
        ("[objective]\nkind = \"command\"\ncommand = [\"x\"]\ntimeout_s = 0\n", "> 0", "line 10"),
    ];
    for (table, want, at) in cases {
        let err = parse(&format!("{head}{table}")).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains(at), "{table}: {err}");
    }
}

/// The surrogate strategy's keys and the `[select.soup]` / `[select.twa]` tables parse in
/// the one pass too: typed values, and errors at their line and column.
#[test]
fn strategy_soup_and_twa_keys_parse_and_bad_ones_have_line_and_column() {
    use crate::select::Strategy;
    let ok = format!(
        "{MIN}[select]\nmethod = \"soup\"\n[select.sewa]\nstrategy = \"direct\"\n\
         surrogate_max_calls = 30\nsurrogate_tolerance = 0.0\n[select.soup]\nk = 3\n\
         iterations = 5\n[select.twa]\nstep = 0.5\n[objective]\ndata = \"d\"\n"
    );
    let c = parse(&ok).unwrap();
    assert_eq!(c.select.method, Method::Soup);
    assert_eq!(c.select.sewa.strategy, Strategy::Direct);
    assert_eq!(c.select.sewa.surrogate_max_calls, 30);
    assert_eq!((c.select.soup.k, c.select.soup.iterations), (Some(3), 5));
    assert_eq!(c.select.twa.step, 0.5);
    let d = parse(&format!("{MIN}[select]\nmethod = \"twa\"\n[objective]\ndata = \"d\"\n"));
    assert_eq!(d.unwrap().select.sewa.strategy, Strategy::Surrogate, "the default");
    let head = format!("{MIN}[select]\nmethod = \"sewa\"\n");
    let cases = [
        ("[select.sewa]\nstrategy = \"fast\"\n", "surrogate", "line 8, column 12"),
        ("[select.sewa]\nsurrogate_batch = 0\n", "at least 1", "line 8, column 19"),
        ("[select.sewa]\nsurrogate_tolerance = -1.0\n", ">= 0", "line 8, column 23"),
        ("[select.sewa]\nsurrogate_ridge = 0.0\n", "positive", "line 8, column 19"),
        ("[select.soup]\nk = 0\n", "at least 1", "line 8, column 5"),
        ("[select.soup]\nlr = -2.0\n", "positive", "line 8, column 6"),
        ("[select.soup]\nsteps = 3\n", "steps", "line 8, column 1"),
        ("[select.twa]\niterations = 0\n", "at least 1", "line 8, column 14"),
        ("[select.twa]\nstep = -0.1\n", "positive", "line 8, column 8"),
    ];
    for (table, want, at) in cases {
        let err = parse(&format!("{head}{table}")).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains(at), "{table}: {err}");
    }
    // soup and twa need an [objective], and average what the window holds.
    for method in ["soup", "twa"] {
        let err = parse(&format!("{MIN}[select]\nmethod = \"{method}\"\n")).unwrap_err();
        assert!(err.to_string().contains("needs an [objective]"), "{err}");
    }
}

/// Issue 9 item 12: LAWA published 1-member "averages" before k checkpoints existed.
#[test]
fn methods_that_average_k_members_wait_for_k_unless_min_members_says_otherwise() {
    let min = |select: &str| {
        let text = format!("{MIN}[select]\n{select}\n[objective]\ndata = \"d\"\n");
        parse(&text).unwrap().select.min_members()
    };
    for method in ["lawa", "best-metric", "sewa", "exhaustive", "random"] {
        assert_eq!(min(&format!("method = \"{method}\"\nk = 3")), 3, "{method}");
    }
    for method in ["uniform", "ema", "greedy", "soup", "twa"] {
        assert_eq!(min(&format!("method = \"{method}\"\nk = 3")), 1, "{method}");
    }
    assert_eq!(min("method = \"lawa\"\nk = 3\nmin_members = 1"), 1);
    assert_eq!(min("method = \"uniform\"\nmin_members = 4"), 4);
    let err = parse(&format!(
        "{MIN}[window]\nsize = 4\n[select]\nmethod = \"uniform\"\nk = 2\nmin_members = 5\n"
    ));
    assert!(err.unwrap_err().to_string().contains("min_members = 5"));
    let err = parse(&format!("{MIN}[select]\nmin_members = 0\n")).unwrap_err().to_string();
    assert!(err.contains("at least 1") && err.contains("line 6"), "{err}");
}

#[test]
fn best_only_options_are_refused_under_policy_latest() {
    let err = parse(&format!("{MIN}max_age_steps = 100\n")).unwrap_err().to_string();
    assert!(err.contains("max_age_steps") && err.contains("policy = \"best\""), "{err}");
    let objective = "[objective]\ndata = \"d\"\nacceptance_data = \"a\"\n";
    let sewa = format!("[select]\nmethod = \"sewa\"\n{objective}");
    let err = parse(&format!("{MIN}{sewa}")).unwrap_err().to_string();
    assert!(err.contains("acceptance_data") && err.contains("policy = \"best\""), "{err}");
    let best = format!("{MIN}policy = \"best\"\nmax_age_steps = 100\n{sewa}");
    let c = parse(&best).unwrap();
    assert_eq!(c.publish.max_age_steps, Some(Positive(100)));
}

/// Relative paths mean "relative to the config file", whatever the cwd: a bare file name
/// used to give the evaluator the directory "" and `[watch] dir` depended on the cwd.
#[test]
fn relative_paths_resolve_against_the_config_files_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sewa.toml");
    let text = "[watch]\ndir = \"runs\"\n[publish]\nout = \"avg/model.safetensors\"\n\
                [runtime]\nstate_dir = \"state\"\n";
    std::fs::write(&path, text).unwrap();
    let cfg = Config::load(&path).unwrap();
    assert_eq!(cfg.watch.dir, tmp.path().join("runs"));
    assert_eq!(cfg.publish.out, tmp.path().join("avg/model.safetensors"));
    assert_eq!(cfg.state_dir(), tmp.path().join("state"));
    assert_eq!(cfg.base_dir(), tmp.path());
    assert_eq!(config_dir(Path::new("sewa.toml")), std::env::current_dir().unwrap());
}

#[test]
fn min_free_bytes_takes_bytes_or_a_size() {
    let at = |v: &str| parse(&format!("{MIN}[window]\nmin_free_bytes = {v}\n"));
    assert_eq!(at("0").unwrap().window.min_free_bytes, Some(0));
    assert_eq!(at("\"10GiB\"").unwrap().window.min_free_bytes, Some(10 << 30));
    let err = at("\"plenty\"").unwrap_err().to_string();
    assert!(err.contains("line 6") && err.contains("plenty"), "{err}");
}

/// Issue 20: `[objective]` is read by the type of its kind inside the config file too: a key
/// of the other kind is an error at the file's own line and column.
#[test]
fn objective_keys_of_the_other_kind_are_refused_at_the_files_line() {
    let text = format!(
        "{MIN}[select]\nmethod = \"sewa\"\n[objective]\nkind = \"command\"\ncommand = [\"e\"]\n\
         data = \"sel.safetensors\"\n"
    );
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("data is only used with kind = \"builtin\""), "{err}");
    assert!(err.contains("line 10, column"), "{err}");
    let text = format!("{MIN}[objective]\ndata = \"sel\"\nstaging_dir = \"/tmp\"\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("staging_dir is only used") && err.contains("line 7"), "{err}");
    // `[publish] int_policy` reaches the objective.
    let text = format!("{MIN}int_policy = \"first\"\n[objective]\ndata = \"sel\"\n");
    let c = parse(&text).unwrap();
    assert_eq!(c.objective.unwrap().int_policy, crate::average::IntPolicy::First);
}

/// The daemon needs `[watch]` and `[publish]`; a one-shot selection's file may have neither,
/// and is read through the same parse (unknown keys refused, the same cross-checks).
#[test]
fn daemon_and_one_shot_selection_read_the_file_through_one_parse() {
    let err = parse("[publish]\nout = \"a.safetensors\"\n").unwrap_err().to_string();
    assert!(err.contains("no [watch] table"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let only = write("sel.toml", "[objective]\ndata = \"sel\"\n[select.sewa]\nseed = 4\n");
    let s = Config::load_selection(&only).unwrap();
    assert_eq!((s.select.sewa.seed, s.int_policy), (4, None));
    assert_eq!(s.base_dir, std::path::absolute(dir.path()).unwrap());
    let full =
        write("full.toml", &format!("{MIN}int_policy = \"first\"\n[objective]\ndata = \"s\"\n"));
    let s = Config::load_selection(&full).unwrap();
    assert_eq!(s.int_policy, Some(crate::average::IntPolicy::First));
    assert_eq!(s.objective.int_policy, crate::average::IntPolicy::First);
    let typo = write("typo.toml", "[objective]\ndata = \"sel\"\n[select]\nmetod = \"sewa\"\n");
    let err = Config::load_selection(&typo).unwrap_err().to_string();
    assert!(err.contains("metod") && err.contains("line 4"), "{err}");
    let none = write("none.toml", "[select.sewa]\nseed = 4\n");
    let err = Config::load_selection(&none).unwrap_err().to_string();
    assert!(err.contains("no [objective] table"), "{err}");
    let daemon_rule =
        write("rule.toml", &format!("{MIN}[objective]\ndata = \"s\"\nacceptance_data = \"a\"\n"));
    let err = Config::load_selection(&daemon_rule).unwrap_err().to_string();
    assert!(err.contains("policy = \"best\""), "{err}");
}

/// Issue 22 item 4: `method = "wsm"` and `method = "weights"`; every bad value is one error
/// naming the key, the file and (for a single value) its line.
#[test]
fn wsm_and_weights_parse_and_bad_values_name_the_key_and_the_file() {
    let c = parse(&format!("{MIN}[select]\nmethod = \"wsm\"\nwsm_shape = \"minus-sqrt\"\nk = 8\n"));
    let c = c.unwrap();
    assert_eq!(
        (c.select.method, c.select.wsm_shape),
        (Method::Wsm, crate::select::WsmShape::MinusSqrt)
    );
    assert_eq!(c.select.min_members(), 8, "wsm averages the last k: waits for k");
    assert!(c.notes.is_empty(), "{:?}", c.notes);
    let d = parse(&format!("{MIN}[select]\nmethod = \"wsm\"\n")).unwrap();
    assert_eq!(d.select.wsm_shape, crate::select::WsmShape::Linear, "Megatron's default");

    let err =
        parse(&format!("{MIN}[select]\nmethod = \"wsm\"\nwsm_shape = \"inverse-square-root\"\n"));
    let err = err.unwrap_err().to_string();
    for want in ["t.toml", "wsm_shape", "line 7", "minus-sqrt", "cosine"] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
    let err = parse(&format!("{MIN}[window]\nsize = 4\n[select]\nmethod = \"wsm\"\nk = 5\n"));
    assert!(err.unwrap_err().to_string().contains("larger than [window] size"));

    let w = parse(&format!("{MIN}[select]\nmethod = \"weights\"\nweights = [1, 2, 3.5]\n"));
    let w = w.unwrap();
    assert_eq!(w.select.weights.as_deref(), Some(&[1.0, 2.0, 3.5][..]));
    assert_eq!(w.select.min_members(), 3, "one member per weight");
    for (bad, want) in [
        ("weights = [1, -2]", "entry 2 is -2"),
        ("weights = [0, 0.0]", "all zero"),
        ("weights = []", "empty"),
        ("weights = [1, nan]", "finite"),
        ("weights = \"1,2\"", "weights"),
    ] {
        let err = parse(&format!("{MIN}[select]\nmethod = \"weights\"\n{bad}\n"));
        let err = err.unwrap_err().to_string();
        assert!(
            err.contains(want) && err.contains("t.toml") && err.contains("line 7"),
            "{bad}: {err}"
        );
    }
    let cross = [
        (
            "[window]\nsize = 2\n[select]\nmethod = \"weights\"\nweights = [1, 2, 3]\n",
            "[window] size = 2",
        ),
        ("[select]\nmethod = \"weights\"\n", "needs `weights = [..]`"),
        (
            "[select]\nmethod = \"weights\"\nweights = [1, 2, 3]\nmin_members = 2\n",
            "min_members = 2",
        ),
    ];
    for (text, want) in cross {
        let err = parse(&format!("{MIN}{text}")).unwrap_err();
        assert_eq!(err.exit_code(), 78);
        let err = err.to_string();
        assert!(err.contains(want) && err.contains("t.toml"), "{want}: {err}");
    }
    let n = parse(&format!(
        "{MIN}[select]\nmethod = \"lawa\"\nwsm_shape = \"cosine\"\nweights = [1]\n"
    ));
    let notes = n.unwrap().notes;
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes[0].contains("wsm_shape is ignored") && notes[1].contains("weights is ignored"));
}
