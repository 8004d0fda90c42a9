//! Which process of a distributed `sewa average` this is: `--rank`/`--world-size`, else what
//! the launcher exported (torchrun's RANK/WORLD_SIZE, then srun's SLURM_PROCID/SLURM_NTASKS).
//! Only asked under `--distributed`: a `sewa watch` started from rank 0 of a training job
//! inherits those variables and must not act on them. Pure: the environment is passed in.

use sewa_engine::error::{Error, Result};
use sewa_engine::publish::Ranks;

/// More processes than this is a typo or a hostile variable, not a job.
const MAX_WORLD: usize = 1 << 20;

/// The ranks from the flags, else from `env` (a variable's value by name).
pub fn resolve(
    rank: Option<usize>,
    world: Option<usize>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Ranks> {
    let (rank, world, from) = match (rank, world) {
        (Some(r), Some(w)) => (r, w, "--rank/--world-size".to_string()),
        _ => from_env(&env)?,
    };
    if world == 0 || world > MAX_WORLD {
        return Err(Error::Usage(format!(
            "--distributed: world size {world} from {from} (expected 1 to {MAX_WORLD})"
        )));
    }
    if rank >= world {
        return Err(Error::Usage(format!(
            "--distributed: rank {rank} from {from} is not below the world size {world}"
        )));
    }
    Ok(Ranks { rank, world })
}

fn from_env(env: &impl Fn(&str) -> Option<String>) -> Result<(usize, usize, String)> {
    // torchrun inside an srun allocation sets both: its own variables name the processes
    // actually launched.
    for (r, w) in [("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")] {
        match (env(r), env(w)) {
            (Some(rv), Some(wv)) => {
                let num = |name: &str, v: &str| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::Usage(format!("--distributed: {name}={v:?} is not a number"))
                    })
                };
                return Ok((num(r, &rv)?, num(w, &wv)?, format!("{r}/{w}")));
            }
            (None, None) => continue,
            _ => {
                return Err(Error::Usage(format!(
                    "--distributed: {r} and {w} must be set together (one of them is missing)"
                )));
            }
        }
    }
    Err(Error::Usage(
        "--distributed needs to know this process's rank: launch it with torchrun (RANK, \
         WORLD_SIZE) or srun (SLURM_PROCID, SLURM_NTASKS), or pass --rank and --world-size"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn flags_win_then_torchrun_then_slurm() {
        let all =
            [("RANK", "3"), ("WORLD_SIZE", "4"), ("SLURM_PROCID", "1"), ("SLURM_NTASKS", "2")];
        assert_eq!(resolve(Some(0), Some(2), env(&all)).unwrap(), Ranks { rank: 0, world: 2 });
        assert_eq!(resolve(None, None, env(&all)).unwrap(), Ranks { rank: 3, world: 4 });
        assert_eq!(resolve(None, None, env(&all[2..])).unwrap(), Ranks { rank: 1, world: 2 });
    }

    #[test]
    fn bad_or_missing_ranks_are_usage_errors() {
        for (vars, needle) in [
            (&[][..], "needs to know"),
            (&[("RANK", "1")][..], "set together"),
            (&[("RANK", "x"), ("WORLD_SIZE", "2")][..], "not a number"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")][..], "not below"),
            (&[("RANK", "0"), ("WORLD_SIZE", "0")][..], "world size 0"),
            (&[("RANK", "0"), ("WORLD_SIZE", "99999999999")][..], "expected 1 to"),
        ] {
            let e = resolve(None, None, env(vars)).unwrap_err().to_string();
            assert!(e.contains(needle), "{vars:?}: {e}");
        }
    }
}
