"""The toy world's headline comparison over training seeds: SFT vs PPO (RLAIF) vs DPO, paired over the same held-out
questions, with 95% intervals; plus the judge's and the reward model's figures of each run.

    python bench/toy_seeds.py OUT_DIR [--seeds 0,1,2] [--config configs/toy.yaml] [--set KEY=VALUE ...]

Each seed is a full `vlm-rlaif demo` run (OUT_DIR/seed{s}; the toy world, the tower and the features are the same for
every seed; SFT, feedback sampling, reward model, PPO and DPO get the seed), about 12 minutes each on a 2-core CPU;
finished runs are skipped, so the script resumes. Writes OUT_DIR/summary.json and prints a markdown table.

Intervals: for each system and criterion, the per-question difference to SFT is averaged over the seeds, and the 95%
interval is a bootstrap over questions (10,000 resamples) of that mean; the per-seed means are listed too, so the
spread between seeds is visible (with 3 seeds it is the larger uncertainty).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

CRITERIA = ("correctness", "detail", "context", "temporal", "consistency", "qa")


def per_item(eval_dir: Path) -> dict:
    from vlm_rlaif.evaluate import read_jsonl
    return {(j["id"], j["criterion"]): j["score"] for j in read_jsonl(eval_dir / "judgements.jsonl")
            if j.get("ok") and j.get("score") is not None}


def run_seed(out: Path, seed: int, config: str, sets: list[str]) -> Path:
    d = out / f"seed{seed}"
    if (d / "report.md").exists(): return d
    seeds = [f"{s}.seed={seed}" for s in ("sft", "feedback", "reward", "ppo", "dpo")]
    cmd = [sys.executable, "-m", "vlm_rlaif.cli", "demo", "--config", config, "--out", str(d), "--quiet", "--set", *seeds, *sets]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return d


def summarise(runs: dict[int, Path], n_boot: int = 10_000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = dict(seeds=sorted(runs), systems={}, runs={})
    for s, d in runs.items():
        fb = json.loads((d / "feedback" / "stats.json").read_text())
        ev = json.loads((d / "reward" / "eval.json").read_text())
        out["runs"][s] = dict(feedback_agreement=fb.get("agreement"), kept=fb.get("kept"),
                              rm_accuracy=ev.get("accuracy"), rm_truth_accuracy=ev.get("truth_accuracy"))
    base = {s: per_item(d / "eval" / "sft") for s, d in runs.items()}
    for sysname in ("ppo", "dpo"):
        other = {s: per_item(d / "eval" / sysname) for s, d in runs.items() if (d / "eval" / sysname).exists()}
        if len(other) != len(runs): continue
        res = {}
        for c in CRITERIA:
            keys = sorted(set.intersection(*({k for k in base[s] if k[1] == c and k in other[s]} for s in runs)))
            if not keys: continue
            diffs = np.array([[other[s][k] - base[s][k] for k in keys] for s in sorted(runs)])  # [seeds, questions]
            q = diffs.mean(0)
            boot = q[rng.integers(len(q), size=(n_boot, len(q)))].mean(1)
            res[c] = dict(diff=float(q.mean()), lo=float(np.quantile(boot, 0.025)), hi=float(np.quantile(boot, 0.975)),
                          per_seed=[float(x) for x in diffs.mean(1)], n_questions=len(keys))
        out["systems"][sysname] = res
    return out


def table(summary: dict) -> str:
    lines = ["| system − SFT | " + " | ".join(CRITERIA) + " |", "|---|" + "---|" * len(CRITERIA)]
    for name, res in summary["systems"].items():
        cells = [f"{r['diff']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]" if (r := res.get(c)) else "–" for c in CRITERIA]
        lines.append(f"| {name.upper()} | " + " | ".join(cells) + " |")
    lines += ["", "| seed | judge agreement (kept pairs) | kept pairs | RM accuracy (AI labels) | RM accuracy (truth) |",
              "|---|---|---|---|---|"]
    f = lambda v: "–" if v is None else f"{v:.3f}"
    for s, r in summary["runs"].items():
        lines.append(f"| {s} | {f(r['feedback_agreement'])} | {r['kept']} | {f(r['rm_accuracy'])} | {f(r['rm_truth_accuracy'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out"); p.add_argument("--seeds", default="0,1,2"); p.add_argument("--config", default="configs/toy.yaml")
    p.add_argument("--set", action="append", default=[], help="override a config value in every run")
    a = p.parse_args(argv)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    runs = {int(s): run_seed(out, int(s), a.config, a.set) for s in a.seeds.split(",")}
    summary = summarise(runs)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(table(summary))


if __name__ == "__main__":
    main()
