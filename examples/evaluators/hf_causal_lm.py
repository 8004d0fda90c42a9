"""Held-out token loss of a Hugging Face causal LM, served to sewa (protocol 2).

    python hf_causal_lm.py MODEL_DIR HELDOUT [--device cuda] [--max-tokens 512] [--batch 8]

MODEL_DIR is any `AutoModelForCausalLM` directory (config.json, tokenizer; e.g. the base model
the trainer started from, or one of its `checkpoint-N/` dirs): it gives the architecture and
the tokenizer. Its weights are replaced on every request by the mixture of the window's members
sewa names (torch.func.functional_call), so the model is built once. HELDOUT is a text file
(one document per non-empty line) or a jsonl file (`--text-key`, default "text").

The loss is the mean next-token cross-entropy over the held-out tokens; the gradient comes by
autograd. Under `torchrun --nproc_per_node N` every rank takes its share of the documents.

sewa config:

    [select]
    method = "sewa"
    k = 5
    [objective]
    kind = "command"
    command = ["python", "hf_causal_lm.py", "/models/base", "heldout.jsonl", "--device", "cuda"]
    startup_timeout_s = 600
"""

import argparse
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

try:
    import sewa_evaluator
except ImportError:  # running from a sewa checkout without `pip install ./clients/python`
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "..", "clients", "python"))
    import sewa_evaluator


def documents(path, text_key):
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    lines = [line for line in lines if line]
    if path.endswith(".jsonl"):
        return [json.loads(line)[text_key] for line in lines]
    return lines


def batches(tokenizer, docs, max_tokens, batch, device):
    """[(input_ids, attention_mask, labels)] with padding masked out of the labels."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    out = []
    for i in range(0, len(docs), batch):
        enc = tokenizer(docs[i:i + batch], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append((enc["input_ids"].to(device), enc["attention_mask"].to(device),
                    labels.to(device)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("heldout")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--members-on", default="device", choices=["device", "cpu"])
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--text-key", default="text")
    args = ap.parse_args()

    rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{rank}" if args.device == "cuda" and "WORLD_SIZE" in os.environ else args.device
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).to(device).eval()
    docs = sewa_evaluator.shard(documents(args.heldout, args.text_key))
    data = batches(tokenizer, docs, args.max_tokens, args.batch, device)
    # Tokens predicted (each sequence's first token has no prediction).
    total = sum(int((lab[:, 1:] != -100).sum()) for _, _, lab in data)
    print(f"hf_causal_lm: {len(docs)} documents, {total} held-out tokens on {device}",
          file=sys.stderr)

    def loss_fn(weights):
        loss = 0.0
        for ids, mask, labels in data:
            logits = torch.func.functional_call(
                model, weights, args=(), kwargs={"input_ids": ids, "attention_mask": mask}
            ).logits
            loss = loss + torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                ignore_index=-100, reduction="sum")
        return loss / max(total, 1)

    sewa_evaluator.serve(loss_fn, device=device, members_on=args.members_on,
                         name=f"hf_causal_lm {os.path.basename(args.model_dir.rstrip('/'))}")


if __name__ == "__main__":
    main()
