//! The checkpoint formats, one module each, every one with the same two entry points:
//! `quick_check` (is it complete enough to open? no tensor data read, for the watcher) and
//! `open` (validate and index it, holding its files: a `Loaded`). Which one handles a path is
//! decided in `detect`, never here; `magic` tells files apart by their first bytes.
//! Lightning `.ckpt` files are torch files whose tensors sit under a key (`torch`); a
//! directory with `.metadata` is a torch.distributed.checkpoint (`dcp`); DeepSpeed and PEFT
//! directories are built on the torch and safetensors readers.

pub(crate) mod dcp;
pub(crate) mod deepspeed;
pub(crate) mod hf_dir;
pub(crate) mod magic;
pub(crate) mod peft;
pub(crate) mod safetensors;
pub(crate) mod sharded;
pub(crate) mod torch;
