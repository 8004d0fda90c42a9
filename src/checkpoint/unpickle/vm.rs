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

    /// Execute one opcode; `Ok(true)` at STOP.
    fn step(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b'.' => return Ok(true),
            0x80 => {
                self.r.byte()?; // protocol version: every version decodes the same way here
            }
            0x95 => {
                self.r.uint(8)?; // FRAME: a length hint only
            }
            b'(' => {
                self.cost += ID;
                self.marks.push(self.stack.len())
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let id = self.top()?;
                self.push_id(id)
            }
            _ => return self.step_value(op),
        }
        Ok(false)
    }

    fn step_value(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b'N' => self.push_id(NONE),
            0x88 => self.push_id(TRUE),
            0x89 => self.push_id(FALSE),
            b'I' => match self.r.line()? {
                "00" => self.push_id(FALSE),
                "01" => self.push_id(TRUE),
                s => self.push(Value::Int(s.parse().map_err(|_| format!("bad INT {s:?}"))?)),
            },
            b'J' => {
                let v = self.r.uint(4)? as u32 as i32;
                self.push(Value::Int(v as i64))
            }
            b'K' => {
                let v = self.r.uint(1)?;
                self.push(Value::Int(v as i64))
            }
            b'M' => {
                let v = self.r.uint(2)?;
                self.push(Value::Int(v as i64))
            }
            b'L' => {
                let s = self.r.line()?.trim_end_matches('L');
                self.push(s.parse().map_or(Value::BigInt, Value::Int))
            }
            0x8a => {
                let n = self.r.len(1)?;
                let v = self.long(n)?;
                self.push(v)
            }
            0x8b => {
                let n = self.r.len(4)?;
                let v = self.long(n)?;
                self.push(v)
            }
            b'F' => {
                let s = self.r.line()?;
                self.push(Value::Float(s.parse().map_err(|_| format!("bad FLOAT {s:?}"))?))
            }
            b'G' => {
                let bits = self.r.take(8)?;
                self.push(Value::Float(f64::from_be_bytes(bits.try_into().expect("8 bytes"))))
            }
            _ => return self.step_text(op),
        }
        Ok(false)
    }

    /// LONG1 / LONG4: little-endian two's complement of `n` bytes.
    fn long(&mut self, n: usize) -> Result<Value, String> {
        let bytes = self.r.take(n)?;
        if n > 8 {
            return Ok(Value::BigInt);
        }
        let mut v: i64 = 0;
        for (i, &b) in bytes.iter().enumerate() {
            v |= (b as i64) << (8 * i);
        }
        if n > 0 && n < 8 && bytes[n - 1] & 0x80 != 0 {
            v -= 1i64 << (8 * n); // sign-extend
        }
        Ok(Value::Int(v))
    }

    fn step_text(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b'X' => {
                let n = self.r.len(4)?;
                let s = self.r.utf8(n)?;
                self.push(Value::Str(s))
            }
            0x8c => {
                let n = self.r.len(1)?;
                let s = self.r.utf8(n)?;
                self.push(Value::Str(s))
            }
            0x8d => {
                let n = self.r.len(8)?;
                let s = self.r.utf8(n)?;
                self.push(Value::Str(s))
            }
            b'V' => {
                let s = self.r.line()?.to_string();
                self.push(Value::Str(s))
            }
            b'S' => {
                let s = self.r.line()?;
                let s = s.trim_matches(|c| c == '\'' || c == '"').to_string();
                self.push(Value::Str(s))
            }
            b'T' | b'U' | b'B' | b'C' | 0x8e | 0x96 => {
                let width = match op {
                    b'U' | b'C' => 1,
                    b'T' | b'B' => 4,
                    _ => 8,
                };
                let n = self.r.len(width)?;
                self.r.take(n)?;
                self.push(Value::Bytes)
            }
            _ => return self.step_container(op),
        }
        Ok(false)
    }

    fn step_container(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b')' => self.push_id(EMPTY_TUPLE),
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(items))
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>, _>>()?;
                items.reverse();
                self.push(Value::Tuple(items))
            }
            b']' => self.push(Value::List(vec![])),
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::List(items))
            }
            b'}' => self.push(Value::Dict(vec![])),
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(items)?;
                self.push(Value::Dict(pairs))
            }
            0x8f => self.push(Value::Set(vec![])),
            0x91 => {
                let items = self.pop_mark()?;
                self.push(Value::Set(items))
            }
            b'a' => {
                let v = self.pop()?;
                self.extend_list(vec![v])?
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_list(items)?
            }
            0x90 => {
                let items = self.pop_mark()?;
                self.extend_list(items)?
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.extend_dict(vec![(k, v)])?
            }
            b'u' => {
                let items = self.pop_mark()?;
                self.extend_dict(pairs(items)?)?
            }
            _ => return self.step_memo(op),
        }
        Ok(false)
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

    fn step_memo(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b'p' => {
                let key = self.r.line()?.parse().map_err(|_| "bad PUT key")?;
                self.memo_put(key)?
            }
            b'q' => {
                let key = self.r.uint(1)?;
                self.memo_put(key)?
            }
            b'r' => {
                let key = self.r.uint(4)?;
                self.memo_put(key)?
            }
            0x94 => {
                let key = self.memo.len() as u64;
                self.memo_put(key)?
            }
            b'g' => {
                let key = self.r.line()?.parse().map_err(|_| "bad GET key")?;
                self.memo_get(key)?
            }
            b'h' => {
                let key = self.r.uint(1)?;
                self.memo_get(key)?
            }
            b'j' => {
                let key = self.r.uint(4)?;
                self.memo_get(key)?
            }
            _ => return self.step_object(op),
        }
        Ok(false)
    }

    fn step_object(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b'c' => {
                let module = self.r.line()?.to_string();
                let name = self.r.line()?.to_string();
                self.push(Value::Global(Box::new(Global { module, name })))
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (module, name) = match (&self.arena[module], &self.arena[name]) {
                    (Value::Str(m), Value::Str(n)) => (m.clone(), n.clone()),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                };
                self.push(Value::Global(Box::new(Global { module, name })))
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let func = self.pop()?;
                self.call(func, args)
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let func = self.pop()?;
                self.call(func, args)
            }
            _ => return self.step_instance(op),
        }
        Ok(false)
    }

    /// INST, OBJ, BUILD and persistent ids.
    fn step_instance(&mut self, op: u8) -> Result<bool, String> {
        match op {
            b'i' => {
                let module = self.r.line()?.to_string();
                let name = self.r.line()?.to_string();
                let items = self.pop_mark()?;
                let func = self.new_value(Value::Global(Box::new(Global { module, name })));
                let args = self.new_value(Value::Tuple(items));
                self.call(func, args)
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return Err("OBJ without a class".into());
                }
                let func = items.remove(0);
                let args = self.new_value(Value::Tuple(items));
                self.call(func, args)
            }
            b'b' => {
                let state = self.pop()?;
                let top = self.top()?;
                // Dicts (OrderedDict's `_metadata` attribute) keep their items; state is ignored.
                if let Value::Call(c) = &mut self.arena[top] {
                    c.state = Some(state);
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                self.push(Value::Persistent(pid))
            }
            b'P' => {
                let s = self.r.line()?.to_string();
                let pid = self.new_value(Value::Str(s));
                self.push(Value::Persistent(pid))
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x}")),
        }
        Ok(false)
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
