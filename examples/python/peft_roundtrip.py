#!/usr/bin/env python3
"""Checks that a gems LoRA run loads in Python as a user expects (docs/python.md).

Given the exports of one finished `--method lora` run:
  MERGED    `gems export RUN MERGED`            (Hugging Face layout, LoRA merged)
  ADAPTER   `gems export RUN ADAPTER --adapter` (PEFT adapter, its base in ADAPTER/base)
  EXAMPLES  `gems eval RUN --dump-examples EXAMPLES --out EVAL`
it prints:
  1. the special tokens transformers sees in both tokenizers, and a padded batch;
  2. the max |logit difference| between the merged model and the adapter loaded the documented
     ways (PeftModel over the base, AutoPeftModelForCausalLM, merge_and_unload), over every
     position of the first prompts;
  3. Recall/NDCG/MRR@10 of the three protocols (full catalogue; full catalogue without the
     items the user had before the target, `seen`; target among its sampled negatives)
     recomputed in PyTorch from EXAMPLES, beside gems' own numbers from EVAL.
Exits 1 when a check fails (logits beyond --tol, a missing special token, a tokenizer that does
not load from the adapter folder or does not pad on the left, any peft warning about missing or
unexpected keys, adapters attached to other modules than the file holds, a metric that differs
by more than 1e-9).

Usage: python3 peft_roundtrip.py MERGED ADAPTER EXAMPLES EVAL [--prompts 8] [--tol 1e-3]
"""
import argparse, json, math, sys, warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import AutoPeftModelForCausalLM, PeftModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("merged")
    ap.add_argument("adapter")
    ap.add_argument("examples")
    ap.add_argument("eval")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    ok = True

    # 1. Tokenizers (the adapter folder holds one too).
    for name, path in [("merged", a.merged), ("adapter base", f"{a.adapter}/base"),
                       ("adapter", a.adapter)]:
        tok = AutoTokenizer.from_pretrained(path)
        print(f"{name} tokenizer: bos={tok.bos_token!r} eos={tok.eos_token!r} "
              f"pad={tok.pad_token!r} padding_side={tok.padding_side!r}")
        if tok.eos_token is None or tok.pad_token is None:
            ok = False
            print("  FAIL: eos_token or pad_token is None")
        if tok.padding_side != "left":
            ok = False
            print("  FAIL: generation needs left padding")
        batch = tok(["Below is the user's interaction history: <item_0>", "Hi"], padding=True,
                    return_tensors="pt")
        print(f"  padded batch of 2: input_ids {tuple(batch['input_ids'].shape)}, "
              f"padding tokens {int((batch['attention_mask'] == 0).sum())}")

    # 2. Logits: merged model against the adapter loaded three ways.
    examples = [json.loads(l) for l in open(a.examples)]
    merged = AutoModelForCausalLM.from_pretrained(a.merged, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(f"{a.adapter}/base", dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, a.adapter).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained(a.adapter, dtype=torch.float32).eval()
    for w in caught:
        text = str(w.message)
        if "missing" in text.lower() or "unexpected" in text.lower():
            ok = False
            print(f"FAIL: peft warned: {text[:300]}")
    from safetensors import safe_open
    with safe_open(f"{a.adapter}/adapter_model.safetensors", "pt") as f:
        in_file = sum(1 for k in f.keys() if ".lora_A." in k)
    attached = sum(1 for _, m in peft_model.named_modules()
                   if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    print(f"LoRA modules: {attached} attached by peft, {in_file} in the adapter file")
    ok &= attached == in_file
    prompts = [torch.tensor([e["input_ids"]]) for e in examples[: a.prompts]]

    def max_diff(model):
        with torch.no_grad():
            return max((model(p).logits - merged(p).logits).abs().max().item() for p in prompts)

    diffs = {
        "PeftModel.from_pretrained(base, adapter)": max_diff(peft_model),
        "AutoPeftModelForCausalLM.from_pretrained(adapter)": max_diff(auto),
    }
    diffs["... .merge_and_unload()"] = max_diff(peft_model.merge_and_unload().eval())
    for k, v in diffs.items():
        print(f"max |logit difference| vs merged export, {k}: {v:.3g} over {len(prompts)} prompts")
        ok &= v < a.tol

    # 3. Full-catalogue metrics recomputed from the dumped examples.
    report = json.load(open(a.eval))
    first = examples[0]["target_token_id"] - examples[0]["target"]  # item tokens end the vocabulary
    n_items = merged.config.vocab_size - first
    sums = {}

    def add(key, rank):
        s = sums.setdefault(key, [0, 0.0, 0.0, 0.0])
        s[0] += 1
        if rank <= 10:
            s[1] += 1.0
            s[2] += 1.0 / math.log2(rank + 1)
            s[3] += 1.0 / rank

    with torch.no_grad():
        for e in examples:
            logits = merged(torch.tensor([e["input_ids"]])).logits[0, -1]
            scores = logits[first:first + n_items]
            # Ties count against the target, in both protocols.
            add(("full", e["task"]), int((scores >= scores[e["target"]]).sum()))
            # Without the items the user had before the target (the target kept).
            seen = [i for i in e.get("seen", []) if i != e["target"]]
            if "seen" in e:
                unseen = scores.clone()
                unseen[seen] = -math.inf
                add(("unseen", e["task"]), int((unseen >= unseen[e["target"]]).sum()))
            if e["negatives"]:
                cand = scores[[e["target"]] + e["negatives"]]
                add(("sampled", e["task"]), int((cand >= cand[0]).sum()))
    print("| protocol | task | examples | metric | PyTorch | gems |")
    print("|---|---|---:|---|---:|---:|")
    for (protocol, task), (n, hits, dcg, rr) in sorted(sums.items()):
        if task not in report.get(protocol, {}):
            continue
        for metric, value in [("recall@10", hits / n), ("ndcg@10", dcg / n), ("mrr@10", rr / n)]:
            theirs = report[protocol][task]["values"][metric]
            print(f"| {protocol} | {task} | {n} | {metric} | {value:.6f} | {theirs:.6f} |")
            ok &= abs(value - theirs) <= 1e-9
    print("round trips:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
