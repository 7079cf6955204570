"""Benchmark: video features from the feature cache vs computed on the fly (the frozen tower in the data path).

    .venv/bin/python bench/features_onthefly.py [--videos 32] [--reps 3] [--n-frames 16] [--threads 1]

Renders a small toy world (64 px videos) into a temp dir, builds the toy tower (the tiny ViT, 64 px, patch 8,
3 blocks; random weights: speed does not depend on them), fills a `FeatureCache` once (timed apart: the cache's
one-off cost), then times the data path per example, `VideoInstructDataset.__getitem__` + `Collator` over every
training record, with `features` = the cache (read safetensors) and = `TowerFeatures` (decode + preprocess + one
no-grad tower pass on the CPU), interleaved over `--reps` repetitions (each repetition runs both in a shuffled
order). Prints median ms per example side by side with their ratio, and the cache's disk estimate for this toy
world and for the paper's encoder (ViT-L/14-336, 50 frames). About 30-60 s on 2 shared cores.

`--sft-steps N` also times the SFT stage itself (`sft.train_sft`, toy.yaml's LM: 2 layers, width 128; batch
`--sft-batch`) with `SFTConfig.features` = "cache" (the cache filled above) and = "on_the_fly", `--reps` runs of each
in a shuffled order: ms per training example from the logged `elapsed_s` of steps 2..N (model building and the first
step left out).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlm_rlaif.data import Collator, VideoInstructDataset, feature_disk_estimate, load_records, video_features
from vlm_rlaif.encoder import EncoderConfig, build_vision_tower, toy_encoder_config
from vlm_rlaif.model import train_toy_tokenizer
from vlm_rlaif.toyworld import ToyWorldConfig, corpus_texts, make_dataset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n-frames", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sft-steps", type=int, default=0, help="also time N SFT steps with each features source (0: off)")
    ap.add_argument("--sft-batch", type=int, default=16)
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(prefix="fly-bench-"))
    data = make_dataset(ToyWorldConfig(n_videos=a.videos, seed=0), root / "data", progress=False)
    recs = load_records(data / "train_sft.json")
    tok = train_toy_tokenizer(corpus_texts(data))
    enc = toy_encoder_config(n_frames=a.n_frames)
    tower = build_vision_tower(enc)
    cache = video_features("cache", root / "features", enc, tower=tower)
    fly = video_features("on_the_fly", None, enc, tower=tower)
    vids = sorted({str(data / r["video"]) for r in recs})
    t = time.perf_counter(); cache.precompute(vids, progress=False); fill = time.perf_counter() - t
    col = Collator(pad_token_id=tok.pad_token_id)
    sources = {"cache": cache, "on_the_fly": fly}
    sets = {k: VideoInstructDataset(recs, tok, f, root=data) for k, f in sources.items()}

    def epoch(ds):  # every example through the dataset and the collator, in batches
        t = time.perf_counter()
        for s in range(0, len(ds), a.batch): col([ds[i] for i in range(s, min(s + a.batch, len(ds)))])
        return (time.perf_counter() - t) / len(ds)

    for ds in sets.values(): epoch(ds)  # warm-up (file system cache, allocator)
    times = {k: [] for k in sets}
    rng = random.Random(0)
    for _ in range(a.reps):
        order = list(sets); rng.shuffle(order)
        for k in order: times[k].append(epoch(sets[k]))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    est_toy = feature_disk_estimate(enc, len(vids))
    est_paper = feature_disk_estimate(EncoderConfig(model_name="ViT-L-14-336", n_frames=50), 100_000)
    print(f"toy world: {len(vids)} videos ({len(recs)} training examples), tower tiny-vit 64 px, {a.n_frames} frames; "
          f"torch threads {a.threads}; {platform.machine()}")
    print(f"cache fill (once): {fill:.2f} s = {fill / len(vids) * 1e3:.1f} ms per video")
    print("| features | ms per example (median of %d) |" % a.reps)
    print("|---|---|")
    for k in sets: print(f"| {k} | {med[k]:.2f} |")
    print(f"on_the_fly / cache = {med['on_the_fly'] / med['cache']:.1f}x")
    print(est_toy["text"]); print(est_paper["text"])
    res = dict(videos=len(vids), examples=len(recs), n_frames=a.n_frames, threads=a.threads, reps=a.reps,
               cache_fill_s=fill, ms_per_example=med, ratio=med["on_the_fly"] / med["cache"],
               estimate_toy=est_toy, estimate_paper=est_paper)
    if a.sft_steps > 1: res["sft_ms_per_example"] = sft_times(a, root, data)
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1))
    return res


def sft_times(a, root, data) -> dict:
    "Median ms per training example of `train_sft` steps 2..N with each features source (the cache is already filled)."
    from vlm_rlaif.model import TOY_LM_CONFIG
    from vlm_rlaif.sft import SFTConfig, train_sft
    from vlm_rlaif.training import read_metrics
    enc = toy_encoder_config(n_frames=a.n_frames)
    times, rng, k = {"cache": [], "on_the_fly": []}, random.Random(1), 0
    for _ in range(a.reps):
        order = list(times); rng.shuffle(order)
        for src in order:
            k += 1
            cfg = SFTConfig(data_dir=str(data), features=src, features_dir=str(root / "features") if src == "cache" else None,
                            model=dict(lm_config=TOY_LM_CONFIG, encoder=enc.to_dict(), lora=None), curriculum=False,
                            batch_size=a.sft_batch, gradient_accumulation_steps=1, max_steps=a.sft_steps, lr=1e-3, epochs_per_stage=1000,
                            save_every=0, log_every=1, mixed_precision="no", seed=0)
            out = train_sft(cfg, root / f"sft{k}", progress=False)
            el = [r["elapsed_s"] for r in read_metrics(out / "metrics.jsonl") if "elapsed_s" in r]
            assert len(el) == a.sft_steps, (len(el), a.sft_steps)
            times[src].append((el[-1] - el[0]) / (len(el) - 1) / a.sft_batch * 1e3)
    med = {s: statistics.median(v) for s, v in times.items()}
    print(f"SFT ({a.sft_steps} steps of {a.sft_batch}, toy LM 2 x 128; median of {a.reps} runs, steps 2..N):")
    print("| features | ms per training example |")
    print("|---|---|")
    for s in med: print(f"| {s} | {med[s]:.2f} |")
    print(f"on_the_fly / cache = {med['on_the_fly'] / med['cache']:.2f}x")
    return dict(median=med, runs=times, steps=a.sft_steps, batch=a.sft_batch)


if __name__ == "__main__":
    main()
