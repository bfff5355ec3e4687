"""Linear probes on the kept frozen states (`--frozen-cache`): where do the states entering the
first tuned layer hold the next recommended item?

Reads a `frozen-<key>.bin` file (docs/training.md, "The loop"), takes its rec rows (the rows with
the rec instruction), and for every item of a row after the first the state at the position
that predicts it (the ', ' separator inside the history; the end of the rec instruction for
the row's answer) and the state at the previous item's own token. A softmax probe (576 ->
items, AdamW, early stopping on 10% of the rows) is trained on 70% of the rows and measured on
the other 20% (held-out rows, so held-out users), against bigram counts of the previous item
and the most-popular list on the same pairs. Then, with `--model` and `--examples` (a run's
exported model and `gems eval --dump-examples` output), the dumped rec test examples are ranked
by probes trained on every row: from the state at the end of their prompt (the paper's
template: the instruction after the history) and from the state at a separator placed right
after their last history item. The states are computed by transformers from the exported
model, whose lower layers and input rows are the pretrained ones when the run untied its head.

    python3 benches/peer/probe_frozen.py runs/frozen-cache/frozen-KEY.bin \
        --model runs/epochs/e2-s0/model --examples runs/epochs/e2-s0-test.jsonl --out probe.json
"""
import argparse, json, math, struct, sys, time
import numpy as np
import torch

BASE, N_ITEMS = 49152, 4344          # SmolLM2's text vocabulary; Scientific's catalogue
REC, SEP_END, SUFFIX_END = 3730, 216, 30   # " recommend"; ' ' of ', '; the final '.'
SEPARATOR = [28, 216]                # ', '


def read_rec_pairs(path, layer_check=None):
    mm = np.memmap(path, dtype=np.uint8, mode='r')
    if bytes(mm[:8]) != b'GEMSFRZ1':
        sys.exit(f'{path}: not a frozen-states file')
    hidden = struct.unpack('<I', bytes(mm[8:12]))[0]
    rows = struct.unpack('<Q', bytes(mm[12:20]))[0]
    off, at, prev_tok, y, prev, tok, row, nrec, first = 20, [], [], [], [], [], [], 0, None
    for _ in range(rows):
        n = struct.unpack('<I', bytes(mm[off:off + 4]))[0]; off += 4
        ids = np.frombuffer(mm, dtype='<u4', count=n, offset=off); off += 4 * n
        if REC in ids:
            st = np.frombuffer(mm, dtype='<f4', count=n * hidden, offset=off).reshape(n, hidden)
            if first is None:
                first = (ids.astype(np.int64).tolist(), st.copy())
            items = [p for p in range(n) if ids[p] >= BASE]
            for a, b in zip(items, items[1:]):
                at.append(st[b - 1].copy()); prev_tok.append(st[a].copy())
                y.append(int(ids[b]) - BASE); prev.append(int(ids[a]) - BASE)
                tok.append(int(ids[b - 1])); row.append(nrec)
            nrec += 1
        off += 4 * n * hidden
    t = torch.tensor
    return dict(hidden=hidden, rows=nrec, at=t(np.stack(at)), prev_tok=t(np.stack(prev_tok)),
                y=t(y), prev=t(prev), tok=t(tok), row=np.array(row), first=first)


DISCOUNT = 1 / torch.log2(torch.arange(10, dtype=torch.float64) + 2)


def recall_ndcg(scores, y):
    """Recall@10 and NDCG@10 of the targets `y`, ties broken at random (in expectation): the
    target's place is uniform among the items of its score."""
    t = scores.gather(1, y[:, None])
    above = (scores > t).sum(1)
    tied = (scores == t).sum(1)                      # the target and the items tied with it
    recall, ndcg = 0.0, 0.0
    for g, e in zip(above.tolist(), tied.tolist()):
        places = range(g, min(g + e, 10))
        recall += len(places) / e
        ndcg += sum(DISCOUNT[p].item() for p in places) / e
    return recall / len(y), ndcg / len(y)


def fit(x, y, train, valid, hidden):
    torch.manual_seed(0)
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.nn.Linear(hidden, N_ITEMS)
    opt = torch.optim.AdamW(w.parameters(), lr=1e-3, weight_decay=0.05)
    best, state, bad, idx = -1.0, None, 0, torch.nonzero(train).squeeze(1)
    for epoch in range(40):
        for b in idx[torch.randperm(len(idx))].split(256):
            loss = torch.nn.functional.cross_entropy(w(z[b]), y[b])
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            v = recall_ndcg(w(z[valid]), y[valid])[0]
        if v > best:
            best, bad, state = v, 0, {k: t.clone() for k, t in w.state_dict().items()}
        else:
            bad += 1
            if bad >= 4:
                break
    w.load_state_dict(state)
    return lambda h: w((h - mu) / sd).detach(), epoch + 1, best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('cache'); ap.add_argument('--model'); ap.add_argument('--examples')
    ap.add_argument('--layer', type=int, default=26, help='first tuned layer (30 - tune_layers)')
    ap.add_argument('--threads', type=int, default=1); ap.add_argument('--out', required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    started = time.time()
    d = read_rec_pairs(a.cache)
    n, y = d['rows'], d['y']
    perm = np.random.default_rng(0).permutation(n)
    test_rows, valid_rows = set(perm[:n // 5]), set(perm[n // 5:n // 5 + n // 10])
    te = torch.tensor([r in test_rows for r in d['row']])
    va = torch.tensor([r in valid_rows for r in d['row']])
    tr = ~te & ~va
    res = {'cache': a.cache, 'rec_rows': n, 'pairs': len(y), 'train_pairs': int(tr.sum()),
           'held_out_pairs': int(te.sum())}
    pop = torch.bincount(y[tr], minlength=N_ITEMS).float()
    big = torch.zeros(N_ITEMS, N_ITEMS)
    big.index_put_((d['prev'][tr], y[tr]), torch.ones(int(tr.sum())), accumulate=True)
    probes = {name: fit(d[key], y, tr, va, d['hidden'])
              for name, key in [('answer_position', 'at'), ('previous_item_token', 'prev_tok')]}
    held = {}
    for part, m in [('all', te), ('separator', te & (d['tok'] == SEP_END)),
                    ('instruction_end', te & (d['tok'] == SUFFIX_END))]:
        k = int(m.sum())
        if k == 0:  # the history-last prompt asks every answer at a separator
            continue
        held[part] = {'pairs': k,
                      'popular': recall_ndcg(pop.expand(k, -1), y[m])[0],
                      'bigram': recall_ndcg(big[d['prev'][m]] + 1e-6 * pop / pop.max(), y[m])[0]}
        for name, (f, _, _) in probes.items():
            held[part]['probe_' + name] = recall_ndcg(f(d['at' if name == 'answer_position' else 'prev_tok'][m]), y[m])[0]
        print(part, held[part], flush=True)
    res['held_out_recall@10'] = held
    res['probe_epochs'] = {k: v[1] for k, v in probes.items()}
    if a.model and a.examples:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()

        def last_state(ids):
            with torch.no_grad():
                return model(torch.tensor([ids]), output_hidden_states=True).hidden_states[a.layer][0][-1]
        with torch.no_grad():
            ids0, st0 = d['first']
            full = model(torch.tensor([ids0]), output_hidden_states=True).hidden_states[a.layer][0]
            res['transformers_vs_cache_max_abs_diff'] = (full - torch.tensor(st0)).abs().max().item()
            res['state_max_abs'] = float(np.abs(st0).max())
        ex = [json.loads(line) for line in open(a.examples)]
        ex = [e for e in ex if e['task'] == 'rec']
        tgt = torch.tensor([e['target'] for e in ex])
        cut = lambda ids: ids[:max(p for p, t in enumerate(ids) if t >= BASE) + 1] + SEPARATOR
        at_end = torch.stack([last_state(e['input_ids']) for e in ex])
        at_sep = torch.stack([last_state(cut(e['input_ids'])) for e in ex])
        everything = torch.ones(len(y), dtype=torch.bool)
        rows_va = torch.tensor([r in valid_rows for r in d['row']])
        f_all = fit(d['at'], y, everything & ~rows_va, rows_va, d['hidden'])[0]
        f_sep = fit(d['at'], y, (d['tok'] == SEP_END) & ~rows_va, (d['tok'] == SEP_END) & rows_va, d['hidden'])[0]
        popall = torch.bincount(y, minlength=N_ITEMS).float()
        bigall = torch.zeros(N_ITEMS, N_ITEMS)
        bigall.index_put_((d['prev'], y), torch.ones(len(y)), accumulate=True)
        last = torch.tensor([[t for t in e['input_ids'] if t >= BASE][-1] - BASE for e in ex])
        test = {'examples': len(ex)}
        for name, s in [('probe_at_instruction_end', f_all(at_end)),
                        ('probe_at_separator_after_history', f_all(at_sep)),
                        ('separator_probe_at_separator_after_history', f_sep(at_sep)),
                        ('bigram_of_last_item', bigall[last] + 1e-6 * popall / popall.max()),
                        ('popular', popall.expand(len(ex), -1))]:
            r, g = recall_ndcg(s, tgt)
            test[name] = {'recall@10': r, 'ndcg@10': g}
            print(name, test[name], flush=True)
        res['test_examples'] = test
    res['seconds'] = time.time() - started
    json.dump(res, open(a.out, 'w'), indent=1)


if __name__ == '__main__':
    main()
