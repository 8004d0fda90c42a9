//! A small, safe pickle decoder: it understands the opcodes of protocols 0–5 and builds plain
//! values in an arena; it never imports modules or calls anything, so untrusted checkpoints
//! cannot run code. Class references, calls (`REDUCE`, `NEWOBJ`) and persistent ids are kept
//! as data for the caller to interpret. Values are shared through the memo exactly as Python
//! shares objects (an `Id` per object), so a dict filled after it was memoised is seen filled.
//! Decoding is bounded by the pickle's size (objects, stack and memo; see `vm`), so a small
//! hostile file cannot make us allocate gigabytes.
//! We own this instead of using `candle_core::pickle` because that reader rejects common real
//! files (Lightning's `AttributeDict` hyper-parameters, protocol ≥ 3 opcodes).

mod op;
mod vm;

/// Index of a value in the arena.
pub(crate) type Id = usize;

#[derive(Debug)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer wider than 64 bits (its value is never needed).
    BigInt,
    Float(f64),
    Str(String),
    /// A bytes object (contents are not kept: tensors never live in the pickle itself).
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    /// `module.name`, as referenced by GLOBAL / STACK_GLOBAL (never resolved).
    Global(Box<Global>),
    /// The result of calling `func(*args)` (REDUCE, NEWOBJ, INST, OBJ), plus what BUILD,
    /// SETITEMS and APPENDS later put into it (dict and list subclasses).
    Call(Box<Call>),
    /// `persistent_load(pid)`: torch's reference to a tensor storage.
    Persistent(Id),
}

/// A class reference. The two large variants are boxed so that every `Value` stays at 32
/// bytes: memory per decoded object is what the decoder's budget bounds (see `vm`).
#[derive(Debug)]
pub(crate) struct Global {
    pub module: String,
    pub name: String,
}

/// A recorded call (see [`Value::Call`]).
#[derive(Debug)]
pub(crate) struct Call {
    pub func: Id,
    pub args: Id,
    pub state: Option<Id>,
    pub items: Vec<(Id, Id)>,
    pub list: Vec<Id>,
}

/// A decoded pickle: the arena and the id of the top-level object.
pub(crate) struct Pickle {
    arena: Vec<Value>,
    pub root: Id,
}

impl Pickle {
    pub fn get(&self, id: Id) -> &Value {
        &self.arena[id]
    }

    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Items of a dict or of an instance of a dict subclass (OrderedDict, AttributeDict).
    pub fn dict_items(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.get(id) {
            Value::Dict(items) => Some(items),
            Value::Call(c) if !c.items.is_empty() => Some(&c.items),
            _ => None,
        }
    }

    /// Elements of a tuple. Tuples are immutable, so every element is older than the tuple:
    /// walking calls through their argument tuples cannot loop, even in a hostile file.
    pub fn tuple(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.get(id) {
            Value::Global(g) => Some((&g.module, &g.name)),
            _ => None,
        }
    }

    /// Every class or function the pickle references (`module`, `name`), in the order
    /// referenced, repeats included: what a reader checks against the classes it expects.
    pub fn globals(&self) -> impl Iterator<Item = (&str, &str)> {
        self.arena.iter().filter_map(|v| match v {
            Value::Global(g) => Some((g.module.as_str(), g.name.as_str())),
            _ => None,
        })
    }

    pub fn usize(&self, id: Id) -> Option<usize> {
        match self.get(id) {
            Value::Int(i) => usize::try_from(*i).ok(),
            _ => None,
        }
    }
}

/// Decode a whole pickle. Errors say which opcode at which offset went wrong.
pub(crate) fn load(bytes: &[u8]) -> Result<Pickle, String> {
    let (arena, root) = vm::run(bytes)?;
    Ok(Pickle { arena, root })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memo_shares_objects_filled_later() {
        // {'a': [1, 2]} with the list memoised before it is filled, then fetched again:
        // PROTO 2, EMPTY_DICT, MARK, 'a', EMPTY_LIST, BINPUT 1, MARK, 1, 2, APPENDS,
        // SETITEMS, STOP
        let p = b"\x80\x02}(X\x01\x00\x00\x00a]q\x01(K\x01K\x02eu.";
        let pk = load(p).unwrap();
        let items = pk.dict_items(pk.root).unwrap();
        assert_eq!(pk.str(items[0].0), Some("a"));
        assert!(matches!(pk.get(items[0].1), Value::List(v) if v.len() == 2));
    }

    #[test]
    fn dict_subclass_gets_its_items() {
        // AttributeDict() then SETITEMS {'lr': 0.5}: what candle's reader rejects.
        let p =
            b"\x80\x02cm\nAttributeDict\n)\x81(X\x02\x00\x00\x00lrG?\xe0\x00\x00\x00\x00\x00\x00u.";
        let pk = load(p).unwrap();
        let items = pk.dict_items(pk.root).unwrap();
        assert!(matches!(pk.get(items[0].1), Value::Float(f) if *f == 0.5));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(load(b"").is_err());
        assert!(load(b"\x80\x02(t").is_err());
        assert!(load(b"\x80\x02\xff.").is_err());
        assert!(load(b"\x80\x02X\xff\xff\xff\xff").is_err());
        assert!(load(b"h\x05.").is_err());
        assert!(load(b"0.").is_err());
    }

    #[test]
    fn negative_long1() {
        let pk = load(b"\x8a\x01\xff.").unwrap();
        assert!(matches!(pk.get(pk.root), Value::Int(-1)));
    }
}
