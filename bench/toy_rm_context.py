"""Toy reward model with and without the judge's context (07_reward, section 6, the long run).

    python bench/toy_rm_context.py [--work DIR] [--out bench/results/toy_rm_context.json]

Runs `reward.toy_rm_experiment` at the size the notebook quotes: 128 toy videos, 2000 training pairs (20% of the truth
labels flipped: a simulated AI judge), 400 steps of 8 pairs, 200 held-out pairs of unseen videos, a randomly
initialised `TOY_LM_CONFIG` backbone trained in full. About 12 minutes on a 2-core CPU. Writes, per setting (without /
with context): held-out accuracy against the AI labels and the truth, the training loss curve, and per held-out answer
its reward and its exact toy-world quality (the reward-vs-gold scatter of 07_reward).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import numpy as np
import torch

from vlm_rlaif.reward import toy_rm_experiment
from vlm_rlaif.training import read_metrics


def answers(ev: dict, records: list[dict]) -> dict:
    "Per held-out answer: its reward and its toy-world quality (0-5); per pair: r(truly better) - r(truly worse)."
    q, r, m = [], [], []
    for i, rc, rr, mg in zip(ev["index"], ev["chosen"], ev["rejected"], ev["margins"]):
        rec = records[i]
        k = rec["preference"]
        for kk, rew in ((k, rc), (3 - k, rr)):
            q.append(rec[f"quality_{kk}"]); r.append(float(rew))
        m.append(float(mg) if rec["preference"] == rec["truth_preference"] else -float(mg))
    return dict(quality=q, reward=r, truth_margins=m)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="run directory (default: a temporary one, deleted)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "toy_rm_context.json"))
    ap.add_argument("--n-videos", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    tmp = None if a.work else tempfile.TemporaryDirectory()
    work = Path(a.work or tmp.name)
    t0 = time.time()
    va, results = toy_rm_experiment(work, n_videos=a.n_videos, n_train=a.n_train, n_val=a.n_val, steps=a.steps,
                                    batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    out = dict(command=" ".join(["python bench/toy_rm_context.py", *(argv if argv is not None else sys.argv[1:])]),
               args={k: v for k, v in vars(a).items() if k not in ("work", "out")}, seconds=round(time.time() - t0),
               ai_agrees_with_truth=float(np.mean([r["preference"] == r["truth_preference"] for r in va])),
               settings={})
    for ctx, ev in results.items():
        curve = [dict(step=m["step"], bt=m["bt"]) for m in read_metrics(ev["out"]) if "bt" in m]
        out["settings"]["with_context" if ctx else "without_context"] = dict(
            use_context=ctx, n=ev["n"], acc_ai=ev["acc_ai"], acc_truth=ev["acc_truth"], seconds=ev["seconds"],
            loss_curve=curve, **answers(ev, va))
        print(f"context={ctx!s:5} held-out accuracy vs AI labels {ev['acc_ai']:.3f}, vs truth {ev['acc_truth']:.3f} "
              f"({ev['n']} pairs; {ev['seconds']} s)", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out)
    if tmp: tmp.cleanup()


if __name__ == "__main__":
    main()
