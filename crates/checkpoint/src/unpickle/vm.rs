//! The pickle virtual machine: one function per opcode family, a value stack with marks, and
//! a memo that shares ids. Reads a byte slice; never imports, never calls.
//!
//! Memory is bounded by the input's size. Unbounded, one opcode byte cost ~90 bytes (100 MB
//! of `NONE` took 8.7 GB). Now immutable singletons (None, True, False, the empty tuple) are
//! shared rather than allocated, the memo is a dense table (keys beyond the budget are
//! refused), and the machine charges what it keeps — each object, stack slot, mark and memo
//! slot, and string bytes — against [`budget`]: 32 bytes per pickle byte plus 1 MiB. Real
//! torch state dicts with optimizer state (protocols 2, 4 and 5, short or long names) need
//! 8–15. A pickle that asks for more is refused with an error; the check runs after every
//! opcode, and no single opcode allocates more than the pickle's own size.

use super::op;
use super::{Call, Global, Id, Value};

/// Bytes of decoder state a pickle of `len` bytes may use.
pub(super) fn budget(len: usize) -> usize {
    len.saturating_mul(32).saturating_add(1 << 20)
}

/// Ids of the shared immutable singletons, allocated first in every arena.
const NONE: Id = 0;
const TRUE: Id = 1;
const FALSE: Id = 2;
const EMPTY_TUPLE: Id = 3;

/// A memo slot never written.
const HOLE: Id = Id::MAX;

/// What one id costs wherever it is kept (stack, marks, containers, memo).
const ID: usize = std::mem::size_of::<Id>();

/// Run the machine to STOP; returns the arena and the id of the top-level object.
pub(super) fn run(bytes: &[u8]) -> Result<(Vec<Value>, Id), String> {
    let mut vm = Vm::new(bytes);
    loop {
        let at = vm.r.pos;
        let op = vm.r.byte()?;
        match vm.step(op) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(format!("pickle opcode 0x{op:02x} at byte {at}: {e}")),
        }
        if vm.cost > vm.budget {
            return Err(format!(
                "decoding needs more than {} MiB by byte {at} of this {}-byte pickle, more \
                 than a pickle of its size describes: corrupt or hostile",
                vm.budget >> 20,
                bytes.len()
            ));
        }
    }
    let root = vm.pop()?;
    Ok((vm.arena, root))
}

#[derive(Default)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| "unexpected end of pickle data".to_string())?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn uint(&mut self, n: usize) -> Result<u64, String> {
        Ok(self.take(n)?.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64))
    }
    fn len(&mut self, n: usize) -> Result<usize, String> {
        usize::try_from(self.uint(n)?).map_err(|_| "length too large".to_string())
    }
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.buf[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or("unterminated text argument")?;
        let s = self.take(n + 1)?;
        std::str::from_utf8(&s[..n]).map(|s| s.trim_end_matches('\r')).map_err(|e| e.to_string())
    }
    fn utf8(&mut self, n: usize) -> Result<String, String> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|e| e.to_string())
    }
}

#[derive(Default)]
struct Vm<'a> {
    r: Reader<'a>,
    arena: Vec<Value>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    /// Memo key → id (`HOLE` where unset). Picklers number keys 0, 1, 2...
    memo: Vec<Id>,
    /// Bytes charged so far (never refunded: an upper bound of what is kept).
    cost: usize,
    budget: usize,
}

impl<'a> Vm<'a> {
    fn new(buf: &'a [u8]) -> Vm<'a> {
        let arena = vec![Value::None, Value::Bool(true), Value::Bool(false), Value::Tuple(vec![])];
        Vm { r: Reader { buf, pos: 0 }, arena, budget: budget(buf.len()), ..Vm::default() }
    }

    fn new_value(&mut self, v: Value) -> Id {
        let heap = match &v {
            Value::Str(s) => s.len(),
            Value::Global(g) => g.module.len() + g.name.len() + std::mem::size_of::<Global>(),
            Value::Call(_) => std::mem::size_of::<Call>(),
            _ => 0,
        };
        self.cost += std::mem::size_of::<Value>() + heap;
        self.arena.push(v);
        self.arena.len() - 1
    }
    fn push(&mut self, v: Value) {
        let id = self.new_value(v);
        self.push_id(id);
    }
    /// Every stack push goes through here; the id later moves into a container, so it is
    /// charged once, here.
    fn push_id(&mut self, id: Id) {
        self.cost += ID;
        self.stack.push(id);
    }
    fn pop(&mut self) -> Result<Id, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("stack underflow".into());
        }
        Ok(self.stack.pop().expect("checked length"))
    }
    fn top(&self) -> Result<Id, String> {
        self.stack.last().copied().ok_or_else(|| "empty stack".into())
    }
    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let m = self.marks.pop().ok_or("no MARK on the stack")?;
        Ok(self.stack.split_off(m))
    }
    fn memo_get(&mut self, key: u64) -> Result<(), String> {
        let slot = usize::try_from(key).ok().and_then(|k| self.memo.get(k).copied());
        let id = slot.filter(|&id| id != HOLE).ok_or_else(|| format!("memo key {key} missing"))?;
        self.push_id(id);
        Ok(())
    }
    fn memo_put(&mut self, key: u64) -> Result<(), String> {
        let id = self.top()?;
        let k = usize::try_from(key).unwrap_or(usize::MAX);
        if k >= self.memo.len() {
            // Charged before growing: a hostile key must not allocate first.
            let grow = (k - self.memo.len()).saturating_add(1).saturating_mul(ID);
            if self.cost.saturating_add(grow) > self.budget {
                return Err(format!("memo key {key} is far beyond what this pickle can hold"));
            }
            self.cost += grow;
            self.memo.resize(k + 1, HOLE);
        }
        self.memo[k] = id;
        Ok(())
    }

    /// Execute one opcode; `Ok(true)` at STOP. Every opcode is here, by name; arms that
    /// need more than a line call a helper below.
    fn step(&mut self, code: u8) -> Result<bool, String> {
        match code {
            op::STOP => return Ok(true),
            op::PROTO => self.skip(1)?, // the version: every one decodes the same way here
            op::FRAME => self.skip(8)?, // a frame's length: a hint only
            op::MARK => self.mark(),
            op::POP => self.pop().map(|_| ())?,
            op::POP_MARK => self.pop_mark().map(|_| ())?,
            op::DUP => self.push_id(self.top()?),
            op::NONE => self.push_id(NONE),
            op::NEWTRUE => self.push_id(TRUE),
            op::NEWFALSE => self.push_id(FALSE),
            op::INT => self.int_line()?,
            op::BININT => self.binint(4)?,
            op::BININT1 => self.binint(1)?,
            op::BININT2 => self.binint(2)?,
            op::LONG => self.long_line()?,
            op::LONG1 => self.long(1)?,
            op::LONG4 => self.long(4)?,
            op::FLOAT => self.float_line()?,
            op::BINFLOAT => self.binfloat()?,
            op::BINUNICODE => self.unicode(4)?,
            op::SHORT_BINUNICODE => self.unicode(1)?,
            op::BINUNICODE8 => self.unicode(8)?,
            op::UNICODE => self.unicode_line()?,
            op::STRING => self.string_line()?,
            op::SHORT_BINSTRING | op::SHORT_BINBYTES => self.bytes(1)?,
            op::BINSTRING | op::BINBYTES => self.bytes(4)?,
            op::BINBYTES8 | op::BYTEARRAY8 => self.bytes(8)?,
            op::EMPTY_TUPLE => self.push_id(EMPTY_TUPLE),
            op::TUPLE => self.push_marked(Value::Tuple)?,
            op::TUPLE1 => self.tuple_n(1)?,
            op::TUPLE2 => self.tuple_n(2)?,
            op::TUPLE3 => self.tuple_n(3)?,
            op::EMPTY_LIST => self.push(Value::List(vec![])),
            op::LIST => self.push_marked(Value::List)?,
            op::EMPTY_DICT => self.push(Value::Dict(vec![])),
            op::DICT => self.dict()?,
            op::EMPTY_SET => self.push(Value::Set(vec![])),
            op::FROZENSET => self.push_marked(Value::Set)?,
            op::APPEND => self.append()?,
            op::APPENDS | op::ADDITEMS => self.pop_mark().and_then(|v| self.extend_list(v))?,
            op::SETITEM => self.setitem()?,
            op::SETITEMS => self.pop_mark().and_then(pairs).and_then(|v| self.extend_dict(v))?,
            op::PUT => self.line_key("PUT").and_then(|k| self.memo_put(k))?,
            op::BINPUT => self.r.uint(1).and_then(|k| self.memo_put(k))?,
            op::LONG_BINPUT => self.r.uint(4).and_then(|k| self.memo_put(k))?,
            op::MEMOIZE => self.memo_put(self.memo.len() as u64)?,
            op::GET => self.line_key("GET").and_then(|k| self.memo_get(k))?,
            op::BINGET => self.r.uint(1).and_then(|k| self.memo_get(k))?,
            op::LONG_BINGET => self.r.uint(4).and_then(|k| self.memo_get(k))?,
            op::GLOBAL => self.global_line()?,
            op::STACK_GLOBAL => self.stack_global()?,
            op::REDUCE | op::NEWOBJ => self.reduce()?,
            op::NEWOBJ_EX => self.pop().and_then(|_kwargs| self.reduce())?,
            op::INST => self.inst()?,
            op::OBJ => self.obj()?,
            op::BUILD => self.build()?,
            op::BINPERSID => self.pop().map(|pid| self.push(Value::Persistent(pid)))?,
            op::PERSID => self.persid_line()?,
            other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
        }
        Ok(false)
    }

    /// An opcode argument that changes nothing here.
    fn skip(&mut self, n: usize) -> Result<(), String> {
        self.r.take(n).map(|_| ())
    }

    fn mark(&mut self) {
        self.cost += ID;
        self.marks.push(self.stack.len())
    }

    /// BININT (signed, 4 bytes), BININT1 and BININT2 (unsigned), little-endian.
    fn binint(&mut self, width: usize) -> Result<(), String> {
        let v = self.r.uint(width)?;
        let v = if width == 4 { v as u32 as i32 as i64 } else { v as i64 };
        self.push(Value::Int(v));
        Ok(())
    }

    /// INT: a decimal line, `00` / `01` for protocol 0's booleans.
    fn int_line(&mut self) -> Result<(), String> {
        match self.r.line()? {
            "00" => self.push_id(FALSE),
            "01" => self.push_id(TRUE),
            s => self.push(Value::Int(s.parse().map_err(|_| format!("bad INT {s:?}"))?)),
        }
        Ok(())
    }

    fn long_line(&mut self) -> Result<(), String> {
        let s = self.r.line()?.trim_end_matches('L');
        self.push(s.parse().map_or(Value::BigInt, Value::Int));
        Ok(())
    }

    fn float_line(&mut self) -> Result<(), String> {
        let s = self.r.line()?;
        self.push(Value::Float(s.parse().map_err(|_| format!("bad FLOAT {s:?}"))?));
        Ok(())
    }

    fn binfloat(&mut self) -> Result<(), String> {
        let bits = self.r.take(8)?;
        self.push(Value::Float(f64::from_be_bytes(bits.try_into().expect("8 bytes"))));
        Ok(())
    }

    fn unicode_line(&mut self) -> Result<(), String> {
        let s = self.r.line()?.to_string();
        self.push(Value::Str(s));
        Ok(())
    }

    /// LONG1 / LONG4: little-endian two's complement of a length-prefixed byte count.
    fn long(&mut self, width: usize) -> Result<(), String> {
        let n = self.r.len(width)?;
        let bytes = self.r.take(n)?;
        if n > 8 {
            self.push(Value::BigInt);
            return Ok(());
        }
        let mut v: i64 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            v |= (b as i64) << (8 * i);
        }
        if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
            v -= 1i64 << (8 * n); // sign-extend
        }
        self.push(Value::Int(v));
        Ok(())
    }

    /// A UTF-8 string with a little-endian length of `width` bytes.
    fn unicode(&mut self, width: usize) -> Result<(), String> {
        let n = self.r.len(width)?;
        let s = self.r.utf8(n)?;
        self.push(Value::Str(s));
        Ok(())
    }

    /// STRING: protocol 0's quoted byte string, kept as text.
    fn string_line(&mut self) -> Result<(), String> {
        let s = self.r.line()?.trim_matches(|c| c == '\'' || c == '"').to_string();
        self.push(Value::Str(s));
        Ok(())
    }

    /// Bytes with a length of `width` bytes: skipped (tensors never live in the pickle).
    fn bytes(&mut self, width: usize) -> Result<(), String> {
        let n = self.r.len(width)?;
        self.r.take(n)?;
        self.push(Value::Bytes);
        Ok(())
    }

    /// TUPLE, LIST, FROZENSET: the items since the last MARK.
    fn push_marked(&mut self, make: fn(Vec<Id>) -> Value) -> Result<(), String> {
        let items = self.pop_mark()?;
        self.push(make(items));
        Ok(())
    }

    fn tuple_n(&mut self, n: usize) -> Result<(), String> {
        let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
        items.reverse();
        self.push(Value::Tuple(items));
        Ok(())
    }

    fn dict(&mut self) -> Result<(), String> {
        let items = pairs(self.pop_mark()?)?;
        self.push(Value::Dict(items));
        Ok(())
    }

    fn append(&mut self) -> Result<(), String> {
        let v = self.pop()?;
        self.extend_list(vec![v])
    }

    fn setitem(&mut self) -> Result<(), String> {
        let v = self.pop()?;
        let k = self.pop()?;
        self.extend_dict(vec![(k, v)])
    }

    fn extend_list(&mut self, items: Vec<Id>) -> Result<(), String> {
        let top = self.top()?;
        match &mut self.arena[top] {
            Value::List(v) | Value::Set(v) => v.extend(items),
            Value::Call(c) => c.list.extend(items),
            other => return Err(format!("cannot append to {}", kind(other))),
        }
        Ok(())
    }

    fn extend_dict(&mut self, items: Vec<(Id, Id)>) -> Result<(), String> {
        let top = self.top()?;
        match &mut self.arena[top] {
            Value::Dict(v) => v.extend(items),
            Value::Call(c) => c.items.extend(items),
            other => return Err(format!("cannot set items on {}", kind(other))),
        }
        Ok(())
    }

    /// The decimal key of PUT / GET.
    fn line_key(&mut self, what: &str) -> Result<u64, String> {
        self.r.line()?.parse().map_err(|_| format!("bad {what} key"))
    }

    fn global(&mut self, module: String, name: String) -> Id {
        self.new_value(Value::Global(Box::new(Global { module, name })))
    }

    fn global_line(&mut self) -> Result<(), String> {
        let module = self.r.line()?.to_string();
        let name = self.r.line()?.to_string();
        let id = self.global(module, name);
        self.push_id(id);
        Ok(())
    }

    fn stack_global(&mut self) -> Result<(), String> {
        let name = self.pop()?;
        let module = self.pop()?;
        let (module, name) = match (&self.arena[module], &self.arena[name]) {
            (Value::Str(m), Value::Str(n)) => (m.clone(), n.clone()),
            _ => return Err("STACK_GLOBAL needs two strings".into()),
        };
        let id = self.global(module, name);
        self.push_id(id);
        Ok(())
    }

    /// REDUCE / NEWOBJ: `func(*args)`, recorded.
    fn reduce(&mut self) -> Result<(), String> {
        let args = self.pop()?;
        let func = self.pop()?;
        self.call(func, args);
        Ok(())
    }

    fn inst(&mut self) -> Result<(), String> {
        let module = self.r.line()?.to_string();
        let name = self.r.line()?.to_string();
        let items = self.pop_mark()?;
        let func = self.global(module, name);
        let args = self.new_value(Value::Tuple(items));
        self.call(func, args);
        Ok(())
    }

    fn obj(&mut self) -> Result<(), String> {
        let mut items = self.pop_mark()?;
        if items.is_empty() {
            return Err("OBJ without a class".into());
        }
        let func = items.remove(0);
        let args = self.new_value(Value::Tuple(items));
        self.call(func, args);
        Ok(())
    }

    fn build(&mut self) -> Result<(), String> {
        let state = self.pop()?;
        let top = self.top()?;
        // Dicts (OrderedDict's `_metadata` attribute) keep their items; state is ignored.
        if let Value::Call(c) = &mut self.arena[top] {
            c.state = Some(state);
        }
        Ok(())
    }

    fn persid_line(&mut self) -> Result<(), String> {
        let s = self.r.line()?.to_string();
        let pid = self.new_value(Value::Str(s));
        self.push(Value::Persistent(pid));
        Ok(())
    }

    /// A call is recorded, never made. Dict-like builtins become plain dicts so that the
    /// items added later are found where a reader expects them.
    fn call(&mut self, func: Id, args: Id) {
        let dict_like = matches!(
            &self.arena[func],
            Value::Global(g)
                if (g.module == "collections" && (g.name == "OrderedDict" || g.name == "defaultdict"))
                    || (g.module == "builtins" || g.module == "__builtin__") && g.name == "dict"
        );
        let empty_args = matches!(&self.arena[args], Value::Tuple(a) if a.is_empty());
        if dict_like && empty_args {
            self.push(Value::Dict(vec![]))
        } else {
            let call = Call { func, args, state: None, items: vec![], list: vec![] };
            self.push(Value::Call(Box::new(call)))
        }
    }
}

fn pairs(items: Vec<Id>) -> Result<Vec<(Id, Id)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("odd number of items for a dict".into());
    }
    Ok(items.chunks(2).map(|c| (c[0], c[1])).collect())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Tuple(_) => "a tuple",
        Value::Dict(_) => "a dict",
        Value::List(_) => "a list",
        Value::Global(_) => "a class",
        _ => "a scalar",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hostile floods (100 MB of NONE took 8.7 GB): each must fail, having charged no more
    /// than the budget plus one opcode's worth.
    #[test]
    fn floods_are_refused_within_the_budget() {
        let n = 1 << 20;
        let string = [&b"X\x00\x00\x01\x00"[..], &[b'a'; 65536], b"\x94"].concat();
        // (what, bytes, whether it keeps more per byte than the budget's rate)
        let floods: Vec<(&str, Vec<u8>, bool)> = vec![
            ("NONE", b"N".repeat(n), false),
            ("EMPTY_LIST", b"]".repeat(n), true),
            ("EMPTY_LIST POP", b"]0".repeat(n), false),
            ("MARK", b"(".repeat(n), false),
            ("MEMOIZE", [&b"N"[..], &b"\x94".repeat(n)].concat(), false),
            ("DUP", [&b"N"[..], &b"2".repeat(n)].concat(), false),
            (
                "GET of a long string",
                [&string[..], &b"h\x00h\x00\x930".repeat(n / 8)].concat(),
                true,
            ),
            ("far memo key", b"Nr\xff\xff\xff\x7f".repeat(4), true),
        ];
        for (what, bytes, over) in floods {
            let mut vm = Vm::new(&bytes);
            // Floods cheaper than the budget's rate run to the end of the data and fail there.
            let err = run(&bytes).err().unwrap_or_else(|| panic!("{what}: decoded"));
            let bounded = err.contains("corrupt or hostile") || err.contains("far beyond");
            assert!(if over { bounded } else { err.contains("unexpected end") }, "{what}: {err}");
            // Replay to the failing opcode and look at what was charged and kept.
            while vm.cost <= vm.budget {
                let Ok(op) = vm.r.byte() else { break };
                if vm.step(op).is_err() {
                    break;
                }
            }
            assert!(vm.cost <= vm.budget + 256 * 1024, "{what}: charged {}", vm.cost);
            assert!(vm.memo.len() * ID <= vm.budget, "{what}: memo {}", vm.memo.len());
        }
    }

    #[test]
    fn values_stay_small() {
        assert!(std::mem::size_of::<Value>() <= 32, "{}", std::mem::size_of::<Value>());
    }
}
