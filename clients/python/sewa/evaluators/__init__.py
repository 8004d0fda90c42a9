"""Evaluators shipped with sewa, run as `python -m sewa.evaluators.<name>` by sewa's
`[objective] command` (the callbacks in `sewa.integrations` write that config for you).

- `sewa.evaluators.hf`: a Hugging Face model rebuilt from each member's `config.json`, its own
  `loss` over saved batches (a Trainer's eval set) or a text file.
- `sewa.evaluators.lightning`: a LightningModule's own loss over saved validation batches.
"""
