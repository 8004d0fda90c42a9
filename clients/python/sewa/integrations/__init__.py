"""Callbacks that run sewa beside a training library's own loop.

- `sewa.integrations.transformers.SewaCallback`: the Hugging Face `Trainer`;
- `sewa.integrations.lightning.SewaCallback`: `lightning.Trainer`;
- `sewa.integrations._sidecar.Sidecar`: the daemon they share (docs/integrations.md).

Nothing is imported here, so `import sewa.integrations` needs neither torch nor transformers.
"""
