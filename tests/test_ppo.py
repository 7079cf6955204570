"""PPO pieces against hand-computed cases, and the loop on a tiny model: what moves, ratio 1, resume, bad input."""
from __future__ import annotations

import json
import math
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

from vlm_rlaif.encoder import FeatureCache
from vlm_rlaif.model import LoraSettings, VideoLMM
from vlm_rlaif.ppo import (KLController, PPOConfig, ValueHead, compute_advantages, gae, kl_estimate, load_policy,
                           place_scores, policy_loss, rm_prompt_ids, score_penalties, shape_rewards, train_ppo,
                           truncate_at_eos, value_loss, whiten)
from conftest import rl_world

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# ---------------------------------------------------------------- pure pieces
def gae_reference(rewards, values, lengths, gamma, lam):
    "Per-row textbook GAE with Python loops over each response's real tokens only."
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    for b in range(B):
        n, last = int(lengths[b]), 0.0
        for t in reversed(range(n)):
            nv = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * nv - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = adv + values * (torch.arange(T)[None] < lengths[:, None])
    return adv, ret


def test_gae_hand_cases():
    R = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    V = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 9.0]])
    M = torch.tensor([[1, 1, 1], [1, 1, 0]])
    A, Ret = gae(R, V, M, 1.0, 1.0)
    torch.testing.assert_close(Ret, torch.tensor([[1.0, 1, 1], [2, 2, 0]]))
    torch.testing.assert_close(A, torch.tensor([[0.5, 0.5, 0.5], [1, 1, 0]]))
    torch.testing.assert_close(gae(R, V, M, 0.5, 1.0)[1], torch.tensor([[0.25, 0.5, 1], [1, 2, 0]]))
    torch.testing.assert_close(gae(R, V, M, 1.0, 0.0)[0], torch.tensor([[0.0, 0, 0.5], [0, 1, 0]]))
    # gamma = 0.9, lambda = 0.5: delta = [0.45 - 0.5, 0.45 - 0.5, 1 - 0.5]; A2 = 0.5, A1 = -0.05 + 0.45 A2, A0 = -0.05 + 0.45 A1
    A, _ = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 0.9, 0.5)
    torch.testing.assert_close(A, torch.tensor([[-0.05 + 0.45 * 0.175, 0.175, 0.5]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_reference(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 4, 7, 7, 3])
    R, V = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    M = (torch.arange(7)[None] < lengths[:, None]).long()
    A, Ret = gae(R, V, M, gamma, lam)
    A2, Ret2 = gae_reference(R, V, lengths, gamma, lam)
    torch.testing.assert_close(A, A2); torch.testing.assert_close(Ret, Ret2)


def test_whiten():
    M = torch.tensor([[1, 1, 1], [1, 1, 0]])
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 1e6]])
    w = whiten(x, M)
    vals = w[M.bool()]
    assert abs(vals.mean()) < 1e-6 and abs(vals.std() - 1) < 1e-4 and w[1, 2] == 0  # the masked 1e6 is ignored
    w2 = whiten(x, M, shift_mean=False)
    torch.testing.assert_close(w2[M.bool()].mean(), torch.tensor(3.0))


def test_policy_loss_hand():
    lp0, m = torch.tensor([[-1.0, -2.0]]), torch.ones(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    loss, st = policy_loss(lp0, lp0, adv, m)
    assert loss.item() == 0.0 and st["clipfrac"] == 0 and st["ratio"] == 1 and st["approxkl"] == 0
    # ratios 1.5 (A>0) and 0.5 (A<0): both clipped, to 1.2 and 0.8 -> losses -1.2, 0.8
    new = lp0 + torch.log(torch.tensor([[1.5, 0.5]]))
    loss, st = policy_loss(new, lp0, adv, m)
    assert math.isclose(loss.item(), (-1.2 + 0.8) / 2, rel_tol=1e-5) and st["clipfrac"] == 1
    torch.testing.assert_close(st["approxkl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2 * torch.ones(()))
    # ratio 0.5 with A>0 is not clipped (the min of the two surrogates is the unclipped one)
    loss, st = policy_loss(lp0 + math.log(0.5), lp0, torch.ones(1, 2), m)
    assert math.isclose(loss.item(), -0.5, rel_tol=1e-5) and st["clipfrac"] == 0
    # masked positions do not count
    loss, _ = policy_loss(new, lp0, adv, torch.tensor([[1.0, 0.0]]))
    assert math.isclose(loss.item(), -1.2, rel_tol=1e-5)
    # gradient flows through the unclipped branch only
    x = lp0.clone().requires_grad_(True)
    policy_loss(x + torch.log(torch.tensor([[1.1, 1.5]])), lp0, torch.ones(1, 2), m)[0].backward()
    assert x.grad[0, 0] != 0 and x.grad[0, 1] == 0


def test_value_loss_hand():
    one = torch.ones(1, 1)
    vl, st = value_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), one, one)
    assert math.isclose(vl.item(), 0.5 * 0.64, rel_tol=1e-5) and st["clipfrac"] == 1  # clipped to 0.2: (0.8)^2
    vl, st = value_loss(torch.tensor([[0.1]]), torch.tensor([[0.0]]), one, one)
    assert math.isclose(vl.item(), 0.5 * 0.81, rel_tol=1e-5) and st["clipfrac"] == 0
    # moving away from the return beyond the clip: the unclipped (larger) error wins
    vl, _ = value_loss(torch.tensor([[-0.5]]), torch.tensor([[0.0]]), one, one)
    assert math.isclose(vl.item(), 0.5 * 2.25, rel_tol=1e-5)


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k1_clamp"), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.tensor([math.exp(-0.5) - 0.5, math.e - 2.0]))
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    torch.manual_seed(0)
    p = torch.distributions.Categorical(logits=torch.randn(6))
    q = torch.distributions.Categorical(logits=torch.randn(6))
    x = p.sample((100_000,))
    true = torch.distributions.kl_divergence(p, q).item()
    for k in ("k1", "k3"):
        assert abs(kl_estimate(p.log_prob(x), q.log_prob(x), k).mean().item() - true) < 0.03
    assert kl_estimate(p.log_prob(x), q.log_prob(x), "k1_clamp").mean().item() > true + 0.03  # biased up
    with pytest.raises(ValueError, match="k2"): kl_estimate(lp, ref, "k2")


def test_kl_controller():
    assert KLController(0.1).update(50.0, 256) == 0.1
    k = KLController(0.1, adaptive=True, target=6.0, horizon=1000)
    assert math.isclose(k.update(60.0, 100), 0.1 * 1.02)  # error clipped at +20%
    assert math.isclose(k.update(6.0, 100), 0.1 * 1.02)  # on target: unchanged


def test_truncate_at_eos():
    r = torch.tensor([[5, 6, 2, 7, 2], [2, 9, 9, 9, 9], [5, 6, 7, 8, 9]])
    c = truncate_at_eos(r, eos_token_id=2, pad_token_id=0)
    assert c["responses"].tolist() == [[5, 6, 2, 0, 0], [2, 0, 0, 0, 0], [5, 6, 7, 8, 9]]
    assert c["lengths"].tolist() == [3, 1, 5] and c["has_eos"].tolist() == [True, True, False]


def test_reward_placement_with_and_without_eos():
    # row 0 stops at EOS after 3 tokens of a 5-slot window; row 1 runs out of tokens (no EOS)
    resp = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9]])
    c = truncate_at_eos(resp, 2, 0)
    scores = score_penalties(torch.tensor([1.5, 3.0]), c["lengths"], c["has_eos"], max_new_tokens=5,
                             no_eos_penalty=-8.0, no_eos_mode="replace", length_coef=-10.0)
    torch.testing.assert_close(scores, torch.tensor([1.5 - 6.0, -8.0 - 10.0]))
    torch.testing.assert_close(score_penalties(torch.tensor([3.0]), torch.tensor([5]), torch.tensor([False]), 5,
                                               -8.0, "add"), torch.tensor([-5.0]))
    assert place_scores(torch.tensor([1.0, 2.0]), c["mask"]).tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 0, 2]]
    assert place_scores(torch.tensor([1.0, 2.0]), c["mask"], "last_slot").tolist() == [[0, 0, 0, 0, 1], [0, 0, 0, 0, 2]]
    kl = torch.full((2, 5), 0.5)
    sr = shape_rewards(torch.tensor([1.0, 2.0]), kl, c["mask"], 0.1)
    torch.testing.assert_close(sr["rewards"], torch.tensor([[-0.05, -0.05, 0.95, 0, 0], [-0.05] * 4 + [1.95]]))


def fake_rollout(lengths, T, scores, logp=None, ref_logp=None, values=None):
    B = len(lengths)
    lengths = torch.tensor(lengths)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    z = torch.zeros(B, T)
    return dict(mask=mask, lengths=lengths, has_eos=lengths < T, scores=torch.tensor(scores, dtype=torch.float32),
                logp=z if logp is None else logp, ref_logp=z if ref_logp is None else ref_logp,
                values=z if values is None else values)


def test_compute_advantages_placements():
    roll = fake_rollout([2, 4], 4, [1.0, 2.0])
    base = dict(no_eos_penalty=None, length_coef=0.0, reward_scale=1.0, whiten_advantages=False)
    a = compute_advantages(roll, PPOConfig(**base), kl_coef=0.1)
    # no KL, V = 0, gamma = 1: every real token's return is its response's score; nothing after the end
    torch.testing.assert_close(a["returns"], torch.tensor([[1.0, 1, 0, 0], [2, 2, 2, 2]]))
    # the original's last slot: with gamma = 1 the same returns on real tokens, but the pads are trained on too
    b = compute_advantages(roll, PPOConfig(**base, score_placement="last_slot"), kl_coef=0.1)
    torch.testing.assert_close(b["returns"], torch.tensor([[1.0, 1, 1, 1], [2, 2, 2, 2]]))
    assert b["train_mask"].all()
    # with gamma < 1 the padding discounts the score of the shorter response
    c = compute_advantages(roll, PPOConfig(**base, gamma=0.5), kl_coef=0.1)
    d = compute_advantages(roll, PPOConfig(**base, gamma=0.5, score_placement="last_slot"), kl_coef=0.1)
    torch.testing.assert_close(c["returns"][0, :2], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(d["returns"][0, :2], torch.tensor([0.125, 0.25]))
    # the paper's x10 and the k1 clamp: a negative log-ratio is not penalised
    roll = fake_rollout([2], 2, [1.0], logp=torch.tensor([[-1.0, -3.0]]), ref_logp=torch.tensor([[-2.0, -1.0]]))
    e = compute_advantages(roll, PPOConfig(no_eos_penalty=None, length_coef=0.0, whiten_advantages=False), 0.1)
    torch.testing.assert_close(e["kl"], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(e["rewards"], torch.tensor([[-1.0, 10.0]]))


def test_config_from_dict():
    assert PPOConfig.from_dict({"kl_estimator": "k3", "gamma": 0.99}).gamma == 0.99
    with pytest.raises(ValueError, match="kl_coeff"): PPOConfig.from_dict({"kl_coeff": 0.2})
    with pytest.raises(ValueError, match="score_placement"): PPOConfig(score_placement="eos")
    with pytest.raises(ValueError, match="no_eos_mode"): PPOConfig(no_eos_mode="zero")
    d = PPOConfig()
    assert (d.temperature, d.rollout_batch_size, d.max_new_tokens, d.no_eos_penalty, d.length_coef, d.kl_coef,
            d.kl_estimator, d.reward_scale, d.gamma, d.lam, d.cliprange, d.cliprange_value, d.vf_coef, d.ppo_epochs,
            d.lr, d.lr_scheduler, d.max_grad_norm) == (1.0, 256, 896, -8.0, -10.0, 0.1, "k1_clamp", 10.0, 1.0, 1.0,
                                                       0.2, 0.2, 0.1, 2, 3e-5, "cosine", 1.0)


# ---------------------------------------------------------------- the loop on a tiny model
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return rl_world(tmp_path_factory.mktemp("ppo"))


def ppo_cfg(world, **kw):
    return PPOConfig.from_dict({**dict(
        sft_model_dir=str(world["root"] / "sft"), reward_model_dir=str(world["root"] / "rm" / "model"),
        prompts=str(world["data"] / "train_sft.json"), features_dir=str(world["root"] / "features"),
        data_root=str(world["data"]), encoder=world["enc"].to_dict(), lora=dict(r=4, alpha=8, dropout=0.0),
        num_steps=1, rollout_batch_size=4, generation_batch_size=4, minibatch_size=2, max_new_tokens=8,
        max_prompt_length=512, length_coef=0.0, no_eos_penalty=None, lr=1e-3, value_lr=1e-2, save_every=1, progress=False), **kw})


def test_one_step_changes_only_lora_and_value_head(world, tmp_path):
    from vlm_rlaif.reward import RewardModel
    pol = load_policy(world["root"] / "sft", LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=False))
    rm = RewardModel.from_pretrained(world["root"] / "rm" / "model")
    p0 = {n: p.detach().clone() for n, p in pol.named_parameters()}
    r0 = {n: p.detach().clone() for n, p in rm.named_parameters()}
    # (no_eos_penalty=None: an untrained model rarely stops within 8 tokens; with the -8 penalty every response
    # would score -8, all advantages would whiten to 0 and the policy could not move)
    out = train_ppo(ppo_cfg(world), tmp_path / "ppo", policy=pol, reward_model=rm)
    changed = {n for n, p in pol.named_parameters() if not torch.equal(p, p0[n])}
    assert changed and all("lora_" in n for n in changed), changed
    assert any("lora_B" in n for n in changed)
    assert all(torch.equal(p, r0[n]) for n, p in rm.named_parameters())  # the RM (and value backbone) is frozen
    vh = load_file(out / "value_head.safetensors")
    assert vh["linear.weight"].abs().sum() > 0  # the zero-initialised value head moved
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert abs(rows[0]["val/ratio_first"] - 1.0) < 1e-5  # nothing changed before the first minibatch
    assert rows[0]["policy/num_updates"] == 4  # 4 rollouts / minibatches of 2, 2 epochs
    assert rows[0]["objective/kl"] == 0.0  # policy == reference during the first rollout
    for k in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/approxkl_avg",
              "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio", "val/response_length",
              "val/eos_fraction"):
        assert k in rows[0] and math.isfinite(rows[0][k]), k
    assert (out / "done.json").exists() and any((out / "tb").iterdir())
    # the saved policy is the SFT weights + the PPO LoRA, loadable as a VideoLMM, with the trained adapter
    m = VideoLMM.from_pretrained(out / "policy")
    sd = dict(m.named_parameters())
    for n, p in pol.named_parameters():
        if "lora_B" in n: torch.testing.assert_close(sd[n], p.detach())
    assert train_ppo(ppo_cfg(world), tmp_path / "ppo") == out  # done: returns at once


def test_resume_matches_uninterrupted(world, tmp_path):
    cfg = ppo_cfg(world, num_steps=2, save_every=1, keep_checkpoints=3)
    full = train_ppo(cfg, tmp_path / "full")
    part = tmp_path / "part"
    shutil.copytree(full, part)
    for p in ("done.json", "value_head.safetensors"): (part / p).unlink()
    shutil.rmtree(part / "policy"); shutil.rmtree(part / "checkpoints" / "step_000002")
    train_ppo(cfg, part)  # resumes after step 1
    a, b = load_file(full / "value_head.safetensors"), load_file(part / "value_head.safetensors")
    torch.testing.assert_close(a, b)
    la = {n: p for n, p in VideoLMM.from_pretrained(full / "policy").named_parameters() if "lora_" in n}
    lb = {n: p for n, p in VideoLMM.from_pretrained(part / "policy").named_parameters() if "lora_" in n}
    for n in la: torch.testing.assert_close(la[n], lb[n])
    steps = [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_bad_input(world, tmp_path):
    with pytest.raises(KeyError, match="context"):
        rm_prompt_ids(None, "ctx: {context}", [{"id": "x", "conversations": []}], use_context=True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "a", "video": "videos/none.mp4",
                                "conversations": [{"from": "human", "value": "no image token"}]}]))
    with pytest.raises(ValueError, match="bad.json"):
        train_ppo(ppo_cfg(world, prompts=str(bad)), tmp_path / "ppo")
    with pytest.raises(ValueError, match="projector"):
        load_policy(world["root"] / "sft", LoraSettings(train_projector=True))


def test_reward_fn_replaces_scores_and_monitor_is_logged(world, tmp_path):
    seen = []
    def reward_fn(recs, texts):
        seen.append((len(recs), len(texts)))
        return [float(len(t.split())) for t in texts]  # any per-answer score
    out = train_ppo(ppo_cfg(world), tmp_path / "ppo", reward_fn=reward_fn, monitor_fn=lambda r, t: [1.0] * len(t))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert seen == [(4, 4)] and row["objective/monitor"] == 1.0 and "objective/rm_scores" in row
    assert row["objective/scores"] >= 0 and row["objective/scores"] != row["objective/rm_scores"]  # word counts


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_the_sampling_distribution(world, temperature):
    "The log-prob PPO gives a sampled answer is the one `generate` sampled it with (`<image>` suppressed)."
    from vlm_rlaif.data import Collator, PromptDataset, load_records
    from vlm_rlaif.ppo import response_logprobs
    pol = load_policy(world["root"] / "sft", LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=False))
    ds = PromptDataset(load_records(world["data"] / "train_sft.json", "rl")[:3], pol.tokenizer,
                       FeatureCache(world["root"] / "features", world["enc"]), root=world["data"], max_length=512)
    b = Collator(pol.tokenizer.pad_token_id, padding_side="left")([ds[i] for i in range(3)])
    torch.manual_seed(0)
    g = pol.generate(b["input_ids"], b["attention_mask"], b["video_feats"], max_new_tokens=6, do_sample=True,
                     temperature=temperature, top_k=0, return_dict_in_generate=True, output_scores=True)
    cut = truncate_at_eos(g.sequences, pol.tokenizer.eos_token_id, pol.tokenizer.pad_token_id)
    scores = torch.stack(g.scores, 1).float()  # the processed logits it sampled from: [B, R, V]
    ref = scores.log_softmax(-1).gather(-1, g.sequences[..., None]).squeeze(-1)
    assert torch.isinf(scores[..., pol.image_token_id]).all()
    with torch.no_grad():
        lp, ent = response_logprobs(pol, b["input_ids"], b["attention_mask"], b["video_feats"], cut["responses"],
                                    cut["mask"], temperature=temperature, with_entropy=True)
    m = cut["mask"].bool()
    torch.testing.assert_close(lp[m], ref[m], atol=2e-5, rtol=0)
    p = scores.softmax(-1)
    torch.testing.assert_close(ent[m], -(p * p.clamp(min=1e-30).log()).sum(-1)[m], atol=1e-4, rtol=0)
    assert torch.isfinite(ent).all()


def test_no_eos_modes_and_the_paper_config():
    "A truncated answer: `replace` scores exactly the penalty, `add` (the paper's run) adds it; paper_7b.yaml adds."
    from pathlib import Path
    from vlm_rlaif.pipeline import load_config
    roll = fake_rollout([2, 4, 4], 4, [1.5, 3.0, -1.0])  # rows 1 and 2 ran out of tokens (no EOS)
    base = dict(no_eos_penalty=-8.0, length_coef=0.0, reward_scale=1.0, whiten_advantages=False)
    rep = compute_advantages(roll, PPOConfig(**base, no_eos_mode="replace"), kl_coef=0.1)["penalized_scores"]
    add = compute_advantages(roll, PPOConfig(**base, no_eos_mode="add"), kl_coef=0.1)["penalized_scores"]
    torch.testing.assert_close(rep, torch.tensor([1.5, -8.0, -8.0]))
    torch.testing.assert_close(add, torch.tensor([1.5, -5.0, -9.0]))
    assert PPOConfig().no_eos_mode == "replace"  # the dataclass default (the original code's default)
    paper = load_config(Path(__file__).parents[1] / "configs" / "paper_7b.yaml")
    ppo = PPOConfig.from_dict(paper.ppo)
    assert (ppo.no_eos_penalty, ppo.no_eos_mode) == (-8.0, "add")  # --relative_stop_token_penalty True


def _first_minibatch_ratio(world, mixed_precision, autocast=True):
    "Max |ratio - 1| on the first PPO minibatch, rollouts and update under `Accelerator(cpu=True, mixed_precision)`."
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from vlm_rlaif.data import Collator, PromptDataset, load_records
    from vlm_rlaif.ppo import PolicyWithValue, make_rollouts, ppo_update
    from vlm_rlaif.reward import RewardModel
    AcceleratorState._reset_state(reset_partial_state=False); GradientState._reset_state()
    acc = Accelerator(cpu=True, mixed_precision=mixed_precision)
    cfg = ppo_cfg(world, rollout_batch_size=4, generation_batch_size=3, minibatch_size=2, ppo_epochs=1)
    pol = load_policy(world["root"] / "sft", LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=False))
    rm = RewardModel.from_pretrained(world["root"] / "rm" / "model").requires_grad_(False).eval()
    ds = PromptDataset(load_records(cfg.prompts, "rl")[:4], pol.tokenizer, FeatureCache(cfg.features_dir, world["enc"]),
                       root=world["data"], max_length=512)
    vh = ValueHead(rm.config.hidden_size)
    opt = torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad] + list(vh.parameters()), lr=1e-3)
    model, opt = acc.prepare(PolicyWithValue(pol, vh), opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(0)
    batch = Collator(pol.tokenizer.pad_token_id, padding_side="left")([ds[i] for i in range(4)])
    roll = make_rollouts(pol, rm, vh, batch, [[] for _ in range(4)], cfg,
                         autocast=acc.autocast if autocast else __import__("contextlib").nullcontext)
    stats = ppo_update(model, opt, sched, acc, roll, compute_advantages(roll, cfg, 0.1), cfg)
    assert len(stats) == 2
    return float(stats[0]["val/ratio_maxdev"])


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_first_minibatch_ratio_is_one(world, mixed_precision):
    "Old log-probs come from the same computation (autocast included) as the update's: ratio 1 before any step."
    assert _first_minibatch_ratio(world, mixed_precision) < 1e-6
    if mixed_precision == "bf16":  # the bug this pins: rollout log-probs in fp32, the update under bf16 autocast
        assert _first_minibatch_ratio(world, "bf16", autocast=False) > 1e-5


def test_batch_sizes_are_global():
    from vlm_rlaif.ppo import batch_sizes
    cfg = PPOConfig(rollout_batch_size=256, minibatch_size=128)
    assert batch_sizes(cfg, 1) == (256, 128) and batch_sizes(cfg, 8) == (32, 16)
    with pytest.raises(ValueError, match="minibatch_size=128 is not divisible"):
        batch_sizes(PPOConfig(rollout_batch_size=384, minibatch_size=128), 3)
    with pytest.raises(ValueError, match="rollout_batch_size=256 is not divisible"): batch_sizes(PPOConfig(minibatch_size=2), 3)
    with pytest.raises(ValueError, match="multiple of minibatch_size"): batch_sizes(PPOConfig(minibatch_size=96), 1)
