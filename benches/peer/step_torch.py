#!/usr/bin/env python3
"""PyTorch peer of the gems training step, to time it side by side with the Rust trainer.

Mirrors, on the batches `gems_train::peer::dump` wrote (crates/gems-train/src/peer.rs):
  * forward.rs `target_loss`: rows padded on the RIGHT with `pad_id`; final hidden states
    gathered at (row, p - 1) for every p in target_pos[row]..len(row); the tied head applied to
    those rows only; mean cross-entropy against row[p]. One loss per task batch.
  * trainer.rs `step_gradients` + gems-optim accumulate.rs / optimizer.rs: every task batch is
    forwarded and backpropagated in order; its loss is weighted by rows / (rows of the whole
    step), so the summed gradient is sum_k (n_k / N) G_k (w_rec = w_src = 0.5 for equal batch
    sizes). The reported loss of a task is the row-weighted mean over its batches.
  * the trained part (batches.json `frozen_layers`, `embedding_rows_from`, written from the
    run's `model.tune_layers` and `model.embeddings`): the lowest `frozen_layers` layers get no
    gradients and run on a detached embedding lookup, so autograd records the upper layers
    only (Llama::freeze_lower_layers); of the tied table only rows `embedding_rows_from..`
    train (none when it is null), the others get no update and no moments.
  * gems-optim adam.rs (AdamW over the trained parameters, the tied table once), t the 1-based
    step:
        m = b1 m + (1 - b1) g     v = b2 v + (1 - b2) g^2     U = m / (sqrt(v) + eps)
        c_t = sqrt(1 - b2^t) / (1 - b1^t)      W = (W - lr c_t U) (1 - lr wd)
    with torch._foreach_* ops. `--optimizer torch` uses torch.optim.AdamW(foreach=True)
    instead (eps inside the bias correction, decay before the update: NOT the same numbers).

Run (from the repository root, after the Rust side has written runs/peer/):
    /work/pyvenv/bin/python benches/peer/step_torch.py --steps 6
    /work/pyvenv/bin/python benches/peer/step_torch.py --dir DIR --threads 2 --json out.json

Prints one JSON line per step (step, lr, loss_rec, loss_search, forward_s and backward_s over
all task batches, optimizer_s, step_s, tokens = real tokens, padded_tokens, tokens_per_s =
tokens / step_s), then one summary line: medians over the steps after `--warmup`, peak
resident memory (bytes), load average, versions, threads, parameter count. `--json OUT`
also writes {"steps": [...], "summary": {...}} to OUT.
"""

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/work/main/runs/peer", help="peer dump directory")
    p.add_argument("--steps", type=int, default=None, help="steps to run (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--warmup", type=int, default=1, help="steps excluded from the medians")
    p.add_argument("--optimizer", choices=["gems", "torch"], default="gems",
                   help="gems: our AdamW form (default); torch: torch.optim.AdamW")
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    p.add_argument("--json", default=None, help="also write all records to this file")
    return p.parse_args()


def load_model(path, attn):
    """The dumped Llama in float32, with the embedding and the head sharing one tensor."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=attn)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head.weight is not emb.weight:
        print("note: head was not tied to the embedding; tying it", file=sys.stderr)
        head.weight = emb.weight
        model.config.tie_word_embeddings = True
    assert head.weight.data_ptr() == emb.weight.data_ptr()
    assert head.bias is None
    model.train()  # no dropout in Llama (attention_dropout 0); keeps autograd paths as trained
    return model


def make_batch(batch, pad_id):
    """Right-padded ids [B, T], gather indices of the predicting positions and their targets."""
    rows = batch["ids"]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    at_r, at_p, targets = [], [], []
    for r, (row, start) in enumerate(zip(rows, batch["target_pos"])):
        if not 1 <= start < len(row):
            raise ValueError(f"row {r}: target_pos {start} outside 1..{len(row) - 1}")
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        for p in range(start, len(row)):
            at_r.append(r)
            at_p.append(p - 1)
            targets.append(row[p])
    return ids, torch.tensor(at_r), torch.tensor(at_p), torch.tensor(targets)


def target_loss(model, ids, at_r, at_p, targets, frozen_layers=0):
    """Mean cross-entropy of the target tokens; logits only at the predicting positions."""
    if frozen_layers > 0:
        # As the Rust model: the lookup is detached, so nothing below the first trained layer
        # (whose parameters need no gradient) enters the autograd graph.
        embeds = model.model.embed_tokens(ids).detach()
        out = model.model(inputs_embeds=embeds, use_cache=False)
    else:
        out = model.model(input_ids=ids, use_cache=False)
    hidden = out.last_hidden_state  # after final norm
    logits = model.lm_head(hidden[at_r, at_p])  # [n_targets, vocab]
    return F.cross_entropy(logits, targets)


class GemsAdamW:
    """gems-optim's AdamW (adam.rs), multi-tensor: W = (W - lr c_t m / (sqrt(v) + eps)) (1 - lr wd).

    `entries` are (parameter, first trained row): rows before it are neither updated nor
    decayed and have no moments (gems-optim's `trained_rows`)."""

    def __init__(self, entries, beta1, beta2, eps, weight_decay):
        self.entries = entries
        self.b1, self.b2, self.eps, self.wd = beta1, beta2, eps, weight_decay
        self.params = [p.data[s:] if s else p.data for p, s in entries]  # views
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self, lr):
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        c = math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        decay = 1.0 - lr * self.wd
        grads = [p.grad[s:] if s else p.grad for p, s in self.entries]
        torch._foreach_mul_(self.m, b1)
        torch._foreach_add_(self.m, grads, alpha=1.0 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1.0 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_add_(denom, self.eps)
        # (W - lr c U)(1 - lr wd) = W (1 - lr wd) - [lr c (1 - lr wd)] U, as adam.rs applies it.
        if self.wd != 0.0:
            torch._foreach_mul_(self.params, decay)
        torch._foreach_addcdiv_(self.params, self.m, denom, value=-lr * c * decay)


class TorchAdamW:
    """torch.optim.AdamW(foreach=True) with the per-step learning rate (comparison only)."""

    def __init__(self, entries, beta1, beta2, eps, weight_decay):
        if any(s for _, s in entries):
            raise SystemExit("--optimizer torch cannot train only some rows of a parameter")
        self.opt = torch.optim.AdamW([p for p, _ in entries], lr=0.0, betas=(beta1, beta2), eps=eps,
                                     weight_decay=weight_decay, foreach=True)

    def step(self, lr):
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()


def median(xs):
    return statistics.median(xs) if xs else None


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # would cost a fill per alloc

    with open(os.path.join(args.dir, "batches.json")) as f:
        spec = json.load(f)
    steps = spec["steps"] if args.steps is None else spec["steps"][: args.steps]
    if len(spec["lr"]) < len(steps):
        raise SystemExit(f"batches.json has {len(spec['lr'])} learning rates for {len(steps)} steps")
    pad_id = spec["pad_id"]

    model = load_model(os.path.join(args.dir, "model"), args.attn)
    if model.config.vocab_size != spec["vocab"] or model.config.num_hidden_layers != spec["layers"]:
        raise SystemExit(f"model (vocab {model.config.vocab_size}, layers "
                         f"{model.config.num_hidden_layers}) does not match batches.json "
                         f"(vocab {spec['vocab']}, layers {spec['layers']})")
    frozen = spec.get("frozen_layers", 0)
    rows_from = spec.get("embedding_rows_from", 0)
    for layer in model.model.layers[:frozen]:
        layer.requires_grad_(False)
    table = model.get_input_embeddings().weight
    if rows_from is None:
        table.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]  # the tied table once
    entries = [(p, rows_from if p is table else 0) for p in params]
    n_params = sum(p[s:].numel() for p, s in entries)
    opt_class = GemsAdamW if args.optimizer == "gems" else TorchAdamW
    opt = opt_class(entries, spec["beta1"], spec["beta2"], spec["eps"], spec["weight_decay"])

    records = []
    for i, batches in enumerate(steps):
        lr = spec["lr"][i]
        total_rows = sum(len(b["ids"]) for b in batches)
        t_fwd = t_bwd = 0.0
        loss_sum, rows_of = {}, {}
        real = sum(len(r) for b in batches for r in b["ids"])
        padded = sum(len(b["ids"]) * max(len(r) for r in b["ids"]) for b in batches)
        t_step = time.perf_counter()
        for b in batches:
            t0 = time.perf_counter()
            loss = target_loss(model, *make_batch(b, pad_id), frozen_layers=frozen)
            value = loss.item()
            t1 = time.perf_counter()
            (loss * (len(b["ids"]) / total_rows)).backward()  # accumulates into .grad
            t2 = time.perf_counter()
            t_fwd += t1 - t0
            t_bwd += t2 - t1
            loss_sum[b["task"]] = loss_sum.get(b["task"], 0.0) + value * len(b["ids"])
            rows_of[b["task"]] = rows_of.get(b["task"], 0) + len(b["ids"])
        t3 = time.perf_counter()
        opt.step(lr)
        for p in params:
            p.grad = None
        t4 = time.perf_counter()
        step_s = t4 - t_step
        rec = {
            "step": i + 1,
            "lr": lr,
            "loss_rec": loss_sum["rec"] / rows_of["rec"] if "rec" in rows_of else None,
            "loss_search": loss_sum["search"] / rows_of["search"] if "search" in rows_of else None,
            "forward_s": t_fwd,
            "backward_s": t_bwd,
            "optimizer_s": t4 - t3,
            "step_s": step_s,
            "tokens": real,
            "padded_tokens": padded,
            "tokens_per_s": real / step_s,
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)

    timed = records[args.warmup:]
    summary = {
        "summary": True,
        "steps": len(records),
        "warmup": args.warmup,
        "timed_steps": len(timed),
        **{f"median_{k}": median([r[k] for r in timed])
           for k in ("forward_s", "backward_s", "optimizer_s", "step_s", "tokens_per_s")},
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "optimizer": args.optimizer,
        "attn": args.attn,
        "params": n_params,
        "frozen_layers": frozen,
        "embedding_rows_from": rows_from,
    }
    print(json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": records, "summary": summary}, f, indent=1)


if __name__ == "__main__":
    main()
