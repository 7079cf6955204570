"""How right is a run's reward model about answer pairs it never trained on, from videos it never saw?

    python bench/toy_rm_truth.py RUN_DIR [RUN_DIR ...] [--split test] [--seeds 1,2,3] [--out DIR]

The first RUN_DIR's SFT model samples two answers to every question of the `--split` (default: the held-out test
videos, which neither SFT nor the feedback stage used) once per seed, exactly as its feedback stage does; the toy
world's exact scorer labels each pair (measurement only: these labels train nothing) and ties are dropped. Every
RUN_DIR's reward model (`reward/model`) then ranks the same pairs, so RMs trained on different labels (e.g. the
demo's AI feedback and a `feedback.judge=oracle` run from the same SFT model) are compared on one set, much larger
than the 100 pairs their training runs held out. Prints and writes `OUT/summary.json`: per RM, who labelled its
training pairs, the accuracy against the truth with a 95% interval, and its own held-out figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench script, also when loaded by a test
from toy_rl_compare import _run, reward_model_info  # noqa: E402  (a finished run directory; what its RM is worth)


def fresh_pairs(run, split: str, seed: int, out_dir, progress: bool = False) -> list[dict]:
    """Answer pairs of `run`'s SFT model to every `{split}_sft.json` question, sampled with `seed` as its feedback stage
    samples them, labelled by the exact toy scorer (`truth_judge`); ties dropped by the feedback stage. Resumes."""
    from vlm_rlaif.feedback import run_feedback, truth_judge
    from vlm_rlaif.pipeline import feedback_config, reward_config
    from vlm_rlaif.toyworld import load_facts
    prompts = f"{split}_sft.json"
    if not (run.data_dir / prompts).exists(): raise FileNotFoundError(f"{run.data_dir / prompts}: no such split ({split!r})")
    context = "captions" if reward_config(run).use_context else "none"  # captions only when the RM reads them
    cfg = replace(feedback_config(run), prompts_file=prompts, n_prompts=None, seed=seed, val_count=0, val_fraction=None,
                  agreement_pairs=0, context=context, progress=progress)
    judge = truth_judge(load_facts(run.data_dir), json.loads((run.data_dir / prompts).read_text()))
    d = run_feedback(cfg, Path(out_dir) / f"{split}_seed{seed}", judge=judge)
    return [r for f in ("rm_train.json", "rm_val.json") if (d / f).exists() for r in json.loads((d / f).read_text())]


def interval95(hits: int, n: int) -> dict:
    "Accuracy `hits / n` with its 95% Wilson interval."
    if n == 0: return dict(accuracy=None, low=None, high=None, n=0)
    p, z = hits / n, 1.96
    mid, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return dict(accuracy=p, low=mid - half, high=mid + half, n=n)


def rm_truth(run, records) -> dict:
    "`run`'s reward model on `records` (pairs whose `preference` is the truth): accuracy against the truth, ties half."
    from vlm_rlaif.data import PairwiseDataset, video_features
    from vlm_rlaif.encoder import EncoderConfig
    from vlm_rlaif.pipeline import reward_config
    from vlm_rlaif.reward import RewardModel, evaluate_rm, rm_prompt
    cfg = reward_config(run)
    rm = RewardModel.from_pretrained(run.dir("reward") / "model").eval()
    feats = video_features(cfg.features, cfg.features_dir, EncoderConfig.from_dict(cfg.encoder), device="cpu")
    ds = PairwiseDataset(records, rm.tokenizer, feats, root=cfg.data_root, max_length=cfg.max_length,
                         reward_prompt=rm_prompt(cfg.use_context, cfg.reward_prompt), use_context=cfg.use_context,
                         context_key=cfg.context_key)
    res = evaluate_rm(rm, ds, batch_size=cfg.eval_batch_size)
    # every pair's preference is the truth here; a margin of exactly 0 counts half, as in training
    hits = sum((m > 0) + 0.5 * (m == 0) for m in res["margins"])
    return interval95(hits, len(res["margins"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--split", default="test", help="questions of {split}_sft.json (default: the held-out test videos)")
    p.add_argument("--seeds", default="1,2,3", help="one sampling of answer pairs per seed")
    p.add_argument("--out", default=None, help="default: FIRST_RUN_DIR/rm_truth")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    import torch
    torch.set_num_threads(a.threads)
    runs = [_run(d) for d in a.run_dirs]
    out = Path(a.out) if a.out else runs[0].root / "rm_truth"
    out.mkdir(parents=True, exist_ok=True)
    pairs = [r for s in a.seeds.split(",") for r in fresh_pairs(runs[0], a.split, int(s), out / "pairs")]
    pairs = [r for r in pairs if r.get("truth_preference") in (1, 2)]
    if not pairs: raise ValueError(f"{out}: no untied answer pairs from the {a.split} split")
    mixed = sum(r.get("preference") != r["truth_preference"] for r in pairs)  # rm_truth reads `preference` as the truth
    if mixed: raise ValueError(f"{out / 'pairs'}: {mixed} pairs labelled otherwise than the truth; remove that directory")
    summary = dict(pairs_from=str(runs[0].root), split=a.split, seeds=a.seeds, n_pairs=len(pairs), rms={})
    for run in runs:
        info, res = reward_model_info(run), rm_truth(run, pairs)
        own = dict(n=info["n_val"], accuracy=info["accuracy"], truth_accuracy=info["truth_accuracy"])
        summary["rms"][str(run.root)] = dict(judge=info["judge"], truth=res, own_held_out=own)
        print(f"{run.root}: RM trained on {info['judge']} labels: {res['accuracy']:.3f} right against the truth on "
              f"{res['n']} fresh {a.split} pairs (95% {res['low']:.3f}-{res['high']:.3f}); its own held-out: "
              f"{own['accuracy']} on its labels, {own['truth_accuracy']} against the truth ({own['n']} pairs)")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"written: {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
