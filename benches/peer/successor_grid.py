"""The grid that chose the `successors` floor's settings (gems_train::collab::Successors): on
every validation user, history excluded, Recall@10 and NDCG@10 of scoring each item by how
often it came right after the user's last L training items (the k-th last weighted D^k), ties
broken by training popularity.

The training sequences are the `seen` lists of a validation dump, which under leave-one-out are
the users' whole training sequences; the validation target is never among them.

    gems eval RUN --split valid --examples 0 --dump-examples valid-all.jsonl
    python3 benches/peer/successor_grid.py valid-all.jsonl
"""
import json, math, sys
from collections import defaultdict

import numpy as np


def main():
    ex = [json.loads(l) for l in open(sys.argv[1])]
    ex = [e for e in ex if e["task"] == "rec"]
    n = 1 + max(max(e["seen"] + [e["target"]]) for e in ex)
    succ = [defaultdict(float) for _ in range(n)]
    pop = np.zeros(n)
    for e in ex:
        s = e["seen"]
        for a, b in zip(s, s[1:]):
            if a != b:
                succ[a][b] += 1
                pop[b] += 1

    def run(last, decay):
        hits, ndcg = 0, 0.0
        for e in ex:
            sc, w = np.zeros(n), 1.0
            for h in reversed(e["seen"][-last:]):
                for j, c in succ[h].items():
                    sc[j] += w * c
                w *= decay
            sc += 1e-9 * pop
            sc[[i for i in e["seen"] if i != e["target"]]] = -1
            rank = int((sc >= sc[e["target"]]).sum())
            if rank <= 10:
                hits += 1
                ndcg += 1 / math.log2(rank + 1)
        return hits / len(ex), ndcg / len(ex)

    print(f"{len(ex)} validation users, history excluded")
    for last, decay in [(1, 1.0), (2, 0.5), (3, 0.3), (3, 0.5), (3, 0.7), (5, 0.3), (5, 0.5),
                        (5, 0.7), (10, 0.5)]:
        r, d = run(last, decay)
        print(f"last {last:2d}, decay {decay}: Recall@10 {r:.4f}, NDCG@10 {d:.4f}", flush=True)


if __name__ == "__main__":
    main()
