"""The paper's shapes on one GPU: how fast SFT and PPO run, and whether the 7B policy + 13B reward/value model fit.

    python bench/gpu_scale.py                    # real shapes, needs a CUDA GPU (~100 GB for the PPO section)
    python bench/gpu_scale.py --rm 7b            # a 7B reward model instead (the paper's RM for its 7B policy is 13B)
    python bench/gpu_scale.py --tiny             # the same code on tiny shapes (CPU, seconds: a smoke test)
    python bench/gpu_scale.py --sections peak,sft --sft-batch 4 --out bench/results/gpu_scale.json
    python bench/gpu_scale.py --predict [--new-tokens 896]   # the arithmetic alone (no GPU): roofline, memory floor

Models are random-init with the real shapes (Llama-2-7B LM, ViT-L/14-336 features of 50 frames, pooled after the
projector to 626 visual tokens, bf16, LoRA): the speed of a step does not depend on the weights' values.
Sections (each writes its numbers into the JSON at once, so an out-of-memory section leaves the others):
- peak:    the measured bf16 matmul peak (TFLOP/s) and memory bandwidth (GB/s, copy) that the others are rated against;
- sft:     one LoRA SFT step (forward, backward, AdamW; gradient checkpointing): tokens/s and MFU = model FLOPs per
           second / measured peak (model FLOPs: 2N forward + 2N input gradients per token for the frozen base, 6N for
           the trained projector, attention 12 L d S; recomputation not counted);
- rollout: `VideoLMM.generate` of PPO rollouts: new tokens/s against the memory-bandwidth roofline (every decode
           step reads all weights and the KV cache once; prefill rated at the matmul peak);
- ppo:     one full PPO step of this library (make_rollouts, compute_advantages, ppo_update) with a 7B LoRA policy
           and a reward model carrying the value head, 13B as in the original's launch scripts (`--rm 7b`: 7B):
           seconds per phase and peak GPU memory.
Not here: TRL's PPO trainer on the same models (TRL is not installed on the GPU machines of this project).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch

from vlm_rlaif.encoder import EncoderConfig, toy_encoder_config
from vlm_rlaif.model import LoraSettings, ModelConfig, build_model, build_prompt, train_toy_tokenizer, video_question

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
LLAMA_13B = dict(LLAMA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                 num_key_value_heads=40)
TINY_LM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
               vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=False)
TINY_LM_LARGER = dict(TINY_LM, hidden_size=96, intermediate_size=192, num_hidden_layers=3)  # the tiny run's "13B" RM
RM_SIZES = ("13b", "7b")  # the reward model's LM: the original's 13B for the 7B policy, or the policy's own size


def shapes(tiny: bool, rm: str = "13b") -> dict:
    "The shapes of one run; `rm`: the reward model's LM (13b: Llama-2-13B, tiny: a larger tiny LM; 7b: the policy's)."
    if rm not in RM_SIZES: raise ValueError(f"rm must be one of {RM_SIZES}, got {rm!r}")
    if tiny:
        return dict(lm=TINY_LM, rm_lm=TINY_LM_LARGER if rm == "13b" else TINY_LM, enc=toy_encoder_config(),
                    dtype="float32", sft_batch=2, text_len=32, gen_batch=4, prompt_text=16, new_tokens=8,
                    ppo_rollouts=4, ppo_minibatch=2, lora_r=8)
    return dict(lm=LLAMA_7B, rm_lm=LLAMA_13B if rm == "13b" else LLAMA_7B, enc=EncoderConfig(pretrained=None),
                dtype="bfloat16", sft_batch=8, text_len=200, gen_batch=32, prompt_text=64, new_tokens=256,
                ppo_rollouts=32, ppo_minibatch=8, lora_r=64)


# ------------------------------------------------------------------ measuring
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()


def timed(fn, warmup: int = 1, iters: int = 3) -> float:
    "Median seconds of `fn()` after `warmup` calls."
    for _ in range(warmup): fn()
    ts = []
    for _ in range(iters):
        sync(); t = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


@contextmanager
def peak_memory(out: dict, key: str):
    "Record the peak GPU memory (GiB) of the block (CPU: the process's max RSS so far)."
    if torch.cuda.is_available():
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    yield
    out[key] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30


def measure_peak(tiny: bool) -> dict:
    "bf16 matmul TFLOP/s (fp32 on CPU) and copy bandwidth GB/s (bytes read + written)."
    dev, dt = device(), (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    n = 1024 if tiny or not torch.cuda.is_available() else 8192
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    t = timed(lambda: a @ b, warmup=2, iters=10 if torch.cuda.is_available() else 3)
    nbytes = (2 ** 24 if tiny or not torch.cuda.is_available() else 2 ** 32)
    x = torch.empty(nbytes // 2, device=dev, dtype=torch.bfloat16); y = torch.empty_like(x)
    tc = timed(lambda: y.copy_(x), warmup=2, iters=10)
    return dict(matmul_tflops=2 * n ** 3 / t / 1e12, matmul_n=n, matmul_dtype=str(dt).replace("torch.", ""),
                copy_gbps=2 * nbytes / tc / 1e9, device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------ models
_TOKENIZER = []


def bench_tokenizer():
    "A small tokenizer (the LM's vocabulary size is set by its config; text content does not matter here)."
    if not _TOKENIZER:
        _TOKENIZER.append(train_toy_tokenizer([f"w{i} w{i + 1} w{i * 7 % 97}" for i in range(2000)], vocab_size=1000))
    return _TOKENIZER[0]


def build(sh: dict, lora_r: int | None, seed: int = 0, lm: dict | None = None):
    "A random-init VideoLMM of the given shapes (its LM: `lm`, default the policy's), built directly on the device."
    tok = bench_tokenizer()
    lora = LoraSettings(r=lora_r, alpha=lora_r, dropout=0.0, train_projector=True) if lora_r else None
    cfg = ModelConfig(lm_config=dict(lm or sh["lm"]), encoder=sh["enc"], lora=lora, dtype=sh["dtype"])
    torch.manual_seed(seed)
    with torch.device(device()):
        return build_model(cfg, tok)


def feature_shape(enc: EncoderConfig) -> tuple[int, int, int]:
    vc = enc.vision_cfg()
    return enc.n_frames, (vc["image_size"] // vc["patch_size"]) ** 2, vc["width"]


def n_params(module) -> int: return sum(p.numel() for p in module.parameters())


def lm_linear_params(lm: dict) -> int:
    "Parameters of the LM's matmuls per token: attention, MLP and the output head (not the embedding lookup)."
    d, ff, L, V = lm["hidden_size"], lm["intermediate_size"], lm["num_hidden_layers"], lm["vocab_size"]
    kv = d * lm["num_key_value_heads"] // lm["num_attention_heads"]
    return L * (2 * d * d + 2 * d * kv + 3 * d * ff) + d * V


def sft_flops(lm: dict, proj_params: int, batch: int, seq: int, patches: int) -> float:
    "Model FLOPs of one LoRA SFT step: frozen LM 4N/token, attention 12 L d S/token, trained projector 6P/patch."
    N, L, d = lm_linear_params(lm), lm["num_hidden_layers"], lm["hidden_size"]
    return batch * (seq * (4 * N + 12 * L * d * seq) + patches * 6 * proj_params)


# ------------------------------------------------------------------ sections
def video_batch(model, sh: dict, batch: int, text_len: int, answer: bool):
    "Left-padded prompts (plus `text_len` answer tokens when `answer`) and random video features."
    tok = model.tokenizer
    q = " ".join(f"w{i}" for i in range(sh["prompt_text"]))
    conv = [{"from": "human", "value": video_question(q)}]
    if answer: conv.append({"from": "gpt", "value": " ".join(f"w{i % 50}" for i in range(text_len))})
    ids = torch.tensor([tok(build_prompt(conv, add_generation_prompt=not answer))["input_ids"]] * batch, device=device())
    T, P, C = feature_shape(sh["enc"])
    feats = torch.randn(batch, T, P, C, device=device(), dtype=model.cfg.torch_dtype)
    return ids, torch.ones_like(ids), feats


def section_sft(sh: dict, peak: dict, out: dict):
    model = build(sh, sh["lora_r"])
    model.gradient_checkpointing_enable()
    model.train()
    ids, mask, feats = video_batch(model, sh, sh["sft_batch"], sh["text_len"], answer=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, video_feats=feats, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    with peak_memory(out, "sft_peak_gib"):
        t = timed(step, warmup=1, iters=3)
    T, P, _ = feature_shape(sh["enc"])
    seq = ids.shape[1] - 1 + T + P  # <image> becomes the pooled visual tokens
    flops = sft_flops(sh["lm"], n_params(model.projector), sh["sft_batch"], seq, T * P)
    out.update(sft_step_s=t, sft_batch=sh["sft_batch"], sft_seq=seq, sft_tokens_per_s=sh["sft_batch"] * seq / t,
               sft_model_tflops=flops / t / 1e12, sft_mfu=flops / t / 1e12 / peak["matmul_tflops"],
               sft_trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
               sft_lora_r=sh["lora_r"])
    del model, opt


def rollout_roofline(lm: dict, batch: int, prompt: int, new: int, bytes_per_param: int, peak: dict) -> float:
    "Seconds a perfect implementation needs: prefill at the matmul peak, each decode step at the copy bandwidth."
    N, L, d = lm_linear_params(lm), lm["num_hidden_layers"], lm["hidden_size"]
    kv = d * lm["num_key_value_heads"] // lm["num_attention_heads"]
    prefill = batch * prompt * (2 * N + 4 * L * d * prompt) / (peak["matmul_tflops"] * 1e12)
    kv_bytes = sum(batch * (prompt + t) * 2 * L * kv * bytes_per_param for t in range(new))
    decode = (new * N * bytes_per_param + kv_bytes) / (peak["copy_gbps"] * 1e9 / 2)  # copy_gbps counts read + write
    return prefill + decode


def section_rollout(sh: dict, peak: dict, out: dict):
    model = build(sh, sh["lora_r"]).eval()
    ids, mask, feats = video_batch(model, sh, sh["gen_batch"], 0, answer=False)
    n = sh["new_tokens"]

    def gen():
        model.generate(ids, mask, feats, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0)

    with peak_memory(out, "rollout_peak_gib"):
        t = timed(gen, warmup=1, iters=2)
    T, P, _ = feature_shape(sh["enc"])
    prompt = ids.shape[1] - 1 + T + P
    bpp = torch.finfo(model.cfg.torch_dtype).bits // 8
    roof = rollout_roofline(sh["lm"], sh["gen_batch"], prompt, n, bpp, peak)
    out.update(rollout_s=t, rollout_batch=sh["gen_batch"], rollout_prompt_tokens=prompt, rollout_new_tokens=n,
               rollout_tokens_per_s=sh["gen_batch"] * n / t, rollout_roofline_tokens_per_s=sh["gen_batch"] * n / roof,
               rollout_fraction_of_roofline=roof / t)
    del model


def section_ppo(sh: dict, peak: dict, out: dict):
    from vlm_rlaif.ppo import PolicyWithValue, PPOConfig, ValueHead, compute_advantages, make_rollouts, ppo_update
    from vlm_rlaif.reward import RewardModel
    from vlm_rlaif.training import make_accelerator
    from transformers import get_scheduler
    cfg = PPOConfig(rollout_batch_size=sh["ppo_rollouts"], generation_batch_size=sh["ppo_rollouts"],
                    minibatch_size=sh["ppo_minibatch"], ppo_epochs=1, max_new_tokens=sh["new_tokens"],
                    no_eos_penalty=None, length_coef=0.0, mixed_precision="no", progress=False)
    with peak_memory(out, "ppo_peak_gib"):
        acc = make_accelerator("no", seed=0)
        policy = build(sh, sh["lora_r"], seed=0)
        for n_, p in policy.named_parameters(): p.requires_grad_("lora_" in n_)  # PPO: the projector is frozen
        policy.gradient_checkpointing_enable()
        rm = RewardModel(build(sh, None, seed=1, lm=sh["rm_lm"])).requires_grad_(False).eval()
        value_head = ValueHead(rm.config.hidden_size).to(device())
        lora = [p for p in policy.parameters() if p.requires_grad]
        opt = torch.optim.AdamW([{"params": lora, "lr": 1e-5}, {"params": list(value_head.parameters()), "lr": 1e-5}])
        sched = get_scheduler("constant", opt)
        model_w, opt_w = acc.prepare(PolicyWithValue(policy, value_head), opt)
        out["ppo_params_policy"], out["ppo_params_reward"] = n_params(policy), n_params(rm)
        ids, mask, feats = video_batch(policy, sh, sh["ppo_rollouts"], 0, answer=False)
        batch = dict(input_ids=ids, attention_mask=mask, video_feats=feats)
        suffix = [[] for _ in range(len(ids))]
        times = {}
        for it in range(2):  # the first step warms up kernels and the allocator
            sync(); t0 = time.perf_counter()
            roll = make_rollouts(policy, rm, value_head, batch, suffix, cfg)
            sync(); t1 = time.perf_counter()
            adv = compute_advantages(roll, cfg, kl_coef=0.1)
            ppo_update(model_w, opt_w, sched, acc, roll, adv, cfg, step=it, params=lora + list(value_head.parameters()))
            sync(); t2 = time.perf_counter()
            times = dict(ppo_rollout_phase_s=t1 - t0, ppo_update_phase_s=t2 - t1, ppo_step_s=t2 - t0)
    out.update(times, ppo_rollouts=sh["ppo_rollouts"], ppo_minibatch=sh["ppo_minibatch"],
               ppo_new_tokens=sh["new_tokens"], ppo_response_tokens_per_s=sh["ppo_rollouts"] * sh["new_tokens"] / times["ppo_step_s"])
    if torch.cuda.is_available():
        out["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
        out["ppo_fits"] = out["ppo_peak_gib"] < out["gpu_memory_gib"]


SECTIONS = {"sft": section_sft, "rollout": section_rollout, "ppo": section_ppo}
H100_NOMINAL = dict(matmul_tflops=989.0, copy_gbps=2 * 3350.0, device="H100 SXM datasheet (dense bf16, HBM3)")


def predict(sh: dict, peak: dict = H100_NOMINAL) -> dict:
    """What the sections should find, from arithmetic alone: the rollout roofline and the memory a PPO step (the
    policy and the `rm_lm` reward model) cannot go below (both models' weights, the policy's LoRA with AdamW state,
    the rollout KV cache, the fp32 log-softmax of one generation batch)."""
    lm, B, n = sh["lm"], sh["gen_batch"], sh["new_tokens"]
    T, P, _ = feature_shape(sh["enc"])
    prompt = T + P + sh["prompt_text"] + 40  # + the chat template's tokens, about
    bpp = 2 if sh["dtype"] == "bfloat16" else 4
    weights = lambda c: lm_linear_params(c) + c["vocab_size"] * c["hidden_size"]  # linear layers + embedding table
    N_all, N_rm = weights(lm), weights(sh.get("rm_lm", lm))
    d, L, ff = lm["hidden_size"], lm["num_hidden_layers"], lm["intermediate_size"]
    lora = L * sh["lora_r"] * (4 * 2 * d + 3 * (d + ff))  # all-linear LoRA: A and B of q,k,v,o,gate,up,down
    kv = B * (prompt + n) * 2 * L * d * bpp
    gib = 2 ** 30
    mem = dict(weights_policy=N_all * bpp / gib, weights_reward=N_rm * bpp / gib, lora_adam_fp32=lora * 16 / gib,
               kv_cache=kv / gib, logprobs_fp32=2 * B * (n + 1) * lm["vocab_size"] * 4 / gib)
    roof = rollout_roofline(lm, B, prompt, n, bpp, peak)
    return dict(assumed_peak=peak, prompt_tokens=prompt, rollout_roofline_tokens_per_s=B * n / roof,
                decode_bytes_per_step_weights_gb=lm_linear_params(lm) * bpp / 1e9,
                decode_bytes_per_step_kv_gb_at_end=kv / 1e9, ppo_memory_floor_gib=mem,
                ppo_memory_floor_total_gib=sum(mem.values()), lora_params=lora)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--sections", default="peak,sft,rollout,ppo")
    ap.add_argument("--predict", action="store_true", help="print the arithmetic predictions for these shapes and exit")
    ap.add_argument("--out", default=None, help="JSON file (default: bench/results/gpu_scale[_tiny].json)")
    ap.add_argument("--rm", default="13b", choices=RM_SIZES, help="the reward model's LM (default: the original's 13B)")
    for k in ("sft_batch", "gen_batch", "new_tokens", "ppo_rollouts", "ppo_minibatch", "lora_r"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    a = ap.parse_args(argv)
    sh = shapes(a.tiny, a.rm)
    for k in ("sft_batch", "gen_batch", "new_tokens", "ppo_rollouts", "ppo_minibatch", "lora_r"):
        if getattr(a, k) is not None: sh[k] = getattr(a, k)
    if a.predict:
        p = predict(sh)
        print(json.dumps(p, indent=1))
        return p
    if not a.tiny and not torch.cuda.is_available():
        sys.exit("bench/gpu_scale.py: the real shapes need a CUDA GPU (use --tiny for the CPU smoke test)")
    out_path = Path(a.out or Path(__file__).parent / "results" / f"gpu_scale{'_tiny' if a.tiny else ''}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    res = dict(shapes={k: v for k, v in sh.items() if k != "enc"}, encoder=sh["enc"].model_name,
               torch=torch.__version__, started=time.strftime("%Y-%m-%dT%H:%M:%S"))
    res["peak"] = measure_peak(a.tiny)
    res["predicted"] = predict(sh, res["peak"])
    print(json.dumps(res["peak"]), flush=True)
    for name in a.sections.split(","):
        if name == "peak": continue
        r = res.setdefault(name, {})
        t = time.time()
        try:
            SECTIONS[name](sh, res["peak"], r)
        except torch.OutOfMemoryError as e:  # keep the other sections' numbers
            r["error"] = f"out of memory: {str(e).splitlines()[0]}"
        r["wall_s"] = round(time.time() - t, 1)
        print(name, json.dumps(r), flush=True)
        out_path.write_text(json.dumps(res, indent=1))
        if torch.cuda.is_available(): torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    main()
