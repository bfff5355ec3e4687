#!/usr/bin/env python3
"""PyTorch peer of `gems eval`'s full-catalogue ranking, timed (issue 36, docs/benchmarks.md).

Ranks the examples that `gems eval RUN --dump-examples FILE` wrote with the run's exported
model (a Hugging Face directory, e.g. RUN/model) the way our evaluation does: windows of
`--batch x 8` examples in file order, each sorted by prompt length and cut into batches of
`--batch`, right-padded with an attention mask, the last real position's hidden state through
the item tokens' rows of the head only; the target's rank counts ties against it. Prints one
JSON line: examples, seconds of ranking (model loading excluded), examples/s, and Recall@10
and NDCG@10 per task, to compare with `gems eval`'s report (equal up to float ties).

    python3 benches/peer/eval_torch.py --model RUN/model --examples FILE [--batch 32] [--threads 2]
"""
import argparse
import json
import math
import os
import time


def item_rows(model, examples):
    """The head's item rows (from the first item token, which the examples' target ids give)
    and the padding id."""
    first = examples[0]["target_token_id"] - examples[0]["target"]
    items = model.get_output_embeddings().weight[first:]
    pad = model.config.eos_token_id or 0
    return items, pad[0] if isinstance(pad, list) else pad


def item_scores(model, batch, items, pad):
    """Every item's score for each example of the batch: the prompts right-padded with an
    attention mask, the last real position's hidden state through the item rows."""
    import torch

    t = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), t), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for r, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[r, :n] = torch.tensor(e["input_ids"])
        mask[r, :n] = 1
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[torch.arange(len(batch)), mask.sum(1) - 1] @ items.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    examples = [json.loads(line) for line in open(a.examples)]
    if not examples:
        raise SystemExit(f"{a.examples}: no examples")
    items, pad = item_rows(model, examples)

    tally = {}
    started = time.perf_counter()
    window = a.batch * 8
    with torch.no_grad():
        for w in range(0, len(examples), window):
            chunk = sorted(examples[w:w + window], key=lambda e: len(e["input_ids"]))
            for b in range(0, len(chunk), a.batch):
                batch = chunk[b:b + a.batch]
                scores = item_scores(model, batch, items, pad)
                for r, e in enumerate(batch):
                    s = scores[r]
                    rank = int((s >= s[e["target"]]).sum())
                    k = tally.setdefault(e["task"], [0, 0.0, 0.0])
                    k[0] += 1
                    if rank <= 10:
                        k[1] += 1
                        k[2] += 1 / math.log2(rank + 1)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "summary": True,
        "examples": len(examples),
        "seconds": seconds,
        "examples_per_s": len(examples) / seconds,
        "metrics": {task: {"recall@10": h / n, "ndcg@10": g / n} for task, (n, h, g) in tally.items()},
        "batch": a.batch,
        "threads": a.threads,
        "load_average": list(os.getloadavg()),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
