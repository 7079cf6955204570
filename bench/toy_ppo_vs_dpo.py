"""Toy-world experiment: SFT -> reward model -> PPO, and the DPO baseline, scored on held-out toy questions.

    python bench/toy_ppo_vs_dpo.py [OUT_DIR] [--ppo-steps N] [--only sft,rm,ppo,dpo,eval]

Every stage resumes / is skipped when its `done.json` exists. Prints a JSON summary (also in OUT_DIR/summary.json):
held-out toy quality (mean of the toy scorer's criteria, 0-5), correctness, QA accuracy, mean RM score and answer
length for SFT, PPO and DPO, and the compute each took. CPU only; about 20-40 minutes on a free core.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import numpy as np
import torch

from vlm_rlaif.data import save_records
from vlm_rlaif.encoder import FeatureCache, toy_encoder_config
from vlm_rlaif.model import TOY_LM_CONFIG, VideoLMM
from vlm_rlaif.toyworld import ToyWorldConfig, load_facts, make_dataset, quality, score_answer

RM_PROMPT = " USER: How good is your last answer? ASSISTANT: Its score is"  # short: the toy tokenizer is verbose


def held_out(data: Path) -> list[dict]:
    return [r for s in ("val", "test") for r in json.loads((data / f"{s}_sft.json").read_text())]


def evaluate(model_dir, data, feats, rm=None, rm_prompt_text=None, max_new_tokens=64, n=None) -> dict:
    "Greedy answers to held-out questions, scored by the toy scorer (truth) and by the reward model."
    from vlm_rlaif.ppo import rm_prompt_ids, score_responses, truncate_at_eos
    from vlm_rlaif.training import generate_answers
    from vlm_rlaif.data import Collator, PromptDataset
    model = VideoLMM.from_pretrained(model_dir)
    recs = held_out(data)[:n]
    facts = load_facts(data)
    t0 = time.time()
    answers = generate_answers(model, recs, feats, root=data, batch_size=32, max_new_tokens=max_new_tokens)
    sc = [score_answer(facts[r["video_id"]], r, a) for r, a in zip(recs, answers)]
    q = [quality(s) for s in sc]
    out = dict(n=len(recs), quality=float(np.mean(q)), per_item_quality=q,
               correctness=float(np.mean([s["correctness"] for s in sc])),
               detail=float(np.mean([s["detail"] for s in sc])),
               qa_correct=float(np.mean([s["qa_correct"] for s in sc])),
               words=float(np.mean([len(a.split()) for a in answers])), gen_seconds=round(time.time() - t0, 1))
    if rm is not None:  # RM score of the same greedy answers (re-tokenised, with </s>)
        tok = model.tokenizer
        ds = PromptDataset(recs, tok, feats, root=data)
        coll = Collator(tok.pad_token_id, padding_side="left")
        scores = []
        for s in range(0, len(ds), 32):
            b = coll([ds[i] for i in range(s, min(s + 32, len(ds)))])
            resp = [tok(" " + answers[int(i)], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                    for i in b["index"]]
            L = max(map(len, resp))
            R = torch.tensor([x + [tok.pad_token_id] * (L - len(x)) for x in resp])
            cut = truncate_at_eos(R, tok.eos_token_id, tok.pad_token_id)
            suf = rm_prompt_ids(tok, rm_prompt_text, [recs[int(i)] for i in b["index"]])
            scores += score_responses(rm, b["input_ids"], b["attention_mask"], b["video_feats"], cut["responses"],
                                      cut["lengths"], suf, tok.pad_token_id, with_hidden=True)["scores"].tolist()
        out["rm_score"] = float(np.mean(scores))
    out["examples"] = [dict(q=r["conversations"][0]["value"][8:], truth=r["conversations"][1]["value"], answer=a)
                       for r, a in list(zip(recs, answers))[:4]]
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out", nargs="?", default="runs/toy_ppo_vs_dpo")
    p.add_argument("--n-videos", type=int, default=96)
    p.add_argument("--sft-epochs", type=int, default=6)
    p.add_argument("--rm-pairs", type=int, default=600)
    p.add_argument("--rm-epochs", type=int, default=2)
    p.add_argument("--rm-lr", type=float, default=3e-4)
    p.add_argument("--rm-tag", default="", help="suffix of the rm output dir (variants)")
    p.add_argument("--ppo-steps", type=int, default=30)
    p.add_argument("--ppo-batch", type=int, default=32)
    p.add_argument("--ppo-lr", type=float, default=2e-4)
    p.add_argument("--length-coef", type=float, default=-10 * 64 / 896, help="paper's per-token length penalty")
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--reward", default="rm", choices=["rm", "truth"],
                   help="PPO reward: the reward model, or (diagnostic) the toy world's true answer quality")
    p.add_argument("--ppo-seed", type=int, default=0)
    p.add_argument("--kl-coef", type=float, default=0.1)
    p.add_argument("--dpo-epochs", type=int, default=2)
    p.add_argument("--dpo-lr", type=float, default=2e-4)
    p.add_argument("--eval-n", type=int, default=None)
    p.add_argument("--only", default="sft,rm,ppo,dpo,eval")
    p.add_argument("--tag", default="", help="suffix of the ppo/dpo output dirs (variants)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    only = set(a.only.split(","))
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    times = json.loads((out / "times.json").read_text()) if (out / "times.json").exists() else {}

    def timed(name, fn):
        t0 = time.time(); r = fn(); times.setdefault(name, round(time.time() - t0, 1))
        (out / "times.json").write_text(json.dumps(times, indent=1)); return r

    data = make_dataset(ToyWorldConfig(n_videos=a.n_videos, seed=0), out / "data", progress=False)
    enc = toy_encoder_config()
    feats = FeatureCache(out / "features", enc)
    feats.precompute(sorted((data / "videos").glob("*.mp4")), progress=False)

    from vlm_rlaif.sft import SFTConfig, train_sft
    if "sft" in only:
        timed("sft", lambda: train_sft(SFTConfig(
            data_dir=str(data), features_dir=str(out / "features"),
            model=dict(lm_config=TOY_LM_CONFIG, encoder=enc.to_dict(), lora=None),
            epochs_per_stage=a.sft_epochs, batch_size=16, gradient_accumulation_steps=1, lr=2e-3, warmup_ratio=0.05,
            mixed_precision="no", max_length=512, save_every=0, seed=0, log_every=10), out / "sft", progress=False))
    sft_model = out / "sft" / "model"

    from vlm_rlaif.reward import RewardConfig, toy_preference_records, train_reward
    if "rm" in only:
        if not (out / "rm_train.json").exists():
            save_records(toy_preference_records(data, "train", n=a.rm_pairs, seed=0), out / "rm_train.json")
            save_records(toy_preference_records(data, "val", n=100, seed=1), out / "rm_val.json")
        timed(f"rm{a.rm_tag}", lambda: train_reward(RewardConfig(
            sft_model_dir=str(sft_model), train_file=str(out / "rm_train.json"), val_file=str(out / "rm_val.json"),
            data_root=str(data), features_dir=str(out / "features"), encoder=enc.to_dict(), lora=None, lr=a.rm_lr,
            epochs=a.rm_epochs, batch_size=16, warmup_ratio=0.05, reward_prompt=RM_PROMPT, max_length=512, save_every=0,
            progress=False), out / f"rm{a.rm_tag}"))
    rm_dir = out / f"rm{a.rm_tag}" / "model"

    from vlm_rlaif.ppo import PPOConfig, train_ppo
    ppo_dir, dpo_dir = out / f"ppo{a.tag}", out / f"dpo{a.tag}"
    facts = load_facts(data)
    truth = lambda recs, texts: [quality(score_answer(facts[r["video_id"]], r, t)) for r, t in zip(recs, texts)]
    if "ppo" in only:
        timed(f"ppo{a.tag}", lambda: train_ppo(PPOConfig(
            sft_model_dir=str(sft_model), reward_model_dir=str(rm_dir), prompts=str(data / "train_sft.json"),
            features_dir=str(out / "features"), data_root=str(data), encoder=enc.to_dict(),
            lora=dict(r=16, alpha=32, dropout=0.0), num_steps=a.ppo_steps, rollout_batch_size=a.ppo_batch,
            generation_batch_size=a.ppo_batch, minibatch_size=a.ppo_batch // 2, max_new_tokens=64,
            max_prompt_length=512, kl_coef=a.kl_coef, length_coef=a.length_coef, ppo_epochs=a.ppo_epochs, lr=a.ppo_lr, value_lr=1e-3, save_every=5, seed=a.ppo_seed, progress=False),
            out / f"ppo{a.tag}", reward_fn=truth if a.reward == "truth" else None, monitor_fn=truth))

    from vlm_rlaif.dpo import DPOConfig, train_dpo
    if "dpo" in only:
        timed(f"dpo{a.tag}", lambda: train_dpo(DPOConfig(
            sft_model_dir=str(sft_model), train_file=str(out / "rm_train.json"), val_file=str(out / "rm_val.json"),
            data_root=str(data), features_dir=str(out / "features"), encoder=enc.to_dict(),
            lora=dict(r=16, alpha=32, dropout=0.0), epochs=a.dpo_epochs, batch_size=16, lr=a.dpo_lr,
            max_length=512, save_every=20, progress=False), out / f"dpo{a.tag}"))

    if "eval" in only:
        from vlm_rlaif.reward import RewardModel, rm_prompt
        rm = RewardModel.from_pretrained(rm_dir)
        text = rm_prompt(False, RM_PROMPT)
        summary = {}
        runs = [("sft", sft_model)] + [(d.name, d / "policy") for d in sorted(out.glob("ppo*")) + sorted(out.glob("dpo*"))
                                       if (d / "done.json").exists() and "probe" not in d.name]
        for name, d in runs:
            summary[name] = evaluate(d, data, feats, rm, text, n=a.eval_n)
            rows = [json.loads(l) for l in (d.parent / "metrics.jsonl").read_text().splitlines()] if name != "sft" else []
            if rows: summary[name]["train_seconds"] = round(rows[-1].get("time/total_seconds", float("nan")), 1)
        summary["times_s"] = times
        ev = rm_dir.parent / "eval.json"
        summary["rm_val_accuracy"] = json.loads(ev.read_text())["accuracy"] if ev.exists() else None
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk not in ("examples", "per_item_quality")} if isinstance(v, dict) else v)
                          for k, v in summary.items()}, indent=1))
    return out


if __name__ == "__main__":
    main()
