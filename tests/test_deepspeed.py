"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate, on two CPU processes (gloo): SFT, reward model, PPO and DPO
run, write DeepSpeed checkpoints, resume, save whole weights, and train like plain DDP (same weights). Under
ZeRO-3, sampling gathers the weights once instead of fetching every layer for every token.

The equivalence runs train with SGD (momentum 0.9) in AdamW's place: SGD is linear in the gradient, so the
reduction-order noise between DDP and ZeRO stays noise (~1e-7 of a step), where Adam turns a near-zero gradient's
noise into a full +-lr step and the comparison becomes a coin toss. (AdamW itself under ZeRO-2 runs in
test_pipeline_dist.)"""
import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import TINY_LM, launch_two_processes
from safetensors.torch import load_file

from vlm_rlaif.data import save_records
from vlm_rlaif.encoder import toy_encoder_config
from vlm_rlaif.toyworld import ToyWorldConfig, make_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SCRIPT = textwrap.dedent('''
    import json, shutil, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from accelerate import PartialState
    from safetensors.torch import load_file
    from vlm_rlaif.dpo import DPOConfig, train_dpo
    from vlm_rlaif.ppo import PPOConfig, load_policy, train_ppo
    from vlm_rlaif.reward import RewardConfig, train_reward
    from vlm_rlaif.sft import SFTConfig, train_sft
    from vlm_rlaif.training import generation_model, make_accelerator, zero_stage

    class SGDInAdamWsPlace(torch.optim.SGD):  # the trainers build torch.optim.AdamW(params, lr=..., weight_decay=...)
        def __init__(self, params, lr=1e-3, weight_decay=0.0, **kw):
            super().__init__(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    torch.optim.AdamW = SGDInAdamWsPlace
    c, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    ds, report = c["deepspeed_config"], {}

    sft_cfg = SFTConfig.from_dict({**c["sft"], "deepspeed_config": ds})
    sft = train_sft(sft_cfg, out / "sft", progress=False)
    state = PartialState()  # after the first accelerator: a bare PartialState() on CPU would not see the launch
    # resume: the same run restarted from its step-2 checkpoint ends with the same weights
    if state.is_main_process:
        shutil.copytree(out / "sft", out / "sft_resumed", ignore=shutil.ignore_patterns("done.json", "model", ".lock"))
    state.wait_for_everyone()
    train_sft(sft_cfg, out / "sft_resumed", progress=False)

    rm = train_reward(RewardConfig.from_dict({**c["reward"], "sft_model_dir": str(sft / "model"), "deepspeed_config": ds}),
                      out / "reward")
    train_ppo(PPOConfig.from_dict({**c["ppo"], "sft_model_dir": str(sft / "model"), "reward_model_dir": str(rm / "model"),
                                   "deepspeed_config": ds}), out / "ppo")
    train_dpo(DPOConfig.from_dict({**c["dpo"], "sft_model_dir": str(sft / "model"), "deepspeed_config": ds}), out / "dpo")

    # sampling under ZeRO-3: count DeepSpeed's per-module parameter fetches while generating
    acc = make_accelerator(deepspeed_config=ds, micro_batch_size=1, max_grad_norm=1.0)
    report["zero_stage"] = zero_stage(acc)
    if report["zero_stage"] == 3:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC
        fetches, fetch = [0], PPC.fetch_sub_module
        def counting(self, *a, **k):
            fetches[0] += 1
            return fetch(self, *a, **k)
        PPC.fetch_sub_module = counting
        pol = load_policy(sft / "model", dict(r=4, alpha=8, dropout=0.0, train_projector=False))
        engine, _ = acc.prepare(pol, torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=1e-3))
        tok = pol.tokenizer
        from vlm_rlaif.model import build_prompt, video_question
        text = build_prompt([{"from": "human", "value": video_question("What is there?")}], add_generation_prompt=True)
        ids = torch.tensor([tok(text)["input_ids"]] * 2)
        from vlm_rlaif.encoder import EncoderConfig, FeatureCache
        feats = FeatureCache(c["ppo"]["features_dir"], EncoderConfig.from_dict(c["ppo"]["encoder"]))(c["video"])[None].repeat(2, 1, 1, 1)
        import time
        seconds = {}
        def sample(m, n, key=None):
            fetches[0] = 0
            torch.manual_seed(0)
            t = time.perf_counter()
            new = m.generate(ids, torch.ones_like(ids), feats, max_new_tokens=n, do_sample=False, min_new_tokens=n)
            if key: seconds[key] = time.perf_counter() - t
            return new.tolist(), fetches[0]
        plain = acc.unwrap_model(engine)
        (t4, f4), (t8, f8) = sample(plain, 4), sample(plain, 32, "hooks_32")
        with generation_model(acc, engine) as m:
            (g8, gf8) = sample(m, 32, "gathered_32")
            sample(m, 3 + 5 * state.process_index)  # ranks sampling different lengths must not wait for each other
        (t8b, f8b) = sample(plain, 32)  # the hooks are back afterwards
        report.update(fetches_4=f4, fetches_32=f8, fetches_gathered_32=gf8, fetches_after=f8b,
                      same_tokens=(t8 == g8 == t8b), seconds=seconds)
    if state.is_main_process:
        (out / "report.json").write_text(json.dumps(report))
    # no end_training: the engine must be gone before the process group is (make_accelerator's exit hook does both)
    engine = plain = m = None
''')



@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "The same four stages four times: plain DDP, ZeRO-2, ZeRO-3 and ZeRO-3 in bf16 (two CPU processes each)."
    from vlm_rlaif.reward import toy_preference_records
    root = tmp_path_factory.mktemp("ds")
    data = make_dataset(ToyWorldConfig(n_videos=8, seed=5), root / "data", progress=False)
    pairs = toy_preference_records(data, "train", n=12, seed=0)
    save_records(pairs[:8], root / "pairs_train.json"); save_records(pairs[8:], root / "pairs_val.json")
    enc = toy_encoder_config()
    common = dict(features_dir=str(root / "features"), data_root=str(data), encoder=enc.to_dict(), progress=False)
    cfg = dict(
        video=str(sorted((data / "videos").glob("*.mp4"))[0]),
        sft=dict(data_dir=str(data), features_dir=str(root / "features"), tokenizer_vocab_size=300, batch_size=2,
                 gradient_accumulation_steps=2, lr=1e-3, max_steps=4, save_every=2, log_every=1, seed=0,
                 model=dict(lm_config=TINY_LM, encoder=enc.to_dict(), lora=None)),
        reward=dict(common, train_file=str(root / "pairs_train.json"), val_file=str(root / "pairs_val.json"),
                    lora=None, lr=1e-3, batch_size=2, max_steps=2, save_every=1),
        ppo=dict(common, prompts=str(data / "train_sft.json"), lora=dict(r=4, alpha=8, dropout=0.0), num_steps=2,
                 rollout_batch_size=8, generation_batch_size=2, minibatch_size=2, max_new_tokens=6, max_prompt_length=512,
                 length_coef=0.0, no_eos_penalty=None, lr=1e-3, value_lr=1e-2, save_every=1),
        dpo=dict(common, train_file=str(root / "pairs_train.json"), val_file=str(root / "pairs_val.json"),
                 lora=dict(r=4, alpha=8, dropout=0.0), batch_size=2, lr=1e-3, max_steps=2, save_every=1),
    )
    repo = Path(__file__).resolve().parents[1]
    for stage in (2, 3):  # the shipped configs, allowing the client optimizer SGD (DeepSpeed refuses it otherwise)
        ds = json.loads((repo / f"configs/deepspeed/zero{stage}.json").read_text())
        (root / f"zero{stage}.json").write_text(json.dumps({**ds, "zero_allow_untested_optimizer": True}))
    bf16 = json.loads((root / "zero3.json").read_text())
    bf16.update(bf16={"enabled": True}, fp16={"enabled": False})  # DeepSpeed's CPU accelerator runs bf16 too
    (root / "zero3_bf16.json").write_text(json.dumps(bf16))
    out = {}
    for name, ds in (("ddp", None), ("zero2", root / "zero2.json"), ("zero3", root / "zero3.json"),
                     ("zero3_bf16", root / "zero3_bf16.json")):
        work = root / name; work.mkdir()
        launch_two_processes(SCRIPT, {**cfg, "deepspeed_config": ds and str(ds)}, work / "out", work, timeout=400)
        out[name] = work / "out"
    return out


def _weights(d):
    return {k: v for f in sorted(d.rglob("*.safetensors")) for k, v in load_file(f).items()}


def test_deepspeed_really_ran(runs):
    for name in ("zero2", "zero3", "zero3_bf16"):  # a DeepSpeed checkpoint, not accelerate's plain one (cpu=True drops DeepSpeed)
        ck = sorted((runs[name] / "sft" / "checkpoints").iterdir())[-1]
        assert (ck / "pytorch_model").is_dir(), sorted(p.name for p in ck.iterdir())
    ck = sorted((runs["ddp"] / "sft" / "checkpoints").iterdir())[-1]
    assert not (ck / "pytorch_model").exists()
    for stage in ("sft", "reward", "ppo", "dpo"):
        for name in runs: assert (runs[name] / stage / "done.json").exists(), (name, stage)


# With SGD every run agrees to float noise (gradients differ by reduction order only, and SGD scales that noise by
# lr instead of amplifying it to +-lr as Adam does): one tolerance for every stage, far above float noise and far
# below a training step. The trained LoRA must also differ from DDP's by much less than it moved from its zero init
# (so a LoRA that did not train fails).
@pytest.mark.parametrize("stage,sub,atol", [("sft", "model", 1e-5), ("reward", "model", 1e-5), ("ppo", "policy", 1e-5),
                                            ("dpo", "policy", 1e-5)])
def test_zero_trains_like_ddp(runs, stage, sub, atol):
    "Whole tensors are saved under ZeRO-3 (not empty shards) and all three runs end with the same weights."
    ref = _weights(runs["ddp"] / stage / sub)
    assert ref
    if sub == "policy": assert any(v.abs().sum() > 0 for k, v in ref.items() if "lora_B" in k)  # LoRA trained
    for name in ("zero2", "zero3"):  # (fp32: bf16 is compared in test_bf16_under_zero3)
        got = _weights(runs[name] / stage / sub)
        assert got.keys() == ref.keys()
        for k, v in ref.items():
            assert got[k].shape == v.shape, (name, k)
            assert torch.allclose(got[k].float(), v.float(), atol=atol, rtol=0), (name, stage, k,
                                                                                     (got[k] - v).abs().max())
        if sub == "policy":  # the LoRA's B matrices start at 0: the runs' difference is small next to the training
            moved = max(v.abs().max().item() for k, v in ref.items() if "lora_B" in k)
            diff = max((got[k] - v).abs().max().item() for k, v in ref.items() if "lora_B" in k)
            assert diff < 0.01 * moved, (name, stage, diff, moved)


def test_bf16_under_zero3(runs):
    "DeepSpeed casts the trained module to bf16: every stage still runs, saves bf16 weights and follows fp32 closely."
    for stage, sub in (("sft", "model"), ("ppo", "policy"), ("dpo", "policy")):
        w = _weights(runs["zero3_bf16"] / stage / sub)
        assert w and all(v.dtype == torch.bfloat16 for v in w.values()), stage
    for stage in ("sft", "dpo"):
        last = lambda n: json.loads((runs[n] / stage / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
        assert math.isfinite(last("zero3_bf16")) and abs(last("zero3_bf16") - last("zero3")) < 0.02, stage
    assert json.loads((runs["zero3_bf16"] / "reward" / "eval.json").read_text())["n"] == 4


def test_resume_under_deepspeed(runs):
    for name in runs:
        a, b = _weights(runs[name] / "sft" / "model"), _weights(runs[name] / "sft_resumed" / "model")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def test_zero3_generation_gathers_once(runs):
    r = json.loads((runs["zero3"] / "report.json").read_text())
    assert r["zero_stage"] == 3
    assert r["fetches_32"] > 4 * r["fetches_4"] > 0  # with DeepSpeed's hooks every token fetches every layer again
    assert r["fetches_gathered_32"] == 0  # gathered once for the block: no per-module fetches at all
    assert r["fetches_after"] == r["fetches_32"] and r["same_tokens"]  # the hooks are back, the tokens the same
    print(json.dumps(r))  # (-s shows the fetch counts and sampling seconds)
