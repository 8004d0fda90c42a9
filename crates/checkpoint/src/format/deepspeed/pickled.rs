//! Reading the plain values DeepSpeed pickles (dicts and `OrderedDict`s, lists, ints and int
//! enums such as `ZeroStageEnum`, `torch.Size`) out of decoded pickles. Nothing here calls
//! or imports anything: classes are only compared by name.

use crate::unpickle::{Id, Pickle, Value};

pub(super) fn entry(pk: &Pickle, dict: Id, key: &str) -> Option<Id> {
    items(pk, dict)?.iter().find(|&&(k, _)| pk.str(k) == Some(key)).map(|&(_, v)| v)
}

/// Items of a dict or dict subclass, empty ones included (an empty `OrderedDict()`).
pub(super) fn items(pk: &Pickle, id: Id) -> Option<&[(Id, Id)]> {
    match pk.get(id) {
        Value::Dict(v) => Some(v),
        Value::Call(c) => Some(&c.items),
        _ => None,
    }
}

pub(super) fn list(pk: &Pickle, id: Id) -> Option<&[Id]> {
    match pk.get(id) {
        Value::List(v) | Value::Tuple(v) => Some(v),
        _ => None,
    }
}

/// An int, or an int enum (`ZeroStageEnum.gradients` pickles as `ZeroStageEnum(2)`).
pub(super) fn int(pk: &Pickle, id: Id) -> Option<usize> {
    match pk.get(id) {
        Value::Int(_) => pk.usize(id),
        Value::Call(c) => match pk.tuple(c.args)? {
            [v] => pk.usize(*v),
            _ => None,
        },
        _ => None,
    }
}

/// `torch.Size([..])` (pickled as `torch.Size((..,))`), or a plain tuple or list of sizes.
pub(super) fn shape(pk: &Pickle, id: Id) -> Option<Vec<usize>> {
    let dims = match pk.get(id) {
        Value::Call(c) if pk.global(c.func) == Some(("torch", "Size")) => match pk.tuple(c.args)? {
            [inner] => list(pk, *inner)?,
            _ => return None,
        },
        _ => list(pk, id)?,
    };
    dims.iter().map(|&d| pk.usize(d)).collect()
}

/// A dict of name → shape, in order.
pub(super) fn shape_map(pk: &Pickle, id: Id) -> Option<Vec<(String, Vec<usize>)>> {
    items(pk, id)?.iter().map(|&(k, v)| Some((pk.str(k)?.to_string(), shape(pk, v)?))).collect()
}
