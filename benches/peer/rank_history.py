#!/usr/bin/env python3
"""Where a tuned model's top 10 goes: how often it ranks the user's own history (issue 35,
docs/training.md, "Two thousand test examples per task").

Ranks the examples that `gems eval RUN --dump-examples FILE` wrote with the run's exported
model (RUN/model), as `gems eval` and benches/peer/eval_torch.py do (the last prompt position's
hidden state through the item tokens' rows of the head; the target's rank counts ties against
it), for one task, and prints one JSON object: Recall@10 and NDCG@10 with every item ranked
and with the example's history left out, the share of examples whose first-ranked item is in
their history and is their last history item, the mean number of history items in the top
10, and the share of targets that are in their own history.

    python3 benches/peer/rank_history.py --model RUN/model --examples FILE [--task rec] [--threads 2]
"""
import argparse
import json
import math
import os

from eval_torch import item_rows, item_scores


def metrics(ranks):
    n = len(ranks)
    hits = [r for r in ranks if r <= 10]
    return {"recall@10": len(hits) / n, "ndcg@10": sum(1 / math.log2(r + 1) for r in hits) / n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--examples", required=True)
    ap.add_argument("--task", default="rec")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    with open(a.examples) as f:
        examples = [json.loads(line) for line in f]
    examples = [e for e in examples if e["task"] == a.task]
    if not examples:
        raise SystemExit(f"{a.examples}: no {a.task} examples")
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    items, pad = item_rows(model, examples)

    full, unseen = [], []
    top1_hist = top1_last = hist_top10 = target_hist = 0
    with torch.no_grad():
        for b in range(0, len(examples), a.batch):
            batch = examples[b:b + a.batch]
            scores = item_scores(model, batch, items, pad)
            for r, e in enumerate(batch):
                s, seen, target = scores[r], e["seen"], e["target"]
                full.append(int((s >= s[target]).sum()))
                top10 = torch.topk(s, 10).indices.tolist()
                top1_hist += top10[0] in seen
                top1_last += bool(seen) and top10[0] == seen[-1]
                hist_top10 += len(set(top10) & set(seen))
                target_hist += target in seen
                left_out = [i for i in seen if i != target]
                if left_out:
                    s = s.clone()
                    s[left_out] = -math.inf
                unseen.append(int((s >= s[target]).sum()))
    n = len(examples)
    print(json.dumps({
        "task": a.task,
        "examples": n,
        "full": metrics(full),
        "history_left_out": metrics(unseen),
        "top1_in_history": top1_hist / n,
        "top1_is_last_history_item": top1_last / n,
        "history_items_in_top10": hist_top10 / n,
        "targets_in_history": target_hist / n,
        "load_average": list(os.getloadavg()),
    }))


if __name__ == "__main__":
    main()
