"""The share of a finished run's training time spent in the optimizer's subspace refreshes and in
the null-space build (issue 36 item 3), from its own logs: each refresh step's time above the
median of the 10 steps around it, and `nullspace.json`'s build seconds.

    python3 benches/peer/refresh_share.py RUN [RUN ...]

The refresh steps are t = 1, T, 2T, ... (T = optimizer.gems.update_proj_gap, from config.json),
as gems-optim's `is_refresh_step`. On a loaded machine single steps vary by a second or more,
so read the sum over a run, not one step.
"""
import json
import statistics
import sys
from pathlib import Path


def share(run: Path) -> str:
    config = json.loads((run / "config.json").read_text())
    gap = config["optimizer"]["gems"]["update_proj_gap"]
    steps = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train":
            steps[rec["step"]] = rec["step_seconds"]
    last = max(steps)
    refresh = [1] + list(range(gap, last + 1, gap))
    extra = []
    for r in refresh:
        around = [steps[s] for s in range(max(1, r - 5), min(last, r + 5) + 1)
                  if s not in refresh and s in steps]
        extra.append(steps[r] - statistics.median(around))
    total = sum(steps.values())
    ns = run / "nullspace.json"
    build = json.loads(ns.read_text()) if ns.exists() else {}
    built = "" if not build else (
        f"; null space {'cached' if build.get('from_cache') else 'built'} in "
        f"{build.get('seconds', 0):.1f} s = {100 * build.get('seconds', 0) / total:.1f}%")
    return (f"{run.name} ({config['optimizer']['method']}): {len(steps)} steps, "
            f"{total:.0f} s, median step {statistics.median(steps.values()):.2f} s; "
            f"{len(refresh)} refresh steps {sum(extra):+.1f} s over their neighbours "
            f"= {100 * sum(extra) / total:+.1f}%{built}")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(share(Path(arg)))
