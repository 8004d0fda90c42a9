//! The pickle opcodes the decoder understands, named as in CPython's `pickletools` (protocol
//! in brackets where it is not 0). `vm::Vm::step` dispatches on these, in one `match`.

// Framing and the stack.
pub const PROTO: u8 = 0x80; // [2] protocol version
pub const FRAME: u8 = 0x95; // [4] length of the next frame
pub const STOP: u8 = b'.';
pub const MARK: u8 = b'(';
pub const POP: u8 = b'0';
pub const POP_MARK: u8 = b'1';
pub const DUP: u8 = b'2';

// Scalars.
pub const NONE: u8 = b'N';
pub const NEWTRUE: u8 = 0x88; // [2]
pub const NEWFALSE: u8 = 0x89; // [2]
pub const INT: u8 = b'I';
pub const BININT: u8 = b'J';
pub const BININT1: u8 = b'K';
pub const BININT2: u8 = b'M';
pub const LONG: u8 = b'L';
pub const LONG1: u8 = 0x8a; // [2]
pub const LONG4: u8 = 0x8b; // [2]
pub const FLOAT: u8 = b'F';
pub const BINFLOAT: u8 = b'G';

// Text and bytes.
pub const BINUNICODE: u8 = b'X';
pub const SHORT_BINUNICODE: u8 = 0x8c; // [4]
pub const BINUNICODE8: u8 = 0x8d; // [4]
pub const UNICODE: u8 = b'V';
pub const STRING: u8 = b'S';
pub const BINSTRING: u8 = b'T';
pub const SHORT_BINSTRING: u8 = b'U';
pub const BINBYTES: u8 = b'B'; // [3]
pub const SHORT_BINBYTES: u8 = b'C'; // [3]
pub const BINBYTES8: u8 = 0x8e; // [4]
pub const BYTEARRAY8: u8 = 0x96; // [5]

// Containers.
pub const EMPTY_TUPLE: u8 = b')';
pub const TUPLE: u8 = b't';
pub const TUPLE1: u8 = 0x85; // [2]
pub const TUPLE2: u8 = 0x86; // [2]
pub const TUPLE3: u8 = 0x87; // [2]
pub const EMPTY_LIST: u8 = b']';
pub const LIST: u8 = b'l';
pub const APPEND: u8 = b'a';
pub const APPENDS: u8 = b'e';
pub const EMPTY_DICT: u8 = b'}';
pub const DICT: u8 = b'd';
pub const SETITEM: u8 = b's';
pub const SETITEMS: u8 = b'u';
pub const EMPTY_SET: u8 = 0x8f; // [4]
pub const FROZENSET: u8 = 0x91; // [4]
pub const ADDITEMS: u8 = 0x90; // [4]

// The memo.
pub const PUT: u8 = b'p';
pub const BINPUT: u8 = b'q';
pub const LONG_BINPUT: u8 = b'r';
pub const MEMOIZE: u8 = 0x94; // [4]
pub const GET: u8 = b'g';
pub const BINGET: u8 = b'h';
pub const LONG_BINGET: u8 = b'j';

// Classes, calls and persistent ids (all recorded, never resolved or called).
pub const GLOBAL: u8 = b'c';
pub const STACK_GLOBAL: u8 = 0x93; // [4]
pub const REDUCE: u8 = b'R';
pub const NEWOBJ: u8 = 0x81; // [2]
pub const NEWOBJ_EX: u8 = 0x92; // [4]
pub const INST: u8 = b'i';
pub const OBJ: u8 = b'o';
pub const BUILD: u8 = b'b';
pub const PERSID: u8 = b'P';
pub const BINPERSID: u8 = b'Q';
