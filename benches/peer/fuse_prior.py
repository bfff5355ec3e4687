"""How much does a tuned model add to counting? Its rec ranking fused with a successor-count
prior, against the prior alone (issue 35).

For every dumped rec test example (`gems eval RUN --dump-examples FILE`) the run's exported model
scores every item (the last prompt position's hidden state through the head's item rows, as
`eval_torch.py` ranks them) and a prior counts, in the training sequences, which items followed
the user's last L history items, the k-th last weighted D^(k-1) (`--priors L:D,...`, each
prior reported on its own). The training
sequences are the `seen` lists of a validation dump (`gems eval RUN --split valid --examples N
--dump-examples FILE` with N at least the number of users): under leave-one-out each is a user's
whole training sequence, so no test or validation item is counted. The fused score is

    log softmax(model scores) + lambda * log(prior + eps)

a product of the model's distribution and the prior's. lambda is chosen on the first half of the
examples (by Recall@10, then NDCG@10) and reported on the second half, beside the model alone and
the prior alone (ties of the prior broken by popularity) on the same halves. Ranks count the
items scoring strictly higher, plus one; the history is ranked (the full protocol), and with
`--exclude-history` left out.

    python3 benches/peer/fuse_prior.py --model runs/epochs/e2-hl-s0/model \
        --examples runs/epochs/e2-hl-s0-test2000.jsonl --history valid-all.jsonl --out fuse.json
"""
import argparse, json, math, time

import torch

from eval_torch import item_rows, item_scores

LAMBDAS = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]


def successor_counts(history_file, n_items):
    """counts[a, b]: how often b directly followed a in the rec training sequences."""
    counts = torch.zeros(n_items, n_items, dtype=torch.float64)
    users = 0
    with open(history_file) as f:
        for line in f:
            e = json.loads(line)
            if e["task"] != "rec":
                continue
            users += 1
            s = e["seen"]
            for a, b in zip(s, s[1:]):
                counts[a, b] += 1
    return counts, users


def prior_of(example, counts, last, decay):
    history = example["seen"][-last:]
    p = torch.zeros(counts.shape[0], dtype=torch.float64)
    for k, item in enumerate(reversed(history)):
        p += decay ** k * counts[item]
    return p


def metrics(scores, examples, rows, exclude):
    hits, ndcg = 0, 0.0
    for r in rows:
        e, s = examples[r], scores[r].clone()
        t = e["target"]
        if exclude:
            seen = [i for i in e["seen"] if i != t]
            if seen:
                s[seen] = -math.inf
        rank = int((s > s[t]).sum()) + 1
        if rank <= 10:
            hits += 1
            ndcg += 1 / math.log2(rank + 1)
    return {"hits": hits, "recall@10": hits / len(rows), "ndcg@10": ndcg / len(rows)}


def show(name, r):
    print(f"{name:38s} second half {r['second']['hits']:4d} hits, NDCG@10 "
          f"{r['second']['ndcg@10']:.4f} | all {r['all']['hits']:4d} hits, "
          f"Recall@10 {r['all']['recall@10']:.4f}, NDCG@10 {r['all']['ndcg@10']:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--examples", required=True, help="a test dump of gems eval --dump-examples")
    ap.add_argument("--history", required=True, help="a validation dump: the training sequences")
    ap.add_argument("--priors", default="1:1,3:0.5",
                    help="L:D,...: the last L history items, the k-th last weighted D^(k-1)")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--exclude-history", action="store_true")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    examples = [json.loads(l) for l in open(a.examples)]
    examples = [e for e in examples if e["task"] == "rec"]
    start = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    items, pad = item_rows(model, examples)
    with torch.no_grad():
        parts = [item_scores(model, examples[i:i + a.batch], items, pad)
                 for i in range(0, len(examples), a.batch)]
    model_lp = torch.log_softmax(torch.cat(parts).double(), dim=1)
    counts, users = successor_counts(a.history, items.shape[0])
    popularity = counts.sum(0)
    half = len(examples) // 2
    halves = {"first": range(half), "second": range(half, len(examples)),
              "all": range(len(examples))}
    m = lambda s, rows: metrics(s, examples, halves[rows], a.exclude_history)
    report = {"examples": len(examples), "training_sequences": users, "eps": a.eps,
              "exclude_history": a.exclude_history,
              "model": {h: m(model_lp, h) for h in halves}, "priors": []}
    show("model alone", report["model"])
    for spec in a.priors.split(","):
        last, decay = int(spec.split(":")[0]), float(spec.split(":")[1])
        prior = torch.stack([prior_of(e, counts, last, decay) for e in examples])
        fused = {lam: model_lp + lam * torch.log(prior + a.eps) for lam in LAMBDAS}
        chosen = max(LAMBDAS, key=lambda lam: (m(fused[lam], "first")["hits"],
                                               m(fused[lam], "first")["ndcg@10"]))
        entry = {
            "last": last, "decay": decay, "lambda_chosen_on_first_half": chosen,
            "prior": {h: m(prior + 1e-9 * popularity, h) for h in halves},
            "fused": {h: m(fused[chosen], h) for h in halves},
            "fused_by_lambda_all": {str(lam): m(fused[lam], "all") for lam in LAMBDAS},
        }
        report["priors"].append(entry)
        show(f"last {last}, decay {decay}: prior alone", entry["prior"])
        show(f"last {last}, decay {decay}: fused, lambda {chosen}", entry["fused"])
    report["seconds"] = round(time.time() - start, 1)
    print(f"{report['seconds']} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
