"""Where does the toy judge fail? Two measurements on a finished toy run (SFT and feedback stages done):

1. **Claim checks** (the unit of the `claims` judge form): accuracy of p("Yes.") > p("No.") on held-out claim checks
   made from the *validation* split's facts, with the true clip descriptions as context and with none.
2. **Likelihood judge** on decidable pairs of the model's own sampled answers (the feedback stage's candidates; the
   exact toy scorer decides which is better): does the answer the model finds likelier win? With no context, with
   its own clip captions (the feedback stage's contexts) and with the true clip descriptions as context, and as
   PMI: log p(answer | context) - log p(answer | no context), i.e. how much the context raises the answer.

`--train claims|context --steps S` first continues the SFT model for S steps (batch 16, text only, answer tokens
as targets) on claim checks or on context reading (true clip descriptions + question -> the true answer), both made
from the training videos reserved for judge skill (never a feedback prompt, never the validation split), then
measures. The toy scorer and the facts only label the measurements and make the training records; nothing of them
reaches a prompt that is measured except the "truth" context rows, which are the upper bound they are named as.

    python bench/toy_judge_skill.py RUN_DIR [--train none|claims|context] [--steps 600] [--out bench/results/x.json]

One CPU thread: ~2 min for the measurements at the defaults, plus ~0.4 s per training step.
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
from vlm_rlaif.data import tokenize_conversations
from vlm_rlaif.feedback import (CONTEXT_BLOCK, VERIFY_OPTIONS, FeedbackConfig, judge_skill_videos, lmm_scorer,
                                option_logprobs, truth_context, verify_sft_records)
from vlm_rlaif.model import IMAGE_TOKEN, VideoLMM, video_question
from vlm_rlaif.pipeline import Run, load_config


def _text(value: str) -> str: return value.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()


def claim_accuracy(model, run: Run, n: int, seed: int = 1) -> dict:
    "Held-out claim checks (validation facts): accuracy per context mode, and how often the judge says yes."
    fb, nf = run.cfg.feedback or {}, run.encoder_config().n_frames
    recs = verify_sft_records(run.data_dir, "val", n=n, seed=seed, n_frames=nf, n_clips=fb.get("n_clips", 3),
                              max_clip_frames=fb.get("max_clip_frames", 20),
                              evidence=fb.get("claim_evidence", FeedbackConfig().claim_evidence))
    lp = lmm_scorer(model, run.features(), root=run.data_dir)([r["conversations"][0]["value"] for r in recs],
                                                              [r["video"] for r in recs], list(VERIFY_OPTIONS))
    yes, out = lp[:, 0] > lp[:, 1], {}
    for mode in ("truth", "none"):
        i = [k for k, r in enumerate(recs) if r["context_mode"] == mode]
        lab = np.array([recs[k]["label"] for k in i])
        out[mode] = dict(n=len(i), accuracy=float(np.mean(yes[i] == lab)), said_yes=float(yes[i].mean()),
                         true_rate=float(lab.mean()))
    return out


def likelihood_judge(model, run: Run, n: int, seed: int = 0) -> dict:
    "Agreement with the exact scorer of 'the likelier answer wins' on `n` decidable candidate pairs, per context."
    fb, nf, facts = run.cfg.feedback or {}, run.encoder_config().n_frames, tw.load_facts(run.data_dir)
    recs = {r["id"]: r for r in json.loads((run.data_dir / "train_sft.json").read_text())}
    cand = json.loads((run.root / "feedback" / "candidates.json").read_text())
    caps = json.loads((run.root / "feedback" / "contexts.json").read_text())
    items = []
    for j in np.random.default_rng(seed).permutation(len(cand["ids"])):
        r = recs[cand["ids"][j]]; a, b = cand["candidates"][j]
        t = tw.prefer(facts[r["video_id"]], r, a, b)
        if t: items.append((r, a, b, t))
        if len(items) == n: break
    feats, truth = run.features(), np.array([t for *_, t in items])

    def logp(ctx_of) -> np.ndarray:  # [n, 2]: log p(answer | context, question, video), summed over its tokens
        rows = []
        for r, a, b, _ in items:
            ctx = ctx_of(r)
            q = (CONTEXT_BLOCK.format(context=ctx.strip()) if ctx else "") + _text(r["conversations"][0]["value"])
            rows.append(option_logprobs(model, feats, [video_question(q)], [r["video"]], [a, b], run.data_dir)[0])
        return np.array(rows)

    def agree(s: np.ndarray) -> float: return float(np.mean(np.where(s[:, 0] > s[:, 1], 1, 2) == truth))
    base = logp(lambda r: None)
    out = dict(n=len(items), none=dict(likelier=agree(base)))
    contexts = dict(captions=lambda r: caps[r["video"]]["context"],
                    truth=lambda r: truth_context(facts[r["video_id"]], nf, fb.get("n_clips", 3), fb.get("max_clip_frames", 20)))
    for mode, ctx_of in contexts.items():
        c = logp(ctx_of)
        out[mode] = dict(likelier=agree(c), pmi=agree(c - base))
    return out


def skill_records(run: Run, kind: str, n: int = 20000) -> list[dict]:
    "Training records for `--train` from the reserved judge-skill training videos (text only: `<image>` removed)."
    fb, nf = run.cfg.feedback or {}, run.encoder_config().n_frames
    spec = (run.cfg.sft or {}).get("judge_records") or {}
    vids = judge_skill_videos(run.data_dir, "train", float(spec.get("videos", 0.4)), int(spec.get("seed", 0)))
    clip = dict(n_clips=fb.get("n_clips", 3), max_clip_frames=fb.get("max_clip_frames", 20))
    if kind == "claims":
        recs = verify_sft_records(run.data_dir, "train", n=n, seed=5, n_frames=nf, videos=vids,
                                  evidence=fb.get("claim_evidence", FeedbackConfig().claim_evidence), **clip)
        return [{"conversations": [{"from": "human", "value": _text(r["conversations"][0]["value"])},
                                   r["conversations"][1]]} for r in recs]
    facts, keep = tw.load_facts(run.data_dir), set(vids)
    out = []
    for r in json.loads((run.data_dir / "train_sft.json").read_text()):
        if r["video_id"] not in keep: continue
        ctx = truth_context(facts[r["video_id"]], nf, **clip)
        out.append({"conversations": [{"from": "human", "value": CONTEXT_BLOCK.format(context=ctx) + _text(r["conversations"][0]["value"])},
                                      r["conversations"][1]]})
    return out


def train_text(model, records: list[dict], steps: int, lr: float, batch_size: int = 16, seed: int = 0) -> list[float]:
    "Continue `model.lm` on `records` (answer tokens as targets), text only."
    tok, lm, pad = tokenize_conversations(records, model.tokenizer), model.lm, model.tokenizer.pad_token_id
    params = [p for p in lm.parameters() if p.requires_grad]
    opt, rng, losses = torch.optim.AdamW(params, lr=lr), np.random.default_rng(seed), []
    lm.train()
    for step in range(steps):
        batch = [tok[int(i)] for i in rng.integers(len(tok), size=batch_size)]
        L = max(len(b["input_ids"]) for b in batch)
        x, y = torch.full((len(batch), L), pad), torch.full((len(batch), L), -100)
        m = torch.zeros((len(batch), L), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            x[i, :k], y[i, :k], m[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        loss = lm(input_ids=x, attention_mask=m, labels=y).loss
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        losses.append(round(loss.item(), 4))
    lm.eval()
    return losses


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--model", default=None, help="VideoLMM directory (default: RUN_DIR/sft/model)")
    ap.add_argument("--train", choices=("none", "claims", "context"), default="none")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--claims", type=int, default=300, help="held-out claim checks")
    ap.add_argument("--pairs", type=int, default=300, help="decidable candidate pairs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1); torch.manual_seed(0)
    run = Run(load_config(Path(a.run_dir) / "config.yaml"), a.run_dir, create=False)
    model = VideoLMM.from_pretrained(a.model or Path(a.run_dir) / "sft" / "model", trainable=a.train != "none")
    model.eval()
    res, t0 = dict(run_dir=str(a.run_dir), train=a.train), time.time()
    if a.train != "none":
        losses = train_text(model, skill_records(run, a.train), a.steps, a.lr)
        res.update(steps=a.steps, lr=a.lr, loss_first_last=[float(np.mean(losses[:50])), float(np.mean(losses[-50:]))],
                   train_seconds=round(time.time() - t0, 1))
    res["claims"] = claim_accuracy(model, run, a.claims)
    print("claim checks:", json.dumps(res["claims"]), flush=True)
    res["likelihood"] = likelihood_judge(model, run, a.pairs)
    print("likelihood judge:", json.dumps(res["likelihood"]), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
