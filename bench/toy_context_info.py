"""How much can the judge's context tell? The information bound of the feedback stage's clip captions (issue 12).

The context-aware judge can only be as right as its context. This script measures, on a finished run directory, what
the model's own clip captions (`feedback/contexts.json`) say about the two sampled answers of each feedback prompt
(`feedback/candidates.json`), with the toy world's exact claim parser and facts — a measurement beside the run, never
an input of any model:

1. **Claim precision by kind**: the share of the captions' claims (colour, motion, event, ...) that are true of the
   video, beside the same share for the sampled answers. Context helps only where captions are right more often
   than the answers they should check.
2. **An ideal reader's accuracy**: a judge that reads perfectly — parse the claims in which the two answers differ,
   score +1 for each claim the context states and -1 for each it contradicts (same kind and object, other value),
   prefer the higher score — given (a) the model's own captions, (b) the true descriptions of the same clips
   (`describe(facts, span)`: what a perfect captioner would write), on the pairs the exact scorer can decide. No
   learned judge can beat its context by much; (b) - (a) is what perception costs the judge.

    python bench/toy_context_info.py RUN_DIR [--out bench/results/toy_context_info.json]

Seconds on one CPU thread (no model runs).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from vlm_rlaif.feedback import clip_spans, video_span
from vlm_rlaif.pipeline import Run, feedback_config, load_config
from vlm_rlaif.toyworld import check_claim, describe, load_facts, parse_claims, prefer

KINDS = ("obj", "count", "color", "motion", "event", "half", "before", "nochange")


def _key(c: tuple):
    "Claims that contradict each other share this key (same kind and object, other value)."
    if c[0] in ("color", "motion", "event", "half"): return c[:2]
    if c[0] == "count": return ("count",)
    return None


def context_support(claims, context_claims: set) -> int:
    "+1 for each claim the context states, -1 for each it contradicts."
    by_key: dict = {}
    for c in context_claims:
        if _key(c): by_key.setdefault(_key(c), set()).add(c)
    return sum(1 if c in context_claims else -1 if _key(c) in by_key else 0 for c in claims)


def ideal_reader(answer_1: str, answer_2: str, context_claims: set) -> int:
    "1 or 2: the answer whose differing claims the context supports more; 0: the context cannot tell."
    c1, c2 = parse_claims(answer_1), parse_claims(answer_2)
    s1 = context_support([c for c in c1 if c not in c2], context_claims)
    s2 = context_support([c for c in c2 if c not in c1], context_claims)
    return 0 if s1 == s2 else 1 if s1 > s2 else 2


def _precision(counter: Counter) -> dict:
    out = {}
    for k in KINDS:
        n = counter[(k, True)] + counter[(k, False)]
        if n: out[k] = dict(precision=round(counter[(k, True)] / n, 3), n=n)
    return out


def measure(run_dir) -> dict:
    root = Path(run_dir)
    run = Run(load_config(root / "config.yaml"), root, create=False)
    fcfg = feedback_config(run)
    cand = json.loads((root / "feedback" / "candidates.json").read_text())
    ctx = json.loads((root / "feedback" / "contexts.json").read_text())
    facts = load_facts(root / "data")
    recs = {}
    for name in ("train_sft.json", "train_yesno.json"):
        p = root / "data" / name
        if p.exists(): recs.update({r["id"]: r for r in json.loads(p.read_text())})
    n_frames = run.encoder_config().n_frames
    spans = clip_spans(n_frames, fcfg.n_clips, fcfg.max_clip_frames)
    cap_c, ans_c, seen = Counter(), Counter(), set()
    verdicts = {"own captions": [], "true clip descriptions": []}
    truth = []
    for rid, (a, b) in zip(cand["ids"], cand["candidates"]):
        r = recs.get(rid)
        if r is None or r["video"] not in ctx: continue
        f = facts[Path(r["video"]).stem]
        for ans in (a, b):
            for c in parse_claims(ans):
                if c[0] != "polarity": ans_c[(c[0], check_claim(f, c) == "correct")] += 1
        own = {c for cap in ctx[r["video"]]["captions"] for c in parse_claims(cap)}
        if r["video"] not in seen:
            seen.add(r["video"])
            for c in own: cap_c[(c[0], check_claim(f, c) == "correct")] += 1
        t = prefer(f, r, a, b)
        if t == 0: continue
        true_ctx = {c for s in spans for c in parse_claims(describe(f, video_span(s, f["n_frames"], n_frames)))}
        truth.append(t)
        verdicts["own captions"].append(ideal_reader(a, b, own))
        verdicts["true clip descriptions"].append(ideal_reader(a, b, true_ctx))
    truth = np.array(truth)
    readers = {}
    for name, v in verdicts.items():
        v = np.array(v); dec = v > 0
        readers[name] = dict(pairs=int(len(v)), decides=round(float(dec.mean()), 3),
                             accuracy_decided=round(float((v[dec] == truth[dec]).mean()), 3),
                             accuracy_ties_half=round(float(np.where(dec, v == truth, 0.5).mean()), 3))
    return dict(run=str(root.name), videos=len(seen), caption_precision=_precision(cap_c),
                answer_precision=_precision(ans_c), ideal_reader=readers)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "toy_context_info.json"))
    a = ap.parse_args(argv)
    res = measure(a.run_dir)
    print(f"{'kind':9s} caption precision (claims) | answer precision (claims)")
    for k in KINDS:
        c, s = res["caption_precision"].get(k), res["answer_precision"].get(k)
        if c or s:
            print(f"{k:9s} {c['precision'] if c else '-':>5} ({c['n'] if c else 0:5d})      | "
                  f"{s['precision'] if s else '-':>5} ({s['n'] if s else 0:5d})")
    for name, r in res["ideal_reader"].items():
        print(f"ideal reader, {name}: decides {r['decides']:.2f} of {r['pairs']} decidable pairs, right on "
              f"{r['accuracy_decided']:.3f} of those ({r['accuracy_ties_half']:.3f} counting its ties as 1/2)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
