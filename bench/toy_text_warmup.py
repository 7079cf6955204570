"""Does the toy LM read the question? SFT from scratch on a run's toy SFT mix (training instructions + judging
instructions), with and without the text warm-up (`vlm_rlaif.sft.text_warmup`), for two initial seeds. Every
`--every` steps: the share of held-out short answers whose first shape word is the one the question names
(teacher-forced, so it measures reading, not sampling luck) and the held-out loss.

    python bench/toy_text_warmup.py RUN_DIR [--steps 600] [--warmup 600] [--seeds 0,42] [--out FILE]

RUN_DIR is a run directory after its `sft` stage (`data/`, `features/`, `sft/judge_train.json`, e.g. `vlm-rlaif sft
--config configs/toy.yaml --out RUN_DIR`). The variants run one after the other in this process, one CPU thread
(about 2-3 min each). Writes a JSON list of curves (default bench/results/toy_text_warmup.json), read by
nbs/05_sft.ipynb.
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

from vlm_rlaif import toyworld as tw
from vlm_rlaif.data import Collator, VideoInstructDataset
from vlm_rlaif.model import ModelConfig, build_model
from vlm_rlaif.pipeline import Run, load_config
from vlm_rlaif.sft import text_warmup
from transformers import AutoTokenizer

SUBJECT_TASKS = ("color", "motion", "change", "when", "happen")  # the question names the object


def subject_accuracy(model, batch, shape_ids) -> tuple[float, float]:
    "Teacher-forced: share of answers whose first shape token is predicted right; and the batch loss."
    model.eval()
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["video_feats"], batch["labels"])
        labels = model.build_inputs(batch["input_ids"], batch["attention_mask"], batch["video_feats"], batch["labels"])["labels"]
    model.train()
    pred, tgt, ok = out.logits[:, :-1].argmax(-1), labels[:, 1:], []
    for i in range(len(tgt)):
        js = [j for j in range(tgt.shape[1]) if tgt[i, j].item() in shape_ids]
        if js: ok.append(pred[i, js[0]].item() == tgt[i, js[0]].item())
    return float(np.mean(ok)), out.loss.item()


def run_variant(run: Run, seed: int, warmup: int, steps: int, every: int, lr: float = 2e-3, batch: int = 16) -> dict:
    data = run.data_dir
    train = json.loads((data / "train_sft.json").read_text()) + json.loads((run.dir("sft") / "judge_train.json").read_text())
    val = [r for r in json.loads((data / "val_sft.json").read_text()) if r["task"] in SUBJECT_TASKS][:200]
    tok, feats = AutoTokenizer.from_pretrained(run.dir("sft") / "tokenizer"), run.features()
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_dict({**run.cfg.model, "encoder": run.encoder_dict()}), tok)
    t0 = time.time()
    if warmup: text_warmup(model, train, warmup, batch, lr, seed=seed, progress=False)
    coll = Collator(tok.pad_token_id)
    ds, vds = VideoInstructDataset(train, tok, feats, root=data), VideoInstructDataset(val, tok, feats, root=data)
    vb = coll([vds[i] for i in range(len(vds))])
    shape_ids = {tok.convert_tokens_to_ids("Ġ" + s) for s in tw.SHAPES}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng, curve = np.random.default_rng(seed), []
    for s in range(1, steps + 1):
        b = coll([ds[int(i)] for i in rng.integers(len(ds), size=batch)])
        loss = model(b["input_ids"], b["attention_mask"], b["video_feats"], b["labels"]).loss
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
        if s % every == 0:
            acc, vloss = subject_accuracy(model, vb, shape_ids)
            curve.append(dict(step=s, subject_acc=round(acc, 3), val_loss=round(vloss, 4)))
    return dict(seed=seed, warmup_steps=warmup, steps=steps, lr=lr, batch=batch, seconds=round(time.time() - t0), curve=curve)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--seeds", default="0,42")
    ap.add_argument("--out", default="bench/results/toy_text_warmup.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = Run(load_config(Path(a.run_dir) / "config.yaml"), a.run_dir, create=False)
    res = []
    for seed in (int(x) for x in a.seeds.split(",")):
        for w in (0, a.warmup):
            r = run_variant(run, seed, w, a.steps, a.every)
            last = r["curve"][-1]
            print(f"seed {seed} warm-up {w:4d}: subject {[c['subject_acc'] for c in r['curve']]} final loss {last['val_loss']} "
                  f"({r['seconds']} s)", flush=True)
            res.append(r)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
