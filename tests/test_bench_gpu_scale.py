"""bench/gpu_scale.py: its FLOP and roofline arithmetic against real models, and its tiny CPU run end to end."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
spec = importlib.util.spec_from_file_location("gpu_scale", Path(__file__).resolve().parents[1] / "bench" / "gpu_scale.py")
gs = importlib.util.module_from_spec(spec); spec.loader.exec_module(gs)


def test_llama_7b_parameter_count():
    # Llama-2-7B has 6,738,415,616 parameters: the matmuls, plus the embedding table and the RMSNorm weights
    lm = gs.LLAMA_7B
    d, L, V = lm["hidden_size"], lm["num_hidden_layers"], lm["vocab_size"]
    assert gs.lm_linear_params(lm) + V * d + (2 * L + 1) * d == 6_738_415_616


def test_llama_13b_parameter_count():
    # Llama-2-13B (the original's reward model for the 7B policy) has 13,015,864,320 parameters
    lm = gs.LLAMA_13B
    d, L, V = lm["hidden_size"], lm["num_hidden_layers"], lm["vocab_size"]
    assert gs.lm_linear_params(lm) + V * d + (2 * L + 1) * d == 13_015_864_320


def test_linear_params_match_a_built_model():
    from transformers import AutoConfig, AutoModelForCausalLM
    lm = dict(gs.TINY_LM, num_key_value_heads=2)  # grouped-query attention counted right too
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **lm))
    linear = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
    assert gs.lm_linear_params(lm) == linear


def test_roofline_is_weights_over_bandwidth():
    peak = dict(matmul_tflops=1e9, copy_gbps=2.0)  # 1 GB/s each way; prefill free
    lm = dict(gs.TINY_LM)
    n = gs.lm_linear_params(lm)
    t = gs.rollout_roofline(lm, batch=1, prompt=1, new=10, bytes_per_param=2, peak=peak)
    kv = sum((1 + i) * 2 * lm["num_hidden_layers"] * lm["hidden_size"] * 2 for i in range(10))
    assert t == pytest.approx((10 * 2 * n + kv) / 1e9, rel=1e-6)


def test_tiny_run_writes_every_section(tmp_path):
    out = tmp_path / "r.json"
    gs.main(["--tiny", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["peak"]["matmul_tflops"] > 0 and r["peak"]["copy_gbps"] > 0
    assert 0 < r["sft"]["sft_mfu"] and r["sft"]["sft_tokens_per_s"] > 0
    assert 0 < r["rollout"]["rollout_fraction_of_roofline"] and r["rollout"]["rollout_tokens_per_s"] > 0
    assert r["ppo"]["ppo_step_s"] > 0 and r["ppo"]["ppo_step_s"] >= r["ppo"]["ppo_rollout_phase_s"]
    assert not any("error" in r[k] for k in ("sft", "rollout", "ppo"))
    assert r["ppo"]["ppo_params_reward"] > r["ppo"]["ppo_params_policy"]  # the RM is the larger LM, as the original's


def test_predicted_lora_size_matches_peft():
    from vlm_rlaif.model import add_lora, LoraSettings
    sh = gs.shapes(tiny=True)
    m = gs.build(sh, None)
    add_lora(m, LoraSettings(r=sh["lora_r"], alpha=sh["lora_r"], dropout=0.0, train_projector=False))
    n = sum(p.numel() for k, p in m.named_parameters() if "lora_" in k)
    assert gs.predict(sh)["lora_params"] == n
    real = gs.predict(gs.shapes(tiny=False))
    assert real["ppo_memory_floor_gib"]["weights_policy"] == pytest.approx(6_738_415_616 * 2 / 2 ** 30, rel=1e-4)
    assert real["ppo_memory_floor_gib"]["weights_reward"] == pytest.approx(13_015_864_320 * 2 / 2 ** 30, rel=1e-4)
    same = gs.predict(gs.shapes(tiny=False, rm="7b"))["ppo_memory_floor_gib"]
    assert same["weights_reward"] == same["weights_policy"]
    with pytest.raises(ValueError, match="rm must be one of"):
        gs.shapes(tiny=True, rm="70b")
