#!/usr/bin/env python
"""Build, train and package the embedded demo checkpoint (`nemotron/demo/`): a small Nemotron-4 that writes Python.

Three steps, each a subcommand (run from the repository root):

    # 1. here (CPU): corpus from this interpreter's standard library, SentencePiece tokenizer, tokenised .bin files
    .venv/bin/python scripts/train_demo.py corpus --out .demo-train
    # 2. on a GPU (needs torch, pytorch-lightning, safetensors, numpy; not megatron-core):
    PYTHONPATH=. python3 scripts/train_demo.py train --data .demo-train --out OUT --time-budget 285
    # 3. here (needs megatron-core): NeMo unpacked directory with torch_dist bf16 weights, reference loss, sample
    .venv/bin/python scripts/train_demo.py package --data .demo-train --weights OUT --out nemotron/demo

The corpus is the CPython standard library's own .py sources (PSF license) of the interpreter running `corpus`;
`corpus/files.json` records which files went where. Documents are separated by EOS (id 3) in the .bin files
and by a `<|endoftext|>` line in the .txt files.

The model is `nemotron.model.NemotronModel` itself (GQA, partial RoPE, squared-ReLU, LayerNorm1p, untied
output layer), trained by a pytorch-lightning module: AdamW, linear warmup then cosine decay driven by
max(step progress, wall-clock progress), bf16-mixed on GPU, gradient clipping, residual dropout added with
forward hooks (the serving model has none). The weights with the best validation loss are the ones written.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# --- what is built ---------------------------------------------------------------------------------------------
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
MAX_FILE_BYTES = 200 * 1024
VALID_PER_10000 = 300  # ~3% of files, chosen by a stable hash of the relative path
EOS_TEXT = "<|endoftext|>"
USER_SYMBOLS = ["<extra_id_0>", "<extra_id_1>", "<|endoftext|>", "\n"]
VOCAB_SIZE = 4096
SEED = 1234

# The model (Nemotron-4 recipe, ~7.6 M parameters, 15.2 MB in bf16).
MODEL = dict(num_layers=8, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8, num_query_groups=2,
             kv_channels=32, max_position_embeddings=1024, rotary_percentage=0.5, rotary_base=10000.0,
             layernorm_epsilon=1e-5, layernorm_zero_centered_gamma=True, make_vocab_size_divisible_by=128)

# NeMo names tokenizer artifacts "<uuid4().hex>_<basename>"; a fixed hex ("nemotron_demo_tk") keeps reruns stable.
TOKENIZER_HEX = "6e656d6f74726f6e5f64656d6f5f746b"
TOKENIZER_ARTIFACT = f"{TOKENIZER_HEX}_tokenizer.model"

# The reference slice a test recomputes: REF_ROWS rows of REF_LEN predictions from the start of valid.bin.
REF_ROWS, REF_LEN = 8, 256
SAMPLE_PROMPT = "def fibonacci(n):"
SAMPLE_TOKENS = 48


# =============================================================================================================
# corpus
# =============================================================================================================
def stdlib_files(root: Path) -> tuple[list[str], list[dict]]:
    """Relative posix paths of the stdlib .py files we use (sorted), and what was skipped and why."""
    used, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = (rel_dir / name).as_posix()
            size = (Path(dirpath) / name).stat().st_size
            if size > MAX_FILE_BYTES:
                skipped.append({"path": rel, "why": f"{size} bytes > {MAX_FILE_BYTES}"})
            else:
                used.append(rel)
    return sorted(used), skipped


def is_valid_file(rel: str) -> bool:
    digest = hashlib.sha256(rel.encode("utf-8")).hexdigest()
    return int(digest[:8], 16) % 10000 < VALID_PER_10000


def train_tokenizer(lines: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    # sentence_iterator + model_writer keep file paths out of the stored trainer_spec (byte-stable reruns).
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=USER_SYMBOLS,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # keep indentation: decode(encode(x)) == x
        allow_whitespace_only_pieces=True,  # indentation runs become single pieces ("▁▁▁▁", "▁▁▁▁▁▁▁▁", ...)
        # Training reads line by line but documents are encoded whole, where a line follows "\n" with no
        # dummy prefix; without one in training either, line starts are tokenised the way they were learned.
        add_dummy_prefix=False,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=2,
        minloglevel=2,
    )
    return buf.getvalue()


def cmd_corpus(args) -> None:
    import numpy as np
    import sentencepiece as spm

    out = Path(args.out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    root = Path(sysconfig.get_paths()["stdlib"])
    files, skipped = stdlib_files(root)
    docs = {"train": [], "valid": []}
    for rel in files:
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            skipped.append({"path": rel, "why": f"not UTF-8 ({exc.reason})"})
            continue
        if not text.strip():
            skipped.append({"path": rel, "why": "empty"})
            continue
        docs["valid" if is_valid_file(rel) else "train"].append((rel, text))

    for split, items in docs.items():
        with open(out / "corpus" / f"{split}.txt", "w", encoding="utf-8", newline="") as f:
            for _, text in items:
                f.write(text if text.endswith("\n") else text + "\n")
                f.write(EOS_TEXT + "\n")

    t0 = time.time()
    lines = [line for _, text in docs["train"] for line in text.splitlines()]
    model = train_tokenizer(lines, args.vocab_size)
    (out / "tokenizer.model").write_bytes(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert sp.get_piece_size() == args.vocab_size
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    for sym in USER_SYMBOLS:
        assert sp.piece_to_id(sym) in sp.encode("a" + sym + "b"), sym
    print(f"tokenizer: {args.vocab_size} pieces from {len(lines)} lines in {time.time() - t0:.1f} s")

    stats = {}
    for split, items in docs.items():
        ids: list[int] = []
        chars = 0
        for _, text in items:
            piece_ids = sp.encode(text)
            if split == "valid" and len(ids) == 0:
                assert sp.decode(piece_ids) == text, "tokenizer does not round-trip"
            ids.extend(piece_ids)
            ids.append(sp.eos_id())
            chars += len(text)
        arr = np.asarray(ids, dtype=np.uint16)
        assert int(arr.max()) < args.vocab_size
        arr.tofile(out / f"{split}.bin")
        stats[split] = {"files": len(items), "chars": chars, "tokens": int(arr.size),
                        "chars_per_token": round(chars / max(1, arr.size - len(items)), 3)}
        print(f"{split}: {len(items)} files, {chars} chars, {arr.size} tokens")

    manifest = {
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "rules": {"skip_dirs": sorted(SKIP_DIRS), "max_file_bytes": MAX_FILE_BYTES,
                  "valid": f"int(sha256(relpath)[:8], 16) % 10000 < {VALID_PER_10000}"},
        "stats": stats,
        "train": [rel for rel, _ in docs["train"]],
        "valid": [rel for rel, _ in docs["valid"]],
        "skipped": skipped,
        "tokenizer_sha256": hashlib.sha256(model).hexdigest(),
    }
    (out / "corpus" / "files.json").write_text(json.dumps(manifest, indent=1))
    print(f"wrote {out}/corpus/{{train,valid}}.txt, files.json, tokenizer.model, train.bin, valid.bin")


# =============================================================================================================
# train (GPU; no megatron-core)
# =============================================================================================================
def model_config(vocab_size: int, overrides: dict | None = None):
    from nemotron.config import ModelConfig, pad_vocab_size

    fields = dict(MODEL, **(overrides or {}))
    fields["padded_vocab_size"] = pad_vocab_size(vocab_size, fields["make_vocab_size_divisible_by"])
    return ModelConfig(**fields)


def init_weights(model, seed: int) -> None:
    """Megatron's init: N(0, 0.02); output projections scaled by 1/sqrt(2 L); LayerNorm1p gamma-1 and beta 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    scaled = 0.02 / math.sqrt(2 * model.cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.zero_()
            elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                p.copy_(torch.randn(p.shape, generator=gen) * scaled)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def add_dropout(model, p: float) -> None:
    """Residual (hidden) dropout after embedding, attention and MLP, as Megatron's hidden_dropout does."""
    import torch.nn.functional as F

    if p <= 0:
        return

    def hook(module, inputs, output):
        return F.dropout(output, p, module.training)

    model.embedding.word_embeddings.register_forward_hook(hook)
    for layer in model.decoder.layers:
        layer.self_attention.register_forward_hook(hook)
        layer.mlp.register_forward_hook(hook)


def lm_loss(model, tokens, reduction: str = "mean"):
    """Next-token cross entropy of a [B, T+1] block (fp32 logits)."""
    import torch.nn.functional as F

    x, y = tokens[:, :-1], tokens[:, 1:]
    logits = model.logits(model(x)).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


class RandomWindows:
    """Map-style dataset: item i is a whole batch of random windows, drawn from a generator seeded by (seed, i)."""

    def __init__(self, tokens, batch_size: int, seq_len: int, length: int, seed: int):
        self.tokens, self.batch_size, self.seq_len, self.length, self.seed = tokens, batch_size, seq_len, length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        import numpy as np
        import torch

        rng = np.random.default_rng([self.seed, i])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)
        idx = starts[:, None] + np.arange(self.seq_len + 1)[None, :]
        return torch.from_numpy(self.tokens[idx].astype(np.int64))


def fixed_windows(tokens, seq_len: int, max_windows: int | None = None, seed: int | None = None):
    """[N, seq_len+1] windows: consecutive (stride seq_len) from the start, or `max_windows` random ones with seed."""
    import numpy as np
    import torch

    n = (len(tokens) - 1) // seq_len
    if seed is None:
        starts = np.arange(n if max_windows is None else min(n, max_windows)) * seq_len
    else:
        starts = np.sort(np.random.default_rng(seed).integers(0, len(tokens) - seq_len - 1, size=max_windows))
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


def make_lightning_module(cfg, args):
    import pytorch_lightning as pl
    import torch

    from nemotron.model import NemotronModel

    class DemoLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = NemotronModel(cfg)
            init_weights(self.model, args.seed)
            add_dropout(self.model, args.dropout)
            self.t_start = None
            self.best_val, self.best_step, self.best_state = float("inf"), -1, None
            self.history = []
            self._val_sums = {}

        # schedule: warmup, then cosine from lr to lr*min_lr_ratio over max(step, wall-clock) progress
        def progress(self, step: int) -> float:
            by_steps = step / args.max_steps
            by_time = 0.0 if self.t_start is None else (time.time() - self.t_start) / args.time_budget
            return min(1.0, max(by_steps, by_time))

        def lr_factor(self, step: int) -> float:
            if step < args.warmup:
                return (step + 1) / args.warmup
            p = self.progress(step)
            return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

        def configure_optimizers(self):
            decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
            no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                     {"params": no_decay, "weight_decay": 0.0}],
                                    lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                                    foreach=True)  # Lightning refuses to clip with fused=True
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def training_step(self, batch, batch_idx):
            return lm_loss(self.model, batch)  # printed by the Budget callback (self.log would sync every step)

        def on_validation_epoch_start(self):
            self._val_sums = {}

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            loss_sum = lm_loss(self.model, batch, reduction="sum")
            s = self._val_sums.setdefault(dataloader_idx, [0.0, 0])
            s[0] += float(loss_sum)
            s[1] += batch[:, 1:].numel()

        def on_validation_epoch_end(self):
            val = self._val_sums[0][0] / self._val_sums[0][1]
            trn = self._val_sums[1][0] / self._val_sums[1][1] if 1 in self._val_sums else float("nan")
            self.log("val_loss", val)
            step = self.global_step
            elapsed = 0.0 if self.t_start is None else time.time() - self.t_start
            self.history.append({"step": step, "time_s": round(elapsed, 1), "val_loss": round(val, 4),
                                 "train_loss_eval": round(trn, 4),
                                 "lr": round(self.trainer.optimizers[0].param_groups[0]["lr"], 6)})
            print(f"step {step:6d}  t {elapsed:6.1f}s  val {val:.4f}  train(eval) {trn:.4f}  "
                  f"lr {self.history[-1]['lr']:.2e}", flush=True)
            if val < self.best_val:
                self.best_val, self.best_step = val, step
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    return DemoLM()


def make_budget_callback(args, counters):
    import pytorch_lightning as pl
    import torch

    class Budget(pl.Callback):
        """Starts the clock, counts tokens and time spent validating, stops at the wall-clock budget."""

        def on_train_start(self, trainer, module):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            module.t_start = counters["t_start"] = time.time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            counters["tokens"] += batch[:, 1:].numel()
            counters["steps"] += 1
            if counters["steps"] % args.log_every == 0:
                print(f"step {counters['steps']:6d}  t {time.time() - counters['t_start']:6.1f}s  "
                      f"loss {float(outputs['loss']):.4f}", flush=True)
            if time.time() - counters["t_start"] >= args.time_budget:
                trainer.should_stop = True

        def on_validation_start(self, trainer, module):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            counters["val_t0"] = time.time()

        def on_validation_end(self, trainer, module):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            counters["val_time"] += time.time() - counters["val_t0"]

    return Budget()


def save_weights(state: dict, out: Path, max_file_bytes: int) -> list[str]:
    """fp32 safetensors: `weights.safetensors`, or shards plus `weights.safetensors.index.json` if too big."""
    from safetensors.torch import save_file

    tensors = {k: v.float().contiguous() for k, v in state.items()}
    total = sum(t.numel() * 4 for t in tensors.values())
    if total + 65536 <= max_file_bytes:
        save_file(tensors, str(out / "weights.safetensors"))
        return ["weights.safetensors"]
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        if current and size + t.numel() * 4 > max_file_bytes - 65536:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += t.numel() * 4
    shards.append(current)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"weights-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname))
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "weights.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return names + ["weights.safetensors.index.json"]


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    single = folder / "weights.safetensors"
    if single.exists():
        return load_file(str(single))
    index = json.loads((folder / "weights.safetensors.index.json").read_text())
    state = {}
    for fname in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(folder / fname)))
    missing = set(index["weight_map"]) - set(state)
    if missing:
        raise SystemExit(f"{folder}: shards lack {sorted(missing)[:5]}")
    return state


def cmd_train(args) -> None:
    import numpy as np
    import pytorch_lightning as pl
    import torch

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_launch = time.time()
    on_gpu = torch.cuda.is_available()
    gpu_name = torch.cuda.get_device_name(0) if on_gpu else "none (CPU)"
    print(f"torch {torch.__version__}, lightning {pl.__version__}, device: {gpu_name}", flush=True)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pl.seed_everything(args.seed, workers=True)

    train_tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    valid_tokens = np.fromfile(data / "valid.bin", dtype=np.uint16)
    vocab = args.vocab_size
    cfg = model_config(vocab, json.loads(args.model_overrides) if args.model_overrides else None)
    print(f"train {train_tokens.size} tokens, valid {valid_tokens.size} tokens; model {cfg}; "
          f"{cfg.num_parameters()} parameters", flush=True)

    module = make_lightning_module(cfg, args)
    assert sum(p.numel() for p in module.model.parameters()) == cfg.num_parameters()
    train_ds = RandomWindows(train_tokens, args.batch_size, args.seq_len, args.max_steps, args.seed)
    train_dl = torch.utils.data.DataLoader(train_ds, batch_size=None, shuffle=False, num_workers=args.workers,
                                           pin_memory=on_gpu, persistent_workers=args.workers > 0)
    val_windows = fixed_windows(valid_tokens, args.seq_len, args.max_val_windows)
    train_eval_windows = fixed_windows(train_tokens, args.seq_len, len(val_windows), seed=args.seed + 1)
    val_dls = [torch.utils.data.DataLoader(w, batch_size=args.eval_batch_size, shuffle=False)
               for w in (val_windows, train_eval_windows)]
    print(f"validation: {len(val_windows)} windows of {args.seq_len} (+ the same number of train windows)",
          flush=True)

    counters = {"tokens": 0, "steps": 0, "val_time": 0.0, "t_start": None}
    trainer = pl.Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=1,
        precision="bf16-mixed" if on_gpu else "32-true",
        max_steps=args.max_steps, gradient_clip_val=args.grad_clip, gradient_clip_algorithm="norm",
        val_check_interval=min(args.val_every, args.max_steps), num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[make_budget_callback(args, counters)], deterministic=False,
    )
    trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dls)
    if on_gpu:
        torch.cuda.synchronize()
    train_time = time.time() - counters["t_start"]

    # Final numbers: the last weights and the best (by validation loss), in fp32 without dropout.
    model = module.model.eval()
    device = next(model.parameters()).device

    @torch.no_grad()
    def evaluate(windows) -> float:
        total, count = 0.0, 0
        for i in range(0, len(windows), args.eval_batch_size):
            block = windows[i: i + args.eval_batch_size].to(device)
            total += float(lm_loss(model, block, reduction="sum"))
            count += block[:, 1:].numel()
        return total / count

    last_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    last = {"val_loss": evaluate(val_windows), "train_loss_eval": evaluate(train_eval_windows),
            "step": counters["steps"]}
    best, state = last, last_state
    if module.best_state is not None and module.best_step != counters["steps"]:
        model.load_state_dict(module.best_state)
        candidate = {"val_loss": evaluate(val_windows), "train_loss_eval": evaluate(train_eval_windows),
                     "step": module.best_step}
        if candidate["val_loss"] < last["val_loss"]:
            best, state = candidate, module.best_state
    print(f"last step {last['step']}: val {last['val_loss']:.4f}; selected step {best['step']}: "
          f"val {best['val_loss']:.4f} (fp32 eval)", flush=True)
    files = save_weights(state, out, args.max_file_mb * 1024 * 1024)

    train_time_net = train_time - counters["val_time"]
    metrics = {
        "model_config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "parameters": cfg.num_parameters(),
        "vocab_size": vocab,
        "train_loss": best["train_loss_eval"],
        "val_loss": best["val_loss"],
        "val_perplexity": math.exp(best["val_loss"]),
        "selected_step": best["step"],
        "last": {**last, "val_perplexity": math.exp(last["val_loss"])},
        "steps": counters["steps"],
        "tokens_seen": counters["tokens"],
        "epochs": counters["tokens"] / train_tokens.size,
        "train_tokens": int(train_tokens.size),
        "valid_tokens": int(valid_tokens.size),
        "val_windows": int(len(val_windows)),
        "wall_time_s": train_time,
        "train_time_excl_val_s": train_time_net,
        "tokens_per_s": counters["tokens"] / max(1e-9, train_time_net),
        "total_script_time_s": time.time() - t_launch,
        "gpu": gpu_name,
        "precision": "bf16-mixed" if on_gpu else "32-true",
        "torch": torch.__version__,
        "pytorch_lightning": pl.__version__,
        "hyperparameters": {k: getattr(args, k) for k in
                            ("batch_size", "seq_len", "lr", "min_lr_ratio", "warmup", "weight_decay", "dropout",
                             "grad_clip", "max_steps", "time_budget", "val_every", "seed")},
        "history": module.history,
        "weights_files": files,
        "train_loss_note": "train_loss is measured like val_loss (eval mode, fp32, fixed random train windows)",
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("history", "model_config")}, indent=1),
          flush=True)


# =============================================================================================================
# package (CPU, megatron-core)
# =============================================================================================================
def greedy(model, tokenizer, prompt: str, n: int) -> tuple[list[int], str]:
    """Plain-recompute greedy decoding (fp32, CPU); stops early at EOS."""
    import torch

    ids = tokenizer.text_to_ids(prompt)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids + new])
            nxt = int(model.logits(model(x))[0, -1].argmax())
            new.append(nxt)
            if nxt == tokenizer.eos_id:
                break
    return new, tokenizer.ids_to_text(new)


def reference_slice(valid_tokens):
    """REF_ROWS rows: inputs valid[r*L : r*L+L], targets one later (the slice is valid[: REF_ROWS*L + 1])."""
    import torch

    flat = [int(t) for t in valid_tokens[: REF_ROWS * REF_LEN + 1]]
    rows = [flat[r * REF_LEN: r * REF_LEN + REF_LEN + 1] for r in range(REF_ROWS)]
    return flat, torch.tensor(rows, dtype=torch.long)


def cmd_package(args) -> None:
    import numpy as np
    import torch
    import yaml

    from nemotron.checkpoint import torch_dist
    from nemotron.config import ModelConfig, to_nemo_config
    from nemotron.model import NemotronModel
    from nemotron.tokenizer import Tokenizer

    data, weights_dir, out = Path(args.data), Path(args.weights), Path(args.out)
    metrics = json.loads((weights_dir / "metrics.json").read_text())
    cfg = ModelConfig(**metrics["model_config"])
    state = load_weights(weights_dir)

    # Weights: bf16 torch_dist through megatron-core's dist_checkpointing.
    bf16 = NemotronModel(cfg, dtype=torch.bfloat16)
    bf16.load_state_dict(state, strict=True)  # casts fp32 -> bf16
    if out.exists():
        for child in ("model_weights", "model_config.yaml", TOKENIZER_ARTIFACT, "metrics.json"):
            path = out / child
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    torch_dist.save(bf16, str(out / "model_weights"))
    shutil.copyfile(data / "tokenizer.model", out / TOKENIZER_ARTIFACT)
    nemo_cfg = to_nemo_config(cfg)
    nemo_cfg["tokenizer"] = {"library": "sentencepiece", "type": None, "model": f"nemo:{TOKENIZER_ARTIFACT}",
                             "vocab_file": None, "merge_file": None, "sentencepiece_legacy": False}
    (out / "model_config.yaml").write_text(yaml.safe_dump(nemo_cfg, sort_keys=False, default_flow_style=False))

    # Read it back the way users and tests do: torch_dist.load into an fp32 model.
    model = NemotronModel(cfg, dtype=torch.float32)
    torch_dist.load(model, str(out / "model_weights"))
    for name, p in model.named_parameters():
        want = state[name].to(torch.bfloat16).float()
        assert torch.equal(p.detach(), want), name
    model.eval()
    tokenizer = Tokenizer(str(out / TOKENIZER_ARTIFACT))

    valid_tokens = np.fromfile(data / "valid.bin", dtype=np.uint16)
    flat, rows = reference_slice(valid_tokens)
    with torch.no_grad():
        ref_loss = float(lm_loss(model, rows))
        total, count = 0.0, 0
        if not args.skip_full_valid:
            seq = metrics["hyperparameters"]["seq_len"]
            windows = fixed_windows(valid_tokens, seq, metrics.get("val_windows"))
            for i in range(0, len(windows), 4):
                block = windows[i: i + 4]
                total += float(lm_loss(model, block, reduction="sum"))
                count += block[:, 1:].numel()
    new_ids, completion = greedy(model, tokenizer, SAMPLE_PROMPT, SAMPLE_TOKENS)
    new_ids2, _ = greedy(model, tokenizer, SAMPLE_PROMPT, SAMPLE_TOKENS)
    assert new_ids == new_ids2

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name not in ("README.md",))
    manifest = json.loads((data / "corpus" / "files.json").read_text())
    packaged = {
        **{k: v for k, v in metrics.items() if k != "weights_files"},
        "checkpoint": {"format": "torch_dist", "dtype": "bfloat16", "bytes_on_disk": size,
                       "tokenizer": TOKENIZER_ARTIFACT},
        "corpus": {"python": manifest["python"], "stats": manifest["stats"], "valid_files": manifest["valid"],
                   "skip_dirs": manifest["rules"]["skip_dirs"], "max_file_bytes": manifest["rules"]["max_file_bytes"],
                   "valid_rule": manifest["rules"]["valid"]},
        "bf16_val_loss": (total / count) if count else None,
        "bf16_val_perplexity": math.exp(total / count) if count else None,
        "reference": {
            "what": f"mean next-token loss of {REF_ROWS} rows x {REF_LEN} predictions: row r predicts "
                    f"tokens[r*{REF_LEN}+1 : r*{REF_LEN}+{REF_LEN + 1}] from tokens[r*{REF_LEN} : r*{REF_LEN}+"
                    f"{REF_LEN}]; tokens = valid.bin[:{REF_ROWS * REF_LEN + 1}]; fp32 CPU forward of the bf16 "
                    f"weights as loaded by torch_dist.load",
            "rows": REF_ROWS, "seq_len": REF_LEN, "loss": ref_loss, "tokens": flat,
        },
        "sample": {"prompt": SAMPLE_PROMPT, "max_tokens": SAMPLE_TOKENS, "greedy_ids": new_ids,
                   "completion": completion},
    }
    (out / "metrics.json").write_text(json.dumps(packaged, indent=1) + "\n")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {size} bytes; reference loss {ref_loss:.5f}; bf16 val loss {packaged['bf16_val_loss']}")
    print(f"--- {SAMPLE_PROMPT!r} ->\n{SAMPLE_PROMPT}{completion}\n---")


# =============================================================================================================
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("corpus", help="stdlib corpus, tokenizer, train.bin/valid.bin")
    c.add_argument("--out", default=".demo-train")
    c.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)

    t = sub.add_parser("train", help="train with pytorch-lightning; writes weights + metrics.json")
    t.add_argument("--data", default=".demo-train")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    t.add_argument("--model-overrides", default=None, help="JSON dict of ModelConfig fields (for quick tests)")
    t.add_argument("--time-budget", type=float, default=285.0, help="training wall-clock seconds")
    t.add_argument("--max-steps", type=int, default=6000)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr-ratio", type=float, default=0.05)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--val-every", type=int, default=200)
    t.add_argument("--max-val-windows", type=int, default=None)
    t.add_argument("--eval-batch-size", type=int, default=16)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--max-file-mb", type=int, default=15, help="split weights into safetensors shards above this")
    t.add_argument("--seed", type=int, default=SEED)

    k = sub.add_parser("package", help="write the NeMo unpacked directory (bf16 torch_dist)")
    k.add_argument("--data", default=".demo-train")
    k.add_argument("--weights", required=True, help="folder with weights*.safetensors and metrics.json")
    k.add_argument("--out", default=str(REPO / "nemotron" / "demo"))
    k.add_argument("--skip-full-valid", action="store_true")

    args = p.parse_args(argv)
    {"corpus": cmd_corpus, "train": cmd_train, "package": cmd_package}[args.cmd](args)


if __name__ == "__main__":
    main()
