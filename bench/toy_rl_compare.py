"""PPO vs GRPO vs RLOO (vs DPO) on the toy world: same SFT start, same reward model, same prompts, same sampling budget.

    python bench/toy_rl_compare.py RUN_DIR [--out DIR] [--steps 60] [--batch 32] [--group 4] [--max-new-tokens 48]
                                   [--seeds 0,1,2] [--methods ppo,grpo,rloo] [--eval-n N] [--set grpo.kl_coef=0.1 ...]

RUN_DIR is a finished demo run (`make demo`: it holds `config.yaml`, `data/`, `features/`, `sft/model`,
`reward/model`). Every method samples `--batch` answers of at most `--max-new-tokens` tokens per step for `--steps`
steps (GRPO/RLOO: `--batch / --group` prompts x `--group` answers), so the sampling budget is the same; the tokens
actually sampled are reported too. Each (method, seed) trains in its own process (so its peak memory is its own:
max RSS on CPU, `torch.cuda.max_memory_allocated` on a GPU), then its policy is evaluated greedily on the run's
held-out split by the exact toy-world scorer (09_eval), as is the SFT model. Prints and writes `OUT/summary.json`:
what the optimised reward model is worth (who labelled its pairs, its held-out accuracy on them and against the
truth), per method the scores, the gain over SFT per seed and its mean with a t-interval over seeds (paired: same SFT start,
same questions), the last steps' RM score and KL, wall time and peak memory. Everything resumes (done.json).
`--methods ppo,grpo,rloo,dpo` adds DPO (08b_dpo) on the run's AI-feedback preference pairs (the RM's training data)
with the run's `dpo` section and the seed: it samples nothing and uses no RM, so its sampling and RM columns are empty.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("ppo", "grpo", "rloo", "dpo")
RLOO = dict(advantage="rloo", kl_in="reward", kl_estimator="k1")  # RLOO as Ahmadian et al.: KL in the reward
SHARED = ("lora", "lr", "length_coef", "max_prompt_length", "no_eos_penalty", "no_eos_mode", "temperature", "top_p",
          "rm_prompt", "rm_use_context", "mixed_precision", "deepspeed_config")  # taken from the run's ppo section


def _run(run_dir):
    from vlm_rlaif.pipeline import Run, load_config
    run_dir = Path(run_dir)
    for need in ("config.yaml", "sft/model", "reward/model"):
        if not (run_dir / need).exists():
            raise FileNotFoundError(f"{run_dir}: no {need}; give a finished demo run directory (`make demo`)")
    return Run(load_config(run_dir / "config.yaml"), run_dir, create=False)


def _overrides(sets, method) -> dict:
    from vlm_rlaif.pipeline import yaml_load
    out = {}
    for s in sets:
        key, _, val = s.partition("=")
        m, _, k = key.partition(".")
        if not k or m not in METHODS: raise ValueError(f"--set {s!r}: expected METHOD.key=value with METHOD in {METHODS}")
        if m == method: out[k] = yaml_load(val)
    return out


def method_config(run, method: str, a, seed: int):
    "The stage config of `method` on `run`, with the shared budget and the run's ppo settings for what they share."
    from dataclasses import replace
    from vlm_rlaif.grpo import GRPOConfig
    from vlm_rlaif.pipeline import dpo_config, grpo_config, ppo_config
    if method == "dpo":  # offline: the run's preference pairs, its own epochs; only the seed changes
        return replace(dpo_config(run), seed=seed, progress=False, **_overrides(a.set, method))
    ppo = ppo_config(run)
    budget = dict(num_steps=a.steps, rollout_batch_size=a.batch, generation_batch_size=a.batch,
                  minibatch_size=a.minibatch or a.batch // 2, max_new_tokens=a.max_new_tokens, seed=seed,
                  save_every=a.save_every, progress=False)
    if method == "ppo": return replace(ppo, **budget, **_overrides(a.set, method))
    base = grpo_config(run).to_dict()
    if run.cfg.grpo is None:  # an older run without a grpo section: PPO's settings for what the two share
        base.update({k: getattr(ppo, k) for k in SHARED})
    return GRPOConfig.from_dict({**base, **(RLOO if method == "rloo" else dict(advantage="grpo")), "group_size": a.group,
                                 **budget, **_overrides(a.set, method)})


def child(job_path):
    "Train one (method, seed), record wall time and peak memory, then evaluate the policy."
    import numpy as np
    import torch
    from vlm_rlaif.pipeline import toy_gold_monitor
    from vlm_rlaif.training import read_metrics
    job = json.loads(Path(job_path).read_text())
    a = argparse.Namespace(**job["args"])
    torch.set_num_threads(a.threads)
    run, method, seed, out = _run(a.run_dir), job["method"], job["seed"], Path(job["out"])
    cfg = method_config(run, method, a, seed)
    monitor = None if method == "dpo" else toy_gold_monitor(run.data_dir)  # the gold quality of RL rollouts
    t0 = time.time()
    if method == "ppo":
        from vlm_rlaif.ppo import train_ppo
        train_ppo(cfg, out / "train", monitor_fn=monitor)
    elif method == "dpo":
        from vlm_rlaif.dpo import train_dpo
        train_dpo(cfg, out / "train")
    else:
        from vlm_rlaif.grpo import train_grpo
        train_grpo(cfg, out / "train", monitor_fn=monitor)
    res = dict(method=method, seed=seed, train_seconds=round(time.time() - t0, 1),
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), config=cfg.to_dict())
    if torch.cuda.is_available(): res["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    rows = [r for r in read_metrics(out / "train" / "metrics.jsonl") if "objective/kl" in r]  # none for DPO
    last = rows[-max(1, len(rows) // 5):]  # the last fifth of the steps
    mean = lambda k: float(np.mean([r[k] for r in last if r.get(k) is not None])) if any(r.get(k) is not None for r in last) else None
    res.update(rm_score_last=mean("objective/scores"), kl_last=mean("objective/kl_k3"),  # k3 for all methods
               gold_rollouts_last=mean("objective/monitor"),
               response_tokens=rows[-1].get("compute/response_tokens") if rows else None,
               resumed_steps=bool(rows) and len(rows) != a.steps)
    t1 = time.time()
    res["eval"] = evaluate(run, out / "train" / "policy", out / "eval", a)
    res["eval_seconds"] = round(time.time() - t1, 1)
    (out / "result.json").write_text(json.dumps(res, indent=1))


def evaluate(run, model_dir, out_dir, a) -> dict:
    "The exact toy scorer's scores of `model_dir`'s greedy answers on the run's held-out split."
    from dataclasses import replace
    from vlm_rlaif.evaluate import evaluate_model, load_scores
    from vlm_rlaif.pipeline import eval_config
    cfg = replace(eval_config(run, str(model_dir)), judge="toy", max_items=a.eval_n, progress=False)
    if cfg.benchmark != "toy": raise ValueError(f"{run.root}: eval.benchmark is {cfg.benchmark!r}; this bench needs the toy world")
    return load_scores(evaluate_model(cfg, out_dir))


def flat_scores(scores: dict) -> dict:
    "The toy scorer's scores.json as flat numbers: each criterion (0-5), their mean, QA accuracy and score."
    crit = {k: float(v) for k, v in scores.get("criteria", {}).items() if v is not None}
    out = dict(crit, mean_criterion=sum(crit.values()) / len(crit)) if crit else {}
    for k in ("accuracy", "score"):
        if scores.get("qa", {}).get(k) is not None: out[f"qa_{k}"] = float(scores["qa"][k])
    return out


T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def interval(x) -> dict:
    "Mean and 95% t-interval half-width of `x` (None with one value)."
    import numpy as np
    x = np.asarray(x, float)
    if len(x) < 2: return dict(mean=float(x.mean()), half_width=None, n=len(x))
    df = len(x) - 1  # Student t 97.5% quantiles (no scipy here); beyond 10 degrees of freedom a close approximation
    t = T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df
    return dict(mean=float(x.mean()), half_width=float(t * x.std(ddof=1) / np.sqrt(len(x))), n=len(x))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="default: RUN_DIR/rl_compare")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32, help="sampled answers per step (all methods)")
    p.add_argument("--group", type=int, default=4, help="GRPO/RLOO answers per prompt")
    p.add_argument("--minibatch", type=int, default=None, help="answers per optimiser update (default batch/2)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--eval-n", type=int, default=None, help="cap per item kind of the held-out split (default: all)")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="METHOD.KEY=VALUE", help="e.g. grpo.kl_coef=0.1 ppo.ppo_epochs=1")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one (method, seed)
    a = p.parse_args(argv)
    if a.job: return child(a.job)
    run = _run(a.run_dir)
    out = Path(a.out) if a.out else run.root / "rl_compare"
    out.mkdir(parents=True, exist_ok=True)
    methods, seeds = a.methods.split(","), [int(s) for s in a.seeds.split(",")]
    if set(methods) - set(METHODS): raise ValueError(f"--methods: unknown {sorted(set(methods) - set(METHODS))}")
    for m in methods:
        for s in seeds: method_config(run, m, a, s)  # every config error before anything trains
    t0 = time.time()
    sft = evaluate(run, run.root / "sft" / "model", out / "sft_eval", a)
    sft_seconds = round(time.time() - t0, 1)
    results = {}
    args = {**vars(a), "run_dir": str(Path(a.run_dir).resolve())}
    for m in methods:
        for s in seeds:
            d = out / f"{m}_seed{s}"
            if not (d / "result.json").exists():
                d.mkdir(parents=True, exist_ok=True)
                (d / "job.json").write_text(json.dumps(dict(method=m, seed=s, out=str(d.resolve()), args=args)))
                print(f"== {m} seed {s}", flush=True)
                subprocess.run([sys.executable, __file__, a.run_dir, "--job", str(d / "job.json")], check=True)
            results.setdefault(m, []).append(json.loads((d / "result.json").read_text()))
    sft = flat_scores(sft)
    for rs in results.values():
        for r in rs: r["eval"] = flat_scores(r["eval"])
    crits = list(sft)
    summary = dict(run_dir=str(run.root), budget=dict(steps=a.steps, answers_per_step=a.batch, group=a.group,
                   max_new_tokens=a.max_new_tokens), seeds=seeds, reward_model=reward_model_info(run),
                   sft=dict(scores=sft, eval_seconds=sft_seconds))
    for m, rs in results.items():
        summary[m] = dict(
            gain_over_sft={c: interval([r["eval"][c] - sft[c] for r in rs]) for c in crits if all(c in r["eval"] for r in rs)},
            scores={c: interval([r["eval"][c] for r in rs]) for c in crits if all(c in r["eval"] for r in rs)},
            **{k: interval([r[k] for r in rs if r.get(k) is not None]) for k in
               ("rm_score_last", "kl_last", "gold_rollouts_last", "train_seconds", "peak_rss_mib", "peak_cuda_mib",
                "response_tokens") if any(r.get(k) is not None for r in rs)})
        curves = [curve(out / f"{m}_seed{s}" / "train" / "metrics.jsonl") for s in seeds]
        if any(curves): summary[m]["curves"] = curves  # per seed, per step: for the figure in 08c_grpo
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rm = summary["reward_model"]
    print(f"reward model ({rm['judge']} labels): held-out accuracy {rm['accuracy']}, against the truth {rm['truth_accuracy']}")
    print(table(summary, list(results)))
    print(f"written: {out / 'summary.json'}")
    return summary


def reward_model_info(run) -> dict:
    """What the optimised reward model is worth: its held-out preference accuracy on the pairs of its own labels
    (`accuracy`) and against the toy-world truth (`truth_accuracy`, when measured), from `reward/eval.json`, and who
    labelled its training pairs (`feedback.judge`: the SFT model, or the oracle ablation)."""
    path = run.dir("reward") / "eval.json"
    ev = json.loads(path.read_text()) if path.exists() else {}
    return dict(judge=(run.cfg.feedback or {}).get("judge", "model"), n_val=ev.get("n"),
                **{k: ev.get(k) for k in ("accuracy", "truth_accuracy")})


CURVE_KEYS = {"objective/scores": "rm_score", "objective/kl_k3": "kl_k3", "objective/monitor": "gold",
              "val/response_length": "length"}


def curve(metrics_path) -> dict:
    "Per step of one RL run: RM score, k3 KL, gold quality of the rollouts and answer length (rounded; {} for DPO)."
    from vlm_rlaif.training import read_metrics
    rows = [r for r in read_metrics(metrics_path) if "objective/kl" in r] if Path(metrics_path).exists() else []
    if not rows: return {}
    out = {"step": [int(r["step"]) for r in rows]}
    for k, name in CURVE_KEYS.items(): out[name] = [None if r.get(k) is None else round(float(r[k]), 4) for r in rows]
    return out


def table(summary: dict, methods) -> str:
    "A markdown table of the summary: gains over SFT (mean ± 95% half-width over seeds), RM score, KL, cost."
    def f(d, fmt="{:+.3f}"):  # mean ± 95% half-width, the half-width in the mean's format without its sign
        if not d: return "–"
        hw = d.get("half_width")
        return fmt.format(d["mean"]) + ("" if hw is None else " ± " + fmt.replace("+", "").format(hw))
    head = ("| method | Δ mean criterion | Δ correctness | Δ QA accuracy | RM score (last steps) | KL k3 (last steps) | "
            "gold quality of rollouts | train s | peak RSS MiB | response tokens |")
    rows = [head, "|" + "---|" * 10]
    for m in methods:
        s = summary[m]; g = s["gain_over_sft"]
        rows.append(f"| {m} | {f(g.get('mean_criterion'))} | {f(g.get('correctness'))} | {f(g.get('qa_accuracy'))} | "
                    f"{f(s.get('rm_score_last'))} | {f(s.get('kl_last'), fmt='{:.3f}')} | {f(s.get('gold_rollouts_last'), fmt='{:.3f}')} | "
                    f"{f(s.get('train_seconds'), fmt='{:.0f}')} | {f(s.get('peak_rss_mib'), fmt='{:.0f}')} | "
                    f"{f(s.get('response_tokens'), fmt='{:.0f}')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
