"""Does the toy VideoLMM learn to read the video? SFT from scratch on the toy data with the tower's features raw or
standardised per channel, then greedy answers to held-out short questions scored by the exact toy scorer.

    python bench/toy_grounding.py RUN_DIR [--steps 600] [--variants raw,std]

RUN_DIR is a run directory with `data/`, `tower/` and `features/` (e.g. `vlm-rlaif features --config configs/toy.yaml
--out RUN_DIR --set tower_pretrain.standardize=false`, so that "raw" is the tower's raw output). Each variant runs in
this process, one after the other, with one CPU thread (about 100 s per 600 steps). Prints one line per variant:
held-out QA accuracy per task. The figures in nbs/02_encoder.ipynb come from this script.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
from transformers import AutoTokenizer

from vlm_rlaif.data import Collator, VideoInstructDataset
from vlm_rlaif.model import ModelConfig, build_model, train_toy_tokenizer
from vlm_rlaif.pipeline import Run, load_config
from vlm_rlaif.training import generate_answers
from vlm_rlaif import toyworld as tw

TASKS = ("color", "shape", "count", "change", "motion")


def run_variant(run: Run, variant: str, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    raw, data = run.features(), run.data_dir
    train = json.loads((data / "train_sft.json").read_text())
    tok = train_toy_tokenizer(tw.corpus_texts(data))
    if variant == "std":   # per-channel statistics of the training videos' features
        X = torch.stack([raw(str(data / r["video"])) for r in train[::10]]).float()
        mu, sd = X.mean((0, 1, 2)), X.std((0, 1, 2)).clamp(min=1e-4)
        feats = lambda p: (raw(p).float() - mu) / sd
    elif variant == "raw": feats = raw
    else: raise ValueError(f"unknown variant {variant!r}")
    model = build_model(ModelConfig.from_dict({**run.cfg.model, "encoder": run.encoder_dict()}), tok)
    ds, coll = VideoInstructDataset(train, tok, feats, root=data), Collator(tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    rng, t0 = np.random.default_rng(seed), time.time()
    for _ in range(steps):
        b = coll([ds[int(i)] for i in rng.integers(len(ds), size=16)])
        loss = model(b["input_ids"], b["attention_mask"], b["video_feats"], b["labels"]).loss
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
    facts = tw.load_facts(data)
    val = [r for r in json.loads((data / "val_sft.json").read_text()) if r["task"] in TASKS]
    ans = generate_answers(model.eval(), val, feats, root=data, batch_size=64, max_new_tokens=24)
    acc = {}
    for r, a in zip(val, ans): acc.setdefault(r["task"], []).append(tw.score_answer(facts[r["video_id"]], r, a)["qa_correct"])
    return dict(variant=variant, steps=steps, seconds=round(time.time() - t0), final_loss=round(loss.item(), 3),
                **{t: round(float(np.mean(acc[t])), 2) for t in TASKS if t in acc})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir"); p.add_argument("--steps", type=int, default=600)
    p.add_argument("--variants", default="raw,std")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(a.run_dir)
    run = Run(load_config(root / "config.yaml"), root, create=False)
    for v in a.variants.split(","): print(json.dumps(run_variant(run, v, a.steps)), flush=True)


if __name__ == "__main__":
    main()
