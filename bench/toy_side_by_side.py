"""The same held-out questions answered by the SFT, PPO and DPO models of one pipeline run (08_ppo's last figure).

    python bench/toy_side_by_side.py RUN_DIR [--per-kind 3] [--out bench/results/toy_side_by_side.json]

RUN_DIR is a finished `vlm-rlaif demo` run (for example `runs/seeds/seed0` of `python bench/toy_seeds.py runs/seeds`).
Reads its eval stage (`eval/{sft,ppo,dpo}/predictions.jsonl` and `judgements.jsonl`): the first `--per-kind` questions
of each kind in file order (no selection on the answers), with the reference answer, each system's answer and the
eval judge's scores; plus, over all test questions, how often PPO's answer equals SFT's and how many yes/no
questions each system answers "No." (the reward hack 08_ppo describes).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

SYSTEMS = ("sft", "ppo", "dpo")


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]


def _answer(p: dict) -> str:
    return p["pred"] if "pred" in p else f"{p.get('pred1')} | {p.get('pred2')}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--per-kind", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "toy_side_by_side.json"))
    a = ap.parse_args(argv)
    run = Path(a.run_dir)
    preds, scores = {}, {}
    for s in SYSTEMS:
        d = run / "eval" / s
        if not (d / "predictions.jsonl").exists(): raise SystemExit(f"{d}/predictions.jsonl: missing (is {run} a finished demo run?)")
        preds[s] = {p["id"]: p for p in read_jsonl(d / "predictions.jsonl")}
        scores[s] = defaultdict(dict)
        for j in read_jsonl(d / "judgements.jsonl"):
            if j.get("ok") and j.get("score") is not None: scores[s][j["id"]][j["criterion"]] = round(j["score"], 2)
    ids = [i for i in preds["sft"] if all(i in preds[s] for s in SYSTEMS)]
    by_kind = defaultdict(list)
    for i in ids: by_kind[preds["sft"][i]["kind"]].append(i)
    examples = []
    for kind, kids in by_kind.items():
        for i in kids[:a.per_kind]:
            p = preds["sft"][i]
            examples.append(dict(id=i, kind=kind, video=p["video"], question=p["question"], reference=p["answer"],
                                 **{s: _answer(preds[s][i]) for s in SYSTEMS},
                                 scores={s: dict(scores[s][i]) for s in SYSTEMS}))
    stats = {}
    for kind, kids in by_kind.items():
        stats[kind] = dict(n=len(kids), ppo_same_as_sft=sum(_answer(preds["ppo"][i]) == _answer(preds["sft"][i]) for i in kids),
                           dpo_same_as_sft=sum(_answer(preds["dpo"][i]) == _answer(preds["sft"][i]) for i in kids))
    qa = by_kind.get("qa", [])
    stats["qa_answers_no"] = {s: sum(preds[s][i]["pred"].strip().lower().startswith("no") for i in qa) for s in SYSTEMS}
    stats["qa_reference_no"] = sum(preds["sft"][i]["answer"].strip().lower().startswith("no") for i in qa)
    stats["qa_correct"] = {s: sum(preds[s][i]["pred"].strip().lower()[:2] == preds[s][i]["answer"].strip().lower()[:2]
                                  for i in qa) for s in SYSTEMS}
    out = dict(command=f"python bench/toy_side_by_side.py {a.run_dir}" + (f" --per-kind {a.per_kind}" if a.per_kind != 3 else ""),
               stats=stats, examples=examples)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(stats, indent=1)); print("wrote", a.out)


if __name__ == "__main__":
    main()
