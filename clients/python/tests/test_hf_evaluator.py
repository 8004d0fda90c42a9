"""`python -m sewa.evaluators.hf` with real transformers models built from configs in code (no
hub): driven over the protocol and compared with an in-process torch computation of the same
mixture; through `sewa average --select`; its errors; and text mode with a tokenizer built in
code."""

import json
import math
import os
import subprocess

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from _proto import CLIENT, PYTHON, Evaluator, env  # noqa: E402

from sewa.evaluators import _batches  # noqa: E402

MODULE = [PYTHON, "-m", "sewa.evaluators.hf"]
VOCAB = 64


def gpt2_config():
    return transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                   n_positions=32, bos_token_id=1, eos_token_id=1)


def llama_config():
    return transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=128,
                                    vocab_size=VOCAB, max_position_embeddings=32,
                                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=1,
                                    pad_token_id=0)


def bert_config():
    return transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                   intermediate_size=64, vocab_size=VOCAB,
                                   max_position_embeddings=32, num_labels=3, pad_token_id=0)


CLASSES = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM,
           "bert": transformers.BertForSequenceClassification}
CONFIGS = {"gpt2": gpt2_config, "llama": llama_config, "bert": bert_config}


def checkpoints(root, kind, n=3):
    """n HF checkpoint dirs (save_pretrained, different weights), as a Trainer writes them."""
    out = []
    for i in range(n):
        torch.manual_seed(10 + i)
        model = CLASSES[kind](CONFIGS[kind]())
        d = root / f"checkpoint-{(i + 1) * 10}"
        model.save_pretrained(d)
        (d / "trainer_state.json").write_text(json.dumps({"global_step": (i + 1) * 10}))
        out.append((str(i), str(d), "hf-dir"))
    return out


def lm_batches(seed=0):
    """Causal-LM batches of uneven padding: a mean of per-batch means is not the token mean."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, width, lens in ((2, 12, [12, 5]), (3, 20, [20, 3, 9]), (1, 7, [7])):
        ids = torch.randint(2, VOCAB, (rows, width), generator=g)
        mask = torch.zeros(rows, width, dtype=torch.long)
        for r, n in enumerate(lens):
            mask[r, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": ids.masked_fill(mask == 0, -100)})
    return out


def cls_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows in (4, 1, 3):
        ids = torch.randint(2, VOCAB, (rows, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.randint(0, 3, (rows,), generator=g)})
    return out


def mixture(members, alphas):
    ws = {mid: load_file(os.path.join(p, "model.safetensors")) for mid, p, _ in members}
    names = list(next(iter(ws.values())))
    mixed = {n: sum(a * ws[m][n].float() for m, a in alphas.items()) for n in names}
    return ws, mixed


def reference(kind, members, alphas, batches):
    """Loss and dots by plain torch: the true token (or row) mean over every batch, and
    ⟨∇F, w_i⟩ by autograd on that one scalar."""
    ws, mixed = mixture(members, alphas)
    model = CLASSES[kind](CONFIGS[kind]()).eval()
    leaves = {n: t.clone().requires_grad_(True) for n, t in mixed.items()}
    total, count = 0.0, 0
    for b in batches:
        out = torch.func.functional_call(model, leaves, args=(), kwargs=b)
        if kind == "bert":
            total = total + torch.nn.functional.cross_entropy(out.logits, b["labels"],
                                                              reduction="sum")
            count += len(b["labels"])
        else:
            logits, lab = out.logits[:, :-1], b["labels"][:, 1:]
            total = total + torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), lab.flatten(), ignore_index=-100, reduction="sum")
            count += int((lab != -100).sum())
    loss = total / count
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    g = dict(zip(leaves, grads))
    dots = {m: float(sum((g[n].double() * w[n].double()).sum() for n in w if g[n] is not None))
            for m, w in ws.items()}
    return float(loss.detach()), dots


def assert_matches(reply, ref, rtol=1e-4):
    loss, dots = ref
    assert reply["type"] == "result", reply
    assert math.isclose(reply["loss"], loss, rel_tol=rtol), (reply, ref)
    for m, d in dots.items():
        assert math.isclose(reply["dots"][m], d, rel_tol=rtol, abs_tol=1e-5), (m, reply, ref)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_protocol_loss_and_dots_match_torch(tmp_path, kind):
    members = checkpoints(tmp_path, kind)
    batches = lm_batches() if kind != "bert" else cls_batches()
    bfile = str(tmp_path / "heldout.pt")
    _batches.save(bfile, batches)
    alphas = [{"0": 0.2, "1": 0.3, "2": 0.5}, {"2": 1.0}]
    with Evaluator(MODULE + ["--batches", bfile, "--threads", "1"]) as ev:
        ev.hello()
        assert ev.members(members) == {"type": "ready", "members": 3}
        replies = [ev.evaluate(a, rid=i) for i, a in enumerate(alphas)]
        fwd = ev.evaluate(alphas[0], grad=False, rid=9)
        err = ev.stderr()
    for reply, a in zip(replies, alphas):
        assert_matches(reply, reference(kind, members, a, batches))
    assert "dots" not in fwd and math.isclose(fwd["loss"], replies[0]["loss"], rel_tol=1e-6)
    mode = "rows" if kind == "bert" else "shifted tokens"
    assert f"loss: the mean over" in err and mode in err, err
    assert "torch intra-op threads: 1" in err and err.count("built ") == 1, err


def test_staged_copy_takes_config_dir_and_rebuilds_on_a_new_config(tmp_path):
    # sewa's staged copies are bare safetensors files in its private dir: --config-dir gives
    # the model. A member with another config (here: a Llama) rebuilds the model once.
    gpt = checkpoints(tmp_path / "gpt", "gpt2", n=2)
    staged = tmp_path / "staging"
    staged.mkdir()
    copies = []
    for mid, d, _ in gpt:
        p = staged / f"member-{mid}.safetensors"
        save_file(load_file(os.path.join(d, "model.safetensors")), str(p))
        copies.append((mid, str(p), "safetensors"))
    llama = checkpoints(tmp_path / "llama", "llama", n=1)
    bfile = str(tmp_path / "heldout.pt")
    batches = lm_batches(1)
    _batches.save(bfile, batches)
    with Evaluator(MODULE + ["--batches", bfile, "--config-dir", gpt[0][1]]) as ev:
        ev.hello()
        assert ev.members(copies) == {"type": "ready", "members": 2}
        r = ev.evaluate({"0": 0.5, "1": 0.5})
        assert ev.members([("9", llama[0][1], "hf-dir")], remove=["0", "1"])["type"] == "ready"
        r2 = ev.evaluate({"9": 1.0}, rid=2)
        err = ev.stderr()
    assert_matches(r, reference("gpt2", gpt, {"0": 0.5, "1": 0.5}, batches))
    assert_matches(r2, reference("llama", [("9",) + llama[0][1:]], {"9": 1.0}, batches))
    assert err.count("built GPT2LMHeadModel") == 1 and err.count("built LlamaForCausalLM") == 1


def test_members_that_do_not_fit_get_one_error_naming_them(tmp_path):
    members = checkpoints(tmp_path, "gpt2", n=1)
    d = members[0][1]
    w = load_file(os.path.join(d, "model.safetensors"))
    w["transformer.h.9.extra.weight"] = torch.zeros(3)
    del w["transformer.ln_f.bias"]
    w["transformer.wpe.weight"] = torch.zeros(16, 64)
    save_file(w, os.path.join(d, "model.safetensors"))
    bfile = str(tmp_path / "heldout.pt")
    _batches.save(bfile, lm_batches())
    with Evaluator(MODULE + ["--batches", bfile]) as ev:
        ev.hello()
        assert ev.members(members)["type"] == "ready"
        r = ev.evaluate({"0": 1.0})
    assert r["type"] == "error", r
    msg = r["message"]
    assert "do not fit GPT2LMHeadModel" in msg and os.path.join(d, "config.json") in msg, msg
    assert "1 tensors the model does not have: transformer.h.9.extra.weight" in msg, msg
    assert "1 tensors the model needs that the members lack: transformer.ln_f.bias" in msg, msg
    assert "transformer.wpe.weight (member (16, 64), model (32, 64))" in msg, msg


def test_an_unknown_architecture_is_refused_naming_the_config(tmp_path):
    members = checkpoints(tmp_path, "gpt2", n=1)
    cfg_path = os.path.join(members[0][1], "config.json")
    cfg = json.load(open(cfg_path))
    cfg["architectures"] = ["os.system"]
    json.dump(cfg, open(cfg_path, "w"))
    bfile = str(tmp_path / "heldout.pt")
    _batches.save(bfile, lm_batches())
    with Evaluator(MODULE + ["--batches", bfile]) as ev:
        ev.hello()
        r = ev.members(members)
    assert r["type"] == "error" and cfg_path in r["message"], r
    assert "names no model class" in r["message"], r


def tokenizer_dir(root):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[PAD]", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                pad_token="[PAD]")
    d = root / "tok"
    fast.save_pretrained(d)
    return str(d)


def test_text_mode_tokenizes_the_whole_file_in_context_blocks(tmp_path):
    members = checkpoints(tmp_path, "gpt2", n=2)
    tok = tokenizer_dir(tmp_path)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (75,), generator=g).tolist()
    # Short lines: per-line documents would be 5 tokens each, blocks of the whole file 32.
    lines = [" ".join(f"w{i - 2}" for i in ids[j:j + 5]) for j in range(0, len(ids), 5)]
    text = tmp_path / "heldout.txt"
    text.write_text("\n".join(lines) + "\n")
    with Evaluator(MODULE + ["--text", str(text), "--tokenizer", tok, "--batch", "2"]) as ev:
        ev.hello()
        assert ev.members(members)["type"] == "ready"
        r = ev.evaluate({"0": 0.5, "1": 0.5})
        err = ev.stderr()
    # n_positions is 32: blocks of 32, 32 and 11 tokens, in batches of 2 and 1.
    assert "75 tokens in 3 blocks of at most 32 tokens (the model's context 32)" in err, err
    want = []
    blocks = [ids[0:32], ids[32:64], ids[64:75]]
    for rows in (blocks[:2], blocks[2:]):
        width = max(len(b) for b in rows)
        t = torch.zeros(len(rows), width, dtype=torch.long)
        m = torch.zeros(len(rows), width, dtype=torch.long)
        for i, b in enumerate(rows):
            t[i, :len(b)], m[i, :len(b)] = torch.tensor(b), 1
        want.append({"input_ids": t, "attention_mask": m, "labels": t.masked_fill(m == 0, -100)})
    assert_matches(r, reference("gpt2", members, {"0": 0.5, "1": 0.5}, want))


def test_text_mode_jsonl_documents_and_max_tokens_over_the_context(tmp_path):
    members = checkpoints(tmp_path, "gpt2", n=1)
    tok = tokenizer_dir(tmp_path)
    text = tmp_path / "heldout.jsonl"
    text.write_text("\n".join(json.dumps({"body": " ".join(f"w{i}" for i in range(n))})
                              for n in (40, 3)) + "\n")
    args = ["--text", str(text), "--tokenizer", tok, "--text-key", "body"]
    with Evaluator(MODULE + args + ["--max-tokens", "16"]) as ev:
        ev.hello()
        assert ev.members(members)["type"] == "ready"
        assert ev.evaluate({"0": 1.0}, grad=False)["type"] == "result"
        err = ev.stderr()
    # 40 tokens -> 16, 16, 8; 3 tokens -> 3: one document never runs into the next.
    assert "2 documents, 43 tokens in 4 blocks of at most 16 tokens (--max-tokens)" in err, err
    with Evaluator(MODULE + args + ["--max-tokens", "64"]) as ev:
        ev.hello()
        r = ev.members(members)
    assert r["type"] == "error" and "--max-tokens 64 is more than the model's context (32" \
        in r["message"], r


def test_sewa_average_select_runs_the_module_end_to_end(tmp_path):
    sewa = os.environ.get("SEWA_BIN") or __import__("shutil").which("sewa")
    if not sewa:
        pytest.skip("no sewa binary (set SEWA_BIN)")
    members = checkpoints(tmp_path, "gpt2", n=3)
    bfile = str(tmp_path / "heldout.pt")
    _batches.save(bfile, lm_batches())
    cfg = tmp_path / "sewa.toml"
    cfg.write_text(
        "[objective]\nkind = \"command\"\n"
        f"command = {json.dumps(MODULE + ['--batches', bfile, '--threads', '1'])}\n"
        f"env = {{ PYTHONPATH = {json.dumps(CLIENT)} }}\n"
        "timeout_s = 120\nstartup_timeout_s = 120\n")
    out = tmp_path / "avg.safetensors"
    p = subprocess.run([sewa, "average", "--config", str(cfg), "--select", "sewa", "--k", "2",
                        "--out", str(out)] + [d for _, d, _ in members],
                       capture_output=True, text=True, timeout=300, env=env())
    assert p.returncode == 0, p.stderr
    assert out.is_file()
    assert "sewa.evaluators.hf" in p.stderr and "built GPT2LMHeadModel" in p.stderr, p.stderr
    manifest = json.loads((tmp_path / "avg.safetensors.manifest.json").read_text())
    assert manifest.get("selection"), manifest
