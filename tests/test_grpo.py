"""GRPO / RLOO (08c_grpo): group advantages against hand cases, KL modes, ratio 1, resume, 2 processes, bad config."""
from __future__ import annotations

import json
import math
import os
import shutil
import textwrap

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from conftest import launch_two_processes, rl_world
from vlm_rlaif.grpo import (GRPOConfig, grpo_batch_sizes, grpo_loss, group_advantages, sequence_rewards,
                            train_grpo)
from vlm_rlaif.model import LoraSettings, VideoLMM
from vlm_rlaif.ppo import load_policy

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# ---------------------------------------------------------------- pure pieces
def test_grpo_advantages_hand_case():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 4.0, 6.0, 8.0])
    a = group_advantages(r, 4, "grpo")
    s = math.sqrt(0.5 / 3)  # unbiased std of (1, 0, .5, .5)
    torch.testing.assert_close(a[:4], torch.tensor([0.5 / s, -0.5 / s, 0, 0]), atol=1e-3, rtol=0)
    g = r[4:]
    torch.testing.assert_close(a[4:], (g - g.mean()) / (g.std() + 1e-4))
    torch.testing.assert_close(a.view(2, 4).mean(1), torch.zeros(2), atol=1e-6, rtol=0)  # zero mean per group
    torch.testing.assert_close(group_advantages(r, 4, "grpo", scale_std=False)[:4], torch.tensor([0.5, -0.5, 0, 0]))


def test_rloo_is_leave_one_out():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(15, generator=g)
    a = group_advantages(r, 5, "rloo")
    for k in range(3):
        grp = r[5 * k:5 * k + 5]
        ref = torch.stack([grp[i] - (grp.sum() - grp[i]) / 4 for i in range(5)])
        torch.testing.assert_close(a[5 * k:5 * k + 5], ref)
    # G = 2: each answer's baseline is the other one
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0]), 2, "rloo"), torch.tensor([2.0, -2.0]))


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_identical_rewards_give_zero_advantage(kind):
    r = torch.tensor([0.1, 0.1, 0.1, 1 / 3, 1 / 3, 1 / 3, 5.0, 5.0, 5.0])  # values whose mean rounds
    a = group_advantages(r, 3, kind)
    assert a.tolist() == [0.0] * 9
    mixed = group_advantages(torch.tensor([0.1, 0.1, 0.2, 7.0, 7.0, 7.0]), 3, kind)
    assert mixed[:3].abs().sum() > 0 and mixed[3:].tolist() == [0.0] * 3


def _roll(scores, lengths, T=5, dlogp=0.2):
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    return dict(scores=torch.tensor(scores), lengths=torch.tensor(lengths), has_eos=torch.ones(len(scores), dtype=torch.bool),
                mask=mask, logp=torch.full(mask.shape, -1.0), ref_logp=torch.full(mask.shape, -1.0 - dlogp))


@pytest.mark.parametrize("est", ["k1", "k1_clamp", "k3"])
def test_kl_in_reward_vs_in_loss(est):
    roll = _roll([1.0, 1.0, 0.0, 2.0], [2, 5, 3, 3])
    kw = dict(group_size=2, length_coef=0.0, no_eos_penalty=None, kl_estimator=est)
    k_tok = {"k1": 0.2, "k1_clamp": 0.2, "k3": math.exp(-0.2) - 1 + 0.2}[est]
    rew = sequence_rewards(roll, GRPOConfig(**kw, kl_in="reward"), 0.5)
    torch.testing.assert_close(rew["rewards"], torch.tensor([1 - 0.5 * 2 * k_tok, 1 - 0.5 * 5 * k_tok, 0 - 1.5 * k_tok,
                                                             2 - 1.5 * k_tok]))
    assert rew["seq_advantages"][0] > 0 > rew["seq_advantages"][1]  # the longer answer paid more KL
    los = sequence_rewards(roll, GRPOConfig(**kw, kl_in="loss"), 0.5)
    torch.testing.assert_close(los["rewards"], torch.tensor([1.0, 1.0, 0.0, 2.0]))
    assert los["seq_advantages"][:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(los["advantages"], los["seq_advantages"][:, None] * roll["mask"].float())
    # in the loss: + kl_coef x mean token KL of the current log-probs; with KL in the reward: no such term
    lp = roll["logp"].clone().requires_grad_(True)
    adv = torch.zeros_like(lp)
    l_loss, st = grpo_loss(lp, roll["logp"], roll["ref_logp"], adv, roll["mask"], GRPOConfig(**kw, kl_in="loss"), 0.5)
    l_rew, _ = grpo_loss(lp, roll["logp"], roll["ref_logp"], adv, roll["mask"], GRPOConfig(**kw, kl_in="reward"), 0.5)
    assert abs(float(st["kl"]) - k_tok) < 1e-6
    assert abs(float(l_loss - l_rew) - 0.5 * k_tok) < 1e-6 and float(l_rew) == 0.0


def test_bad_config():
    with pytest.raises(ValueError, match="mean of the other G-1"):
        GRPOConfig(advantage="rloo", group_size=1)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(advantage="grpo", group_size=1)
    with pytest.raises(ValueError, match="advantage"):
        GRPOConfig(advantage="ppo")
    with pytest.raises(ValueError, match="kl_in"):
        GRPOConfig(kl_in="both")
    with pytest.raises(ValueError, match="kl_estimator"):
        GRPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        GRPOConfig(rollout_batch_size=10, group_size=4)
    with pytest.raises(ValueError, match="unknown keys"):
        GRPOConfig.from_dict({"vf_coef": 0.1})
    with pytest.raises(ValueError, match="each prompt's group stays in one process"):
        grpo_batch_sizes(GRPOConfig(rollout_batch_size=12, group_size=4, minibatch_size=3), 2)
    assert grpo_batch_sizes(GRPOConfig(rollout_batch_size=16, group_size=4, minibatch_size=4), 2) == (2, 8, 2)
    with pytest.raises(ValueError, match="minibatch_size=3 is not divisible"):
        grpo_batch_sizes(GRPOConfig(rollout_batch_size=24, group_size=4, minibatch_size=3), 2)


def test_pipeline_sections(tmp_path):
    "The grpo stage is registered, off in toy.yaml's stages, and a run directory made before it stays resumable."
    from pathlib import Path
    import yaml
    from vlm_rlaif.pipeline import STAGES, check_config, check_run_config, load_config
    root = Path(__file__).parents[1] / "configs"
    toy = load_config(root / "toy.yaml")
    assert "grpo" in STAGES and "grpo" not in toy.stages
    assert check_config(toy)["grpo"].group_size == 4
    old = toy.to_dict(); old.pop("grpo")  # config.yaml of a run made before the grpo section existed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert check_run_config(toy, tmp_path) is True  # not an error; config.yaml gets the new section
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(toy.to_dict(), sort_keys=False))
    with pytest.raises(ValueError, match="grpo.group_size"):
        check_run_config(load_config(root / "toy.yaml", ["grpo.group_size=8"]), tmp_path)
    with pytest.raises(ValueError, match="`grpo`"):
        check_config(load_config(root / "toy.yaml", ["grpo.group_size=1"]))


# ---------------------------------------------------------------- the loop on a tiny model
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return rl_world(tmp_path_factory.mktemp("grpo"))


def grpo_cfg(world, **kw):
    return GRPOConfig.from_dict({**dict(
        sft_model_dir=str(world["root"] / "sft"), reward_model_dir=str(world["root"] / "rm" / "model"),
        prompts=str(world["data"] / "train_sft.json"), features_dir=str(world["root"] / "features"),
        data_root=str(world["data"]), encoder=world["enc"].to_dict(), lora=dict(r=4, alpha=8, dropout=0.0),
        num_steps=1, rollout_batch_size=8, group_size=4, generation_batch_size=8, minibatch_size=4, max_new_tokens=8,
        max_prompt_length=512, length_coef=0.0, no_eos_penalty=None, lr=1e-2, save_every=1, progress=False), **kw})


@pytest.mark.parametrize("advantage,kl_in", [("grpo", "loss"), ("rloo", "reward")])
def test_one_step(world, tmp_path, advantage, kl_in):
    from vlm_rlaif.reward import RewardModel
    pol = load_policy(world["root"] / "sft", LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=False))
    rm = RewardModel.from_pretrained(world["root"] / "rm" / "model")
    p0 = {n: p.detach().clone() for n, p in pol.named_parameters()}
    r0 = {n: p.detach().clone() for n, p in rm.named_parameters()}
    seen = []
    def monitor(recs, texts):
        seen.append([r["id"] for r in recs]); return [0.0] * len(texts)
    out = train_grpo(grpo_cfg(world, advantage=advantage, kl_in=kl_in), tmp_path / "g", policy=pol, reward_model=rm,
                     monitor_fn=monitor)
    changed = {n for n, p in pol.named_parameters() if not torch.equal(p, p0[n])}
    assert changed and all("lora_" in n for n in changed), changed
    assert all(torch.equal(p, r0[n]) for n, p in rm.named_parameters())  # the RM is frozen
    ids = seen[0]  # 2 prompts x 4: each prompt's group is consecutive
    assert len(ids) == 8 and len(set(ids[:4])) == 1 and len(set(ids[4:])) == 1 and ids[0] != ids[4]
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["policy/num_updates"] == 2  # 8 answers / minibatches of 4, 1 epoch
    assert abs(rows[0]["val/ratio_first"] - 1.0) < 1e-5 and rows[0]["val/ratio_first_maxdev"] < 1e-5
    assert rows[0]["objective/kl"] == 0.0
    for k in ("objective/scores", "objective/kl_k3", "group/reward_std", "group/zero_advantage_fraction",
              "loss/policy_avg", "loss/kl_avg", "objective/monitor"):
        assert k in rows[0] and math.isfinite(rows[0][k]), k
    assert not (out / "value_head.safetensors").exists()  # no critic
    m = VideoLMM.from_pretrained(out / "policy")
    sd = dict(m.named_parameters())
    for n, p in pol.named_parameters():
        if "lora_B" in n: torch.testing.assert_close(sd[n], p.detach())
    assert train_grpo(grpo_cfg(world), tmp_path / "g") == out  # done: returns at once


def test_resume_matches_uninterrupted(world, tmp_path):
    cfg = grpo_cfg(world, num_steps=3, save_every=1, keep_checkpoints=5, epochs=2)
    full = train_grpo(cfg, tmp_path / "full")
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "done.json").unlink(); shutil.rmtree(part / "policy")
    for s in ("step_000002", "step_000003"): shutil.rmtree(part / "checkpoints" / s)
    train_grpo(cfg, part)  # resumes after step 1
    la = {n: p for n, p in VideoLMM.from_pretrained(full / "policy").named_parameters() if "lora_" in n}
    lb = {n: p for n, p in VideoLMM.from_pretrained(part / "policy").named_parameters() if "lora_" in n}
    assert any(la[n].abs().sum() > 0 for n in la if "lora_B" in n)
    for n in la: torch.testing.assert_close(la[n], lb[n], atol=1e-5, rtol=1e-4)
    ra = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rb] == [1, 2, 3]
    for a, b in zip(ra, rb):  # the resumed steps sampled the same answers: same scores and KL
        assert abs(a["objective/scores"] - b["objective/scores"]) < 1e-5
        assert abs(a["objective/kl"] - b["objective/kl"]) < 1e-5


SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from vlm_rlaif.model import LoraSettings
    from vlm_rlaif.ppo import load_policy
    from vlm_rlaif.grpo import GRPOConfig, train_grpo
    class SGDInAdamWsPlace(torch.optim.SGD):  # as tests/test_deepspeed.py: runs agree to float noise under SGD
        def __init__(self, params, lr=1e-3, weight_decay=0.0, **kw):
            super().__init__(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    torch.optim.AdamW = SGDInAdamWsPlace
    cfg, out = GRPOConfig.from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2]
    torch.manual_seed(0)  # the same LoRA init in every run (DDP and DeepSpeed runs are compared)
    pol = load_policy(cfg.sft_model_dir, LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=False))
    groups = []
    def monitor(recs, texts):
        groups.append([r["id"] for r in recs]); return [0.0] * len(texts)
    train_grpo(cfg, out, policy=pol, monitor_fn=monitor)
    from accelerate import PartialState
    st = PartialState()
    lora = {n: p.detach().double().sum().item() for n, p in pol.named_parameters() if "lora_" in n}
    with open(os.path.join(out, f"rank{st.process_index}.json"), "w") as f:
        json.dump(dict(num_processes=st.num_processes, lora=lora, groups=groups), f)
''')


@pytest.fixture(scope="module")
def dist_runs(world, tmp_path_factory):
    "The same GRPO run in 2 CPU processes (gloo): plain DDP, DeepSpeed ZeRO-2 and ZeRO-3 (the shipped configs)."
    from pathlib import Path
    root = tmp_path_factory.mktemp("grpo_dist")
    cfg = grpo_cfg(world, num_steps=2, rollout_batch_size=8, group_size=2, generation_batch_size=4, minibatch_size=4,
                   max_new_tokens=6, lr=0.1).to_dict()
    repo, out = Path(__file__).resolve().parents[1], {}
    for name in ("ddp", "zero2", "zero3"):
        work = root / name; work.mkdir()
        ds = None
        if name != "ddp":  # allowing the client optimizer SGD (DeepSpeed refuses it otherwise)
            ds = work / "ds.json"
            ds.write_text(json.dumps({**json.loads((repo / f"configs/deepspeed/{name}.json").read_text()),
                                      "zero_allow_untested_optimizer": True}))
        launch_two_processes(SCRIPT, {**cfg, "deepspeed_config": ds and str(ds)}, work / "out", work, timeout=400)
        out[name] = work / "out"
    return out


def test_two_process_cpu_grpo(dist_runs):
    out = dist_runs["ddp"]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    assert ranks[0]["lora"] == ranks[1]["lora"]  # gradients were averaged: the adapters are identical
    assert any(v != 0 for k, v in ranks[0]["lora"].items() if "lora_B" in k)  # and they trained
    for step in range(2):  # 4 prompts per step: 2 per process, each with its whole group of 2 answers
        a, b = ranks[0]["groups"][step], ranks[1]["groups"][step]
        assert len(a) == len(b) == 4
        for ids in (a, b): assert ids[0] == ids[1] and ids[2] == ids[3]
        assert not set(a) & set(b)  # no prompt is split over the processes
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and abs(rows[0]["val/ratio_first"] - 1) < 1e-5
    assert [r["policy/num_updates"] for r in rows] == [2, 2]  # 4 answers per process / 2 per minibatch share
    assert (out / "policy" / "vlm_config.json").exists() and (out / "done.json").exists()
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_trains_like_ddp(dist_runs, name):
    "Under DeepSpeed ZeRO-2/3 the policy saved (whole tensors) matches plain DDP's to float noise."
    from safetensors.torch import load_file
    w = lambda d: {k: v for f in sorted((d / "policy").rglob("*.safetensors")) for k, v in load_file(f).items()}
    ref, got = w(dist_runs["ddp"]), w(dist_runs[name])
    assert ref and got.keys() == ref.keys()
    moved = max(v.abs().max().item() for k, v in ref.items() if "lora_B" in k)
    diff = max((got[k].float() - v.float()).abs().max().item() for k, v in ref.items())
    assert moved > 0 and diff < 1e-5 and diff < 0.01 * moved, (diff, moved)
    assert (dist_runs[name] / "done.json").exists()
    ck = sorted((dist_runs[name] / "checkpoints").iterdir())[-1]
    assert (ck / "pytorch_model").is_dir()  # a DeepSpeed checkpoint: DeepSpeed really ran
