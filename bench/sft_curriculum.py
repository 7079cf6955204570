"""Toy-world SFT: curriculum (short answers, then long) vs one mixed stage at the same step budget, vs chance.

    python bench/sft_curriculum.py --out /work/notes/artifacts/helperA_sft_compare --epochs 6

Renders the toy world (ToyWorldConfig defaults: 256 videos) and pre-trains the tiny tower unless they exist,
trains both SFT runs with the same seed, lr schedule and number of optimizer steps, scores the test split with
the toy scorer (vlm_rlaif.sft.score_sft) and writes results.json (+ the scores of each run) under --out.
"""
import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from vlm_rlaif.encoder import FeatureCache, TowerPretrainConfig, pretrain_toy_tower, toy_encoder_config
from vlm_rlaif.model import TOY_LM_CONFIG, VideoLMM
from vlm_rlaif.sft import SFTConfig, score_sft, train_sft
from vlm_rlaif.training import read_metrics
from vlm_rlaif.toyworld import ToyWorldConfig, make_dataset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
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
    torch.set_num_threads(a.threads)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_dataset(ToyWorldConfig(n_videos=a.n_videos), a.data or out / "data", progress=False)
    tower = Path(a.tower or out / "tower.safetensors")
    if not tower.exists(): pretrain_toy_tower(toy_encoder_config(), tower, TowerPretrainConfig(), progress=False)
    enc = toy_encoder_config(pretrained=str(tower))
    feats_dir = out / "features"
    base = dict(data_dir=str(data), features_dir=str(feats_dir), model=dict(lm_config=TOY_LM_CONFIG, encoder=enc.to_dict(), lora=None),
                batch_size=a.batch_size, gradient_accumulation_steps=1, lr=a.lr, warmup_ratio=0.03,
                epochs_per_stage=a.epochs, save_every=200, log_every=10, seed=a.seed, mixed_precision="no")
    # the same budget: the smaller of the two runs' step counts (they differ by partial last batches only)
    n = len(json.loads((data / "train_sft.json").read_text()))
    n_hard = sum(r["difficulty"] == "long" for r in json.loads((data / "train_sft.json").read_text()))
    ceil = lambda x: -(-x // a.batch_size)
    budget = a.budget or min(a.epochs * (ceil(n - n_hard) + ceil(n_hard)), a.epochs * ceil(n))
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}  # runs of earlier calls are kept
    results.update(budget_steps=budget, n_train=n, n_hard=n_hard, threads=a.threads, epochs=a.epochs, lr=a.lr)
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
        (out / f"{name}_scores.json").write_text(json.dumps(sc, indent=1))
        rows = read_metrics(run)
        results[name] = {k: v for k, v in sc.items() if k not in ("answers", "chance")} | dict(
            train_seconds=round(train_s, 1), steps=rows[-1]["step"], final_loss=rows[-1]["loss"], command=cmd)
        results["chance"] = sc["chance"]
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "per_task"}), flush=True)
        res_path.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
