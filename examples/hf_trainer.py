"""sewa beside a Hugging Face Trainer: the one line is `callbacks=[SewaCallback(...)]`.
A tiny GPT-2 built in code on synthetic token data (no hub, no downloads), on the CPU:
    pip install <checkout> && pip install torch transformers && python examples/hf_trainer.py
"""
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from sewa.integrations.transformers import SewaCallback

def tokens(n, seed):  # each sequence counts up by its own stride, mod the vocabulary
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, 128, (n, 1), generator=g)
           + torch.randint(1, 4, (n, 1), generator=g) * torch.arange(16)) % 128
    return [{"input_ids": x, "labels": x} for x in ids]

model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=16, n_embd=64, n_layer=2,
                                   n_head=4, bos_token_id=0, eos_token_id=0))
args = TrainingArguments("runs/hf_trainer", max_steps=60, save_steps=4, save_total_limit=10,
                         learning_rate=1e-2, lr_scheduler_type="constant", use_cpu=True,
                         per_device_train_batch_size=16, report_to=[], logging_steps=10)
sewa = SewaCallback(k=4, window=10)
trainer = Trainer(model=model, args=args, train_dataset=tokens(2048, 0),
                  eval_dataset=tokens(128, 1), callbacks=[sewa])
trainer.train()  # at the end trainer.model holds sewa's average
r = sewa.result
print(f"held-out loss: sewa's average of steps {r['selected_steps']} {r['published_loss']:.4f};"
      f" last checkpoint (step {r['newest_member_step']}) {r['newest_member_loss']:.4f}")
