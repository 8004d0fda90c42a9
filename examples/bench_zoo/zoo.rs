//! The zoo as the bench reads it: the index `zoo.json` written by `scripts/make_zoo.py`, and one
//! window loaded — its checkpoints, the members' float tensors decoded once into memory (the
//! zoo's models are small), and builtin objectives on its selection and test splits. Any weight
//! vector over members is evaluated the same way (`Weights::average`, then the objective), so
//! every strategy's loss, the fixed rules' and the exhaustive reference's are comparable to the
//! last bit: equal weights give equal losses.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use sewa_checkpoint::{Checkpoint, DType, OpenOptions};
use sewa_engine::objective::config::Kind;
use sewa_engine::objective::{
    Activation, BuiltinConfig, LossKind, NamedTensor, Objective, ObjectiveConfig, Params,
};

/// `zoo.json`: one split of the zoo.
#[derive(Deserialize)]
pub struct Index {
    pub split: String,
    pub families: BTreeMap<String, String>,
    pub windows: Vec<Entry>,
}

/// One window of the index (paths relative to the index's directory, then to `dir`).
#[derive(Clone, Deserialize)]
pub struct Entry {
    pub id: String,
    pub family: String,
    pub dir: String,
    /// Members in the cold window: `members[..window]`; the rest are the slides, in order.
    pub window: usize,
    pub k: usize,
    pub activation: Activation,
    pub loss: LossKind,
    pub params: usize,
    pub members: Vec<String>,
    pub select: String,
    pub test: String,
    /// Planted warm-start windows: the first member trained after the planted change.
    #[serde(default)]
    pub planted_change_at_member: Option<usize>,
}

impl Entry {
    pub fn planted(&self) -> bool {
        self.planted_change_at_member.is_some()
    }
}

pub fn read_index(path: &Path) -> Result<Index, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!("{}: {e} (generate it: python3 scripts/make_zoo.py --split …)", path.display())
    })?;
    let index: Index =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    for w in &index.windows {
        if w.window == 0 || w.window > w.members.len() || w.k == 0 || w.k > w.window {
            return Err(format!(
                "{}: window {}: window {} and k {} do not fit its {} members",
                path.display(),
                w.id,
                w.window,
                w.k,
                w.members.len()
            ));
        }
    }
    Ok(index)
}

/// The members' float tensors, decoded once: `members[m][t]` is tensor `names[t]` of member m.
pub struct Weights {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    members: Vec<Vec<Vec<f32>>>,
}

impl Weights {
    fn load(ckpts: &[Checkpoint]) -> Result<Weights, String> {
        let first = &ckpts[0];
        let metas: Vec<_> = first.tensors().iter().filter(|t| t.dtype.is_float()).collect();
        let names: Vec<String> = metas.iter().map(|t| t.name.clone()).collect();
        let shapes: Vec<Vec<usize>> = metas.iter().map(|t| t.shape.clone()).collect();
        let mut members = Vec::with_capacity(ckpts.len());
        for c in ckpts {
            let mut tensors = Vec::with_capacity(names.len());
            for (name, shape) in names.iter().zip(&shapes) {
                let meta = c.tensor(name).filter(|t| t.dtype == DType::F32 && &t.shape == shape);
                if meta.is_none() {
                    return Err(format!(
                        "{}: {name} missing or not f32 {shape:?}",
                        c.path().display()
                    ));
                }
                let bytes = c.data(name).map_err(|e| e.to_string())?;
                tensors.push(sewa_checkpoint::dtype::f32s(&bytes));
            }
            members.push(tensors);
        }
        Ok(Weights { names, shapes, members })
    }

    /// Σ w_i · member_{offset+i}, summed in f64 and stored as f32 (members with w_i = 0 are
    /// skipped), as the `Params` the builtin objective evaluates.
    pub fn average(&self, offset: usize, weights: &[f64]) -> Params {
        let used: Vec<(usize, f64)> = weights
            .iter()
            .enumerate()
            .filter(|(_, w)| **w != 0.0)
            .map(|(i, w)| (offset + i, *w))
            .collect();
        let mut acc = Vec::new();
        self.names
            .iter()
            .zip(&self.shapes)
            .enumerate()
            .map(|(t, (name, shape))| {
                acc.clear();
                acc.resize(self.members[offset][t].len(), 0f64);
                for &(m, w) in &used {
                    for (a, x) in acc.iter_mut().zip(&self.members[m][t]) {
                        *a += w * f64::from(*x);
                    }
                }
                let data = acc.iter().map(|a| *a as f32).collect();
                NamedTensor { name: name.clone(), shape: shape.clone(), data }
            })
            .collect()
    }
}

/// One window, loaded: every member (cold window and slides) and its data files.
pub struct Window {
    pub entry: Entry,
    pub dir: PathBuf,
    pub ckpts: Vec<Checkpoint>,
    pub weights: Weights,
}

impl Window {
    pub fn load(root: &Path, entry: &Entry) -> Result<Window, String> {
        let dir = root.join(&entry.dir);
        let ckpts = entry
            .members
            .iter()
            .map(|m| Checkpoint::open(&dir.join(m), &OpenOptions::default()))
            .collect::<sewa_checkpoint::Result<Vec<_>>>()
            .map_err(|e| e.to_string())?;
        let weights = Weights::load(&ckpts)?;
        Ok(Window { entry: entry.clone(), dir, ckpts, weights })
    }

    /// The members `[start, start + window)` in order.
    pub fn view(&self, start: usize) -> Vec<&Checkpoint> {
        self.ckpts[start..start + self.entry.window].iter().collect()
    }

    /// A builtin objective on one of the window's data files (`select` or `test`).
    pub fn objective(&self, data: &str) -> Result<Box<dyn Objective>, String> {
        let b = BuiltinConfig {
            data: data.into(),
            activation: self.entry.activation,
            loss: self.entry.loss,
            ..Default::default()
        };
        let cfg = ObjectiveConfig { kind: Kind::Builtin(b), ..Default::default() };
        cfg.build(&self.dir).map_err(|e| e.to_string())
    }
}

/// The loss at the average of members `[offset, offset + weights.len())` with `weights`.
pub fn loss_at(w: &Window, obj: &mut dyn Objective, offset: usize, weights: &[f64]) -> f64 {
    let params = w.weights.average(offset, weights);
    obj.evaluate(&params, false).map(|e| e.loss).unwrap_or(f64::NAN)
}
