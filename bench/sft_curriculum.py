"""Toy-world SFT: curriculum (short answers, then long) vs one mixed stage at the same step budget, vs chance.

    python bench/sft_curriculum.py --out runs/sft_compare --epochs 6

Renders the toy world (ToyWorldConfig defaults: 256 videos) and pre-trains the tiny tower unless they exist,
trains both SFT runs with the same seed, lr schedule and number of optimizer steps, scores the test split with
the toy scorer (vlm_rlaif.sft.score_sft) and writes results.json (+ the scores of each run) under --out.

The fair comparison (the paper's stage 2 holds descriptions *and* long reasoning answers): give the toy world
reasoning records and the demo's text warm-up, run one process per seed, then pair the runs question by question:

    python bench/sft_curriculum.py --out runs/cur_s0 --reasoning-per-video 2 --text-warmup 600 --seed 0
    python bench/sft_curriculum.py --out runs/cur_s1 --reasoning-per-video 2 --text-warmup 600 --seed 1 \
        --data runs/cur_s0/data --tower runs/cur_s0/tower.safetensors
    python bench/sft_curriculum.py --summarize runs/cur_s0 runs/cur_s1 --json bench/results/sft_curriculum_reasoning.json

`--summarize` gives curriculum − mixed on every test question's exact toy quality (and each criterion), paired,
with 95% intervals: a t interval per seed, and for the seeds pooled a bootstrap over questions (each question's
difference averaged over the seeds first), overall and on the short and the long questions apart.
"""
import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from collections import Counter

from vlm_rlaif.encoder import FeatureCache, TowerPretrainConfig, pretrain_toy_tower, toy_encoder_config
from vlm_rlaif.model import TOY_LM_CONFIG, VideoLMM
from vlm_rlaif.sft import SFTConfig, score_sft, train_sft
from vlm_rlaif.training import read_metrics
from vlm_rlaif.toyworld import ToyWorldConfig, load_facts, make_dataset, quality, score_answer


CRIT = ("quality", "correctness", "detail", "temporal")


def per_question(data, split, answers) -> list[dict]:
    "Each test question's exact toy scores (quality = mean of the applicable criteria), for paired comparisons."
    facts = load_facts(data)
    recs = {r["id"]: r for r in json.loads((Path(data) / f"{split}_sft.json").read_text())}
    out = []
    for ans in answers:
        r = recs[ans["id"]]
        s = score_answer(facts[r["video_id"]], r, ans["answer"])
        out.append(dict(id=r["id"], task=r["task"], difficulty=r.get("difficulty", "short"), quality=quality(s),
                        **{k: s[k] for k in CRIT[1:]}))
    return out


def _t975(df: int) -> float:
    "97.5% quantile of Student's t with `df` degrees of freedom (no scipy in the venv): the pdf integrated numerically."
    import math
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = np.linspace(0, 60, 600001)
    pdf = np.exp(c - (df + 1) / 2 * np.log1p(t * t / df))
    cdf = 0.5 + np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(t))])
    return float(np.interp(0.975, cdf, t))


def _t_ci(d):
    d = np.asarray(d, float); m = float(d.mean())
    if len(d) < 2: return dict(mean=m, lo=float("nan"), hi=float("nan"), n=len(d))
    h = float(_t975(len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return dict(mean=m, lo=m - h, hi=m + h, n=len(d))


def _boot_ci(d, n_boot, seed=0):
    d = np.asarray(d, float); rng = np.random.default_rng(seed)
    bs = d[rng.integers(len(d), size=(n_boot, len(d)))].mean(1)
    return dict(mean=float(d.mean()), lo=float(np.quantile(bs, 0.025)), hi=float(np.quantile(bs, 0.975)), n=len(d))


def summarize(dirs, json_out=None, n_boot=10000) -> dict:
    """curriculum − mixed per test question, paired: a t interval per seed (run dir), a bootstrap interval over
    questions for the seeds pooled (each question's difference averaged over seeds), on all / short / long questions."""
    runs, seeds = {}, []
    for d in map(Path, dirs):
        res = json.loads((d / "results.json").read_text())
        cur = next((k for k in res if k.startswith("curriculum")), None)
        if cur is None or "mixed" not in res: raise ValueError(f"{d}/results.json needs a curriculum and a mixed run")
        pq = {k: {q["id"]: q for q in json.loads((d / f"{k}_scores.json").read_text())["per_question"]} for k in (cur, "mixed")}
        if set(pq[cur]) != set(pq["mixed"]): raise ValueError(f"{d}: the two runs scored different questions")
        runs[d.name] = (res, cur, pq); seeds.append(res.get("seed"))
    ids = sorted(set.intersection(*(set(pq["mixed"]) for _, _, pq in runs.values())))
    subsets = {"all": lambda q: True, "short": lambda q: q["difficulty"] == "short", "long": lambda q: q["difficulty"] == "long",
               "reason": lambda q: q["task"] == "reason", "describe": lambda q: q["task"] == "describe"}
    def diffs(pq, cur, crit, keep):
        return [(i, pq[cur][i][crit] - pq["mixed"][i][crit]) for i in ids
                if keep(pq["mixed"][i]) and pq[cur][i][crit] is not None and pq["mixed"][i][crit] is not None]
    out = dict(command="python bench/sft_curriculum.py --summarize " + " ".join(dirs), seeds=seeds, n_questions=len(ids),
               per_seed={}, pooled={}, means={})
    first = next(iter(runs.values()))[0]
    out["setup"] = {k: first.get(k) for k in ("n_videos", "reasoning_per_video", "text_warmup", "budget_steps", "epochs",
                                               "lr", "n_train", "n_hard", "train_tasks")}
    out["run_commands"] = [r.get("mixed", {}).get("command") for r, _, _ in runs.values()]
    for name, (res, cur, pq) in runs.items():
        out["per_seed"][name] = {sub: {c: _t_ci([x for _, x in diffs(pq, cur, c, keep)]) for c in CRIT}
                                 for sub, keep in subsets.items() if any(keep(pq["mixed"][i]) for i in ids)}
        out["means"][name] = {k: {sub: {c: float(np.mean(v)) if (v := [pq[k][i][c] for i in ids if keep(pq["mixed"][i])
                                                                       and pq[k][i][c] is not None]) else None for c in CRIT}
                                  for sub, keep in subsets.items()} for k in (cur, "mixed")}
        out["means"][name]["curriculum_run"] = cur
    for sub, keep in subsets.items():
        out["pooled"][sub] = {}
        for c in CRIT:
            per_q = {}
            for res, cur, pq in runs.values():
                for i, x in diffs(pq, cur, c, keep): per_q.setdefault(i, []).append(x)
            if per_q: out["pooled"][sub][c] = _boot_ci([np.mean(v) for v in per_q.values()], n_boot)
        if not out["pooled"][sub]: del out["pooled"][sub]
    out["absolute"] = {}  # each run's own scores (seeds averaged per question), t 95% interval over questions
    for label in ("curriculum", "mixed"):
        out["absolute"][label] = {}
        for sub, keep in subsets.items():
            per_c = {}
            for c in CRIT:
                per_q = {}
                for res, cur, pq in runs.values():
                    k = cur if label == "curriculum" else "mixed"
                    for i in ids:
                        if keep(pq["mixed"][i]) and pq[k][i][c] is not None: per_q.setdefault(i, []).append(pq[k][i][c])
                if per_q: per_c[c] = _t_ci([np.mean(v) for v in per_q.values()])
            if per_c: out["absolute"][label][sub] = per_c
    out["chance"] = {name: res.get("chance") for name, (res, _, _) in runs.items()}
    for sub, r in out["pooled"].items():
        print(f"pooled {sub:8s} " + "  ".join(f"{c} {v['mean']:+.2f} [{v['lo']:+.2f}, {v['hi']:+.2f}]" for c, v in r.items()))
    if json_out: Path(json_out).parent.mkdir(parents=True, exist_ok=True); Path(json_out).write_text(json.dumps(out, indent=1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="run directory (required unless --summarize)")
    p.add_argument("--reasoning-per-video", type=int, default=0, help="ToyWorldConfig.reasoning_per_video (0: the default world)")
    p.add_argument("--text-warmup", type=int, default=0, help="SFTConfig.text_warmup_steps of both runs (the demo: 600)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--summarize", nargs="+", default=None, help="run directories (one per seed) to pair and summarise")
    p.add_argument("--json", default=None, help="with --summarize: where to write the summary")
    p.add_argument("--boot", type=int, default=10000, help="bootstrap resamples of the pooled interval")
    p.add_argument("--data", default=None, help="toy world dir (made if missing; default OUT/data)")
    p.add_argument("--tower", default=None, help="pre-trained tiny tower (made if missing; default OUT/tower.safetensors)")
    p.add_argument("--n-videos", type=int, default=ToyWorldConfig.n_videos)
    p.add_argument("--epochs", type=int, default=6, help="epochs per stage (mixed: epochs over all records)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--split", default="test")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--schedule", default="per_stage", choices=["per_stage", "joint"], help="the curriculum run's lr schedule")
    p.add_argument("--budget", type=int, default=None, help="optimizer steps of every run (default: the smaller of "
                   "the curriculum's and the mixed run's steps at --epochs)")
    p.add_argument("--replay", type=float, default=0.0, help="curriculum_replay of the curriculum run")
    p.add_argument("--runs", default="curriculum,mixed", help="comma-separated: curriculum, mixed")
    a = p.parse_args(argv)
    if a.summarize: return summarize(a.summarize, a.json, a.boot)
    if not a.out: p.error("--out is required unless --summarize")
    torch.set_num_threads(a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_dataset(ToyWorldConfig(n_videos=a.n_videos, reasoning_per_video=a.reasoning_per_video), a.data or out / "data", progress=False)
    tower = Path(a.tower or out / "tower.safetensors")
    if not tower.exists(): pretrain_toy_tower(toy_encoder_config(), tower, TowerPretrainConfig(), progress=False)
    enc = toy_encoder_config(pretrained=str(tower))
    feats_dir = out / "features"
    base = dict(data_dir=str(data), features_dir=str(feats_dir), model=dict(lm_config=TOY_LM_CONFIG, encoder=enc.to_dict(), lora=None),
                batch_size=a.batch_size, gradient_accumulation_steps=1, lr=a.lr, warmup_ratio=a.warmup_ratio,
                text_warmup_steps=a.text_warmup,
                epochs_per_stage=a.epochs, save_every=200, log_every=10, seed=a.seed, mixed_precision="no")
    # the same budget: the smaller of the two runs' step counts (they differ by partial last batches only)
    n = len(json.loads((data / "train_sft.json").read_text()))
    n_hard = sum(r["difficulty"] == "long" for r in json.loads((data / "train_sft.json").read_text()))
    ceil = lambda x: -(-x // a.batch_size)
    budget = a.budget or min(a.epochs * (ceil(n - n_hard) + ceil(n_hard)), a.epochs * ceil(n))
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}  # runs of earlier calls are kept
    results.update(budget_steps=budget, n_train=n, n_hard=n_hard, threads=a.threads, epochs=a.epochs, lr=a.lr,
                   seed=a.seed, n_videos=a.n_videos, reasoning_per_video=a.reasoning_per_video, text_warmup=a.text_warmup,
                   train_tasks=dict(Counter(r["task"] for r in json.loads((data / "train_sft.json").read_text()))))
    cmd = "python bench/sft_curriculum.py " + " ".join(argv or __import__("sys").argv[1:])
    for run_name in a.runs.split(","):
        cur = run_name == "curriculum"
        name = (f"curriculum_{a.schedule}" + (f"_replay{a.replay:g}" if a.replay else "")) if cur else "mixed"
        t = time.time()
        run = train_sft(SFTConfig(**base, curriculum=cur, max_steps=budget, schedule=a.schedule,
                                  curriculum_replay=a.replay if cur else 0.0), out / name,
                        progress=False)
        train_s = time.time() - t
        model = VideoLMM.from_pretrained(run / "model")
        sc = score_sft(model, data, FeatureCache(feats_dir, enc), split=a.split, batch_size=32,
                       max_new_tokens=a.max_new_tokens, seed=a.seed)
        sc["per_question"] = per_question(data, a.split, sc["answers"])
        (out / f"{name}_scores.json").write_text(json.dumps(sc, indent=1))
        rows = read_metrics(run)
        results[name] = {k: v for k, v in sc.items() if k not in ("answers", "chance", "per_question")} | dict(
            train_seconds=round(train_s, 1), steps=rows[-1]["step"], final_loss=rows[-1]["loss"], command=cmd)
        results["chance"] = sc["chance"]
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "per_task"}), flush=True)
        res_path.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
