//! What `torch.save` puts in `data.pkl`, read from decoded pickle values: where the state
//! dict is (top level, or nested under `state_dict` etc.), which entries are tensors, and for
//! each tensor its storage reference, dtype, offset, shape and strides. Pure interpretation:
//! no zip or file access (that is `torch.rs`) and no decoding (that is `unpickle`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::classify::{self, Holds, NoStateDict};
use crate::error::{Error, Result};
use crate::unpickle::{Id, Pickle, Value};
use crate::{DType, Format};

/// Keys under which checkpoints nest their state dict, in order of preference (Lightning and
/// most training loops: `state_dict`; DeepSpeed: `module`).
pub(crate) const NESTED_KEYS: &[&str] = &["state_dict", "model_state_dict", "model", "module"];

type Items = Vec<(Id, Id)>;

/// Top-level entries that may hold the training step, in order of preference: `epoch` only as
/// a last resort (it orders checkpoints, but one epoch spans many steps).
pub(crate) const STEP_KEYS: &[&str] = &["step", "global_step", "iteration", "epoch"];

/// The dict of tensors: the entry `state_key` when given, else the top-level dict or a nested
/// state dict (see `NESTED_KEYS`). Also returns the top level's scalar entries (`epoch`,
/// `global_step`, ...) as metadata when the state dict is nested.
pub(crate) fn state_dict(
    path: &Path,
    pk: &Pickle,
    state_key: Option<&str>,
) -> Result<(Items, Format, BTreeMap<String, String>)> {
    let items = pk.dict_items(pk.root).ok_or_else(|| {
        Error::bad_input(
            path,
            "the pickle's top-level object is not a dict of tensors (a pickled nn.Module or \
             TorchScript archive?): save model.state_dict() instead",
        )
    })?;
    let mut nested: BTreeMap<usize, Id> = BTreeMap::new();
    let mut named = None;
    let mut metadata = BTreeMap::new();
    let mut lightning = path.extension().is_some_and(|e| e == "ckpt");
    for &(k, v) in items {
        let Some(key) = pk.str(k) else { continue };
        if state_key == Some(key) {
            named = Some(v);
            continue;
        }
        match NESTED_KEYS.iter().position(|n| *n == key) {
            Some(rank) if pk.dict_items(v).is_some() && state_key.is_none() => {
                nested.insert(rank, v);
            }
            _ => {
                lightning |= key == "pytorch-lightning_version";
                if let Some(text) = scalar_text(pk.get(v)) {
                    metadata.insert(key.to_string(), text);
                }
            }
        }
    }
    let format = if lightning { Format::Lightning } else { Format::TorchZip };
    if let Some(key) = state_key {
        let d = named.ok_or_else(|| missing_key(path, pk, key))?;
        let items = pk.dict_items(d).ok_or_else(|| {
            Error::bad_input(path, format!("state_key = {key:?}: that entry is not a dict"))
        })?;
        return Ok((items.to_vec(), format, metadata));
    }
    match nested.into_values().next() {
        Some(d) => Ok((pk.dict_items(d).unwrap_or_default().to_vec(), format, metadata)),
        None => Ok((items.to_vec(), Format::TorchZip, BTreeMap::new())),
    }
}

fn missing_key(path: &Path, pk: &Pickle, key: &str) -> Error {
    let keys = top_level(path, pk).into_iter().map(|(k, _)| format!("{k:?}"));
    let mut listed: Vec<String> = keys.take(12).collect();
    if listed.is_empty() {
        listed.push("none".into());
    }
    Error::bad_input(
        path,
        format!("state key {key:?} is not in the file (top-level keys: {})", listed.join(", ")),
    )
}

/// The training step recorded in the top-level entries (see `STEP_KEYS`).
pub(crate) fn step_of_entries(metadata: &BTreeMap<String, String>) -> Option<u64> {
    STEP_KEYS.iter().find_map(|k| metadata.get(*k)?.trim().parse().ok())
}

/// Why a pickle holds no state dict we found: not weights at all (optimizer or trainer
/// state, `Error::NotWeights`), or weights under an unknown key (the error lists the keys).
pub(crate) fn no_state_dict(path: &Path, pk: &Pickle) -> Error {
    match classify::no_state_dict(&top_level(path, pk), NESTED_KEYS) {
        NoStateDict::UnknownKey(msg) => Error::bad_input(path, msg),
        NoStateDict::NotWeights(msg) => Error::not_weights(path, msg),
    }
}

/// What each top-level entry holds (string keys only; a non-dict root has none).
fn top_level(path: &Path, pk: &Pickle) -> Vec<(String, Holds)> {
    let items = pk.dict_items(pk.root).unwrap_or_default();
    // `torch.save(optimizer.state_dict())`: its two entries are the optimizer's state.
    let optimizer = is_optimizer(pk, items);
    let entries = items.iter().filter_map(|&(k, v)| Some((pk.str(k)?.to_string(), v)));
    let holds = |k: &str, v| match k {
        "state" | "param_groups" if optimizer => Holds::Optimizer,
        _ => holds(path, pk, v),
    };
    entries.map(|(k, v)| (k.clone(), holds(&k, v))).collect()
}

/// The entries of an `optimizer.state_dict()`: `state` and `param_groups`.
fn is_optimizer(pk: &Pickle, items: &[(Id, Id)]) -> bool {
    let has = |name: &str| items.iter().any(|&(k, _)| pk.str(k) == Some(name));
    has("state") && has("param_groups")
}

fn holds(path: &Path, pk: &Pickle, v: Id) -> Holds {
    if is_tensor(path, pk, v) {
        return Holds::Tensor;
    }
    if let Some(text) = scalar_text(pk.get(v)) {
        return Holds::Scalar(text);
    }
    let Some(items) = pk.dict_items(v) else {
        return Holds::Other(match pk.get(v) {
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::None => "None",
            _ => "object",
        });
    };
    if is_optimizer(pk, items) {
        return Holds::Optimizer;
    }
    match items.iter().filter(|&&(_, v)| is_tensor(path, pk, v)).count() {
        0 => Holds::Other("dict without tensors"),
        n => Holds::Tensors(n),
    }
}

fn is_tensor(path: &Path, pk: &Pickle, v: Id) -> bool {
    tensor_of(path, pk, "", v).is_ok_and(|t| t.is_some())
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::Int(i) => Some(i.to_string()),
        Value::Float(f) => Some(f.to_string()),
        Value::Str(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The tensor a state-dict value describes, or `None` for values that are not tensors
/// (`_metadata`, extra state). Errors for tensor kinds we cannot read.
pub(crate) fn tensor_of(
    path: &Path,
    pk: &Pickle,
    name: &str,
    value: Id,
) -> Result<Option<RawTensor>> {
    match pk.get(value) {
        Value::Call(c) => rebuild(path, pk, name, c.func, c.args, 0),
        _ => Ok(None),
    }
}

/// Real files wrap a tensor at most twice (parameter, subclass); a hostile file could nest
/// wrappers deeply enough to overflow the stack.
const MAX_WRAPPING: u32 = 8;

/// Interpret `func(*args)` when `func` is one of torch's tensor rebuild functions, unwrapping
/// parameters and tensor subclasses down to `_rebuild_tensor_v2(storage, offset, size, stride)`.
fn rebuild(
    path: &Path,
    pk: &Pickle,
    name: &str,
    func: Id,
    args: Id,
    depth: u32,
) -> Result<Option<RawTensor>> {
    let Some((module, fname)) = pk.global(func) else { return Ok(None) };
    let bad = |what: String| Error::bad_input(path, format!("tensor {name}: {what}"));
    if depth > MAX_WRAPPING {
        return Err(bad("tensor wrapped too deeply (corrupt or hostile file)".into()));
    }
    let a = pk.tuple(args).unwrap_or_default();
    let inner = |id: Id| match pk.get(id) {
        Value::Call(c) => rebuild(path, pk, name, c.func, c.args, depth + 1),
        _ => Ok(None),
    };
    match (module, fname) {
        ("torch._utils", "_rebuild_tensor_v2") => parse_rebuild(pk, a).map(Some).map_err(bad),
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => match a {
            [data, ..] => inner(*data),
            _ => Err(bad("malformed parameter".into())),
        },
        // (function, type, args, state): the tensor is `function(*args)`.
        ("torch._tensor", "_rebuild_from_type_v2") => match a {
            [f, _ty, args, ..] => rebuild(path, pk, name, *f, *args, depth + 1),
            _ => Err(bad("malformed tensor subclass".into())),
        },
        ("torch._utils", other) if other.starts_with("_rebuild") => Err(bad(format!(
            "{other} tensors (quantized, sparse, meta or device-specific) are not supported; \
             save a dense CPU state_dict"
        ))),
        _ => Ok(None),
    }
}

/// A tensor as the pickle describes it, before its storage is located in the zip.
pub(crate) struct RawTensor {
    pub storage_class: String,
    pub key: String,
    pub numel: usize,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

fn parse_rebuild(pk: &Pickle, a: &[Id]) -> std::result::Result<RawTensor, String> {
    let [storage, offset, size, stride, ..] = a else {
        return Err("malformed _rebuild_tensor_v2 arguments".into());
    };
    let Value::Persistent(pid) = pk.get(*storage) else {
        return Err("storage is not a persistent id".into());
    };
    let (class, key, numel) = match pk.tuple(*pid).unwrap_or_default() {
        [kind, cls, key, _location, numel] if pk.str(*kind) == Some("storage") => (
            pk.global(*cls).map(|(_, n)| n.to_string()).ok_or("storage type is not a class")?,
            pk.str(*key).ok_or("storage key is not a string")?.to_string(),
            pk.usize(*numel).ok_or("storage size is not an integer")?,
        ),
        _ => return Err("unrecognised storage id".into()),
    };
    Ok(RawTensor {
        storage_class: class,
        key,
        numel,
        offset: pk.usize(*offset).ok_or("storage offset is not an integer")?,
        shape: usizes(pk, *size)?,
        stride: usizes(pk, *stride)?,
    })
}

fn usizes(pk: &Pickle, id: Id) -> std::result::Result<Vec<usize>, String> {
    let items = pk.tuple(id).ok_or("expected a tuple of sizes")?;
    items
        .iter()
        .map(|&i| pk.usize(i).ok_or_else(|| "expected a non-negative size".to_string()))
        .collect()
}

pub(crate) fn dtype_of_storage(class: &str) -> Option<DType> {
    Some(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// Lightning's `ModelCheckpoint` state in `callbacks`: the monitored name and the id of its
/// `current_score` (the score of the checkpoint being saved).
pub(crate) fn model_checkpoint_score(pk: &Pickle) -> Option<(String, Id)> {
    let entry = |d: Id, key: &str| {
        pk.dict_items(d)?.iter().find(|(k, _)| pk.str(*k) == Some(key)).map(|&(_, v)| v)
    };
    let callbacks = entry(pk.root, "callbacks")?;
    pk.dict_items(callbacks)?.iter().find_map(|&(k, v)| {
        if !pk.str(k)?.starts_with("ModelCheckpoint") {
            return None;
        }
        let monitor = pk.str(entry(v, "monitor")?)?.to_string();
        let score = entry(v, "current_score")?;
        Some((monitor, score))
    })
}
