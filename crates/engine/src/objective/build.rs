//! Builds the `Objective` an `[objective]` table describes: the builtin model on its data (on
//! its device), or a started evaluator process; and the acceptance objective on the other
//! split. The table's types and checks are `config`'s; this is the one place that knows every
//! kind's implementation.

use std::path::Path;

use super::Objective;
use super::command::CommandObjective;
use super::config::{Kind, ObjectiveConfig};
use super::data::Dataset;
use super::mlp::MlpObjective;
use crate::error::Result;

/// Build the objective for a one-shot command: an evaluator failure ends the command, so
/// nothing is restarted. Relative paths resolve against `base_dir` (the config file's
/// directory).
pub fn build_objective(cfg: &ObjectiveConfig, base_dir: &Path) -> Result<Box<dyn Objective>> {
    cfg.build_as(base_dir, Lifetime::OneShot)
}

/// Whether the objective serves one command or a daemon that restarts failed evaluators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    OneShot,
    Daemon,
}

impl ObjectiveConfig {
    /// Load the data and build the oracle (or start the evaluator), for the daemon.
    /// `base_dir` is the config file's directory.
    pub fn build(&self, base_dir: &Path) -> Result<Box<dyn Objective>> {
        self.build_as(base_dir, Lifetime::Daemon)
    }

    /// [`build`](Self::build) for a daemon or a one-shot command (which never announces
    /// evaluator restarts it will not make).
    pub fn build_as(&self, base_dir: &Path, lifetime: Lifetime) -> Result<Box<dyn Objective>> {
        match &self.kind {
            Kind::Command(e) => {
                let mut config = e.command_config(base_dir);
                config.one_shot = lifetime == Lifetime::OneShot;
                let mut evaluator = CommandObjective::start(config)?;
                evaluator.set_int_policy(self.int_policy);
                Ok(Box::new(evaluator))
            }
            Kind::Builtin(b) => {
                let data = Dataset::load(&b.data_path(base_dir), b.loss)?;
                let device = b.device.open()?;
                let mlp = MlpObjective::new(data, b.activation, b.loss, b.batch);
                Ok(Box::new(mlp.on(&device)?))
            }
        }
    }

    /// The acceptance objective (`acceptance_data` or `acceptance_command`), if configured:
    /// the same model, loss and evaluator settings as the selection's, on the other split.
    /// Daemon lifetime: only `sewa watch` publishes under `policy = "best"`.
    pub fn build_acceptance(&self, base_dir: &Path) -> Result<Option<Box<dyn Objective>>> {
        let mut other = self.clone();
        match &mut other.kind {
            Kind::Builtin(b) => match b.acceptance_data.clone() {
                Some(data) => b.data = data,
                None => return Ok(None),
            },
            Kind::Command(e) if e.acceptance_command.is_empty() => return Ok(None),
            Kind::Command(e) => e.command = e.acceptance_command.clone(),
        }
        other.build(base_dir).map(Some)
    }
}
