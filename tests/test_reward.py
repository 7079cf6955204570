"""Reward model: Bradley-Terry loss values, reading the last real token, save/load round trips, toy preference pairs,
and the training stage (finish, rerun, NaN guard, resume)."""
from __future__ import annotations

import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from conftest import launch_two_processes, rewind_run
import torch
from torch import nn

import vlm_rlaif.reward as reward_mod
from vlm_rlaif.data import PairwiseDataset, load_records, save_records
from vlm_rlaif.encoder import FeatureCache, toy_encoder_config
from vlm_rlaif.model import (TOY_LM_CONFIG, LoraSettings, ModelConfig, add_lora, build_model, build_prompt,
                             train_toy_tokenizer, video_question)
from vlm_rlaif.reward import (PAPER_RM_LORA, REWARD_PROMPT, SEED_REWARD_PROMPT, RewardConfig, RewardModel, bt_loss,
                              evaluate_rm, last_token_index, noisy_labels, rm_prompt, toy_preference_records,
                              train_reward)
from vlm_rlaif.training import NonFiniteLossError, read_metrics
from vlm_rlaif.toyworld import ToyWorldConfig, corpus_texts, load_facts, make_dataset, prefer

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
SMALL_LM = dict(TOY_LM_CONFIG, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2)
TINY_LORA = LoraSettings(**{**PAPER_RM_LORA, "r": 4, "alpha": 8})


# ---------------------------------------------------------------- Bradley-Terry loss
@pytest.mark.parametrize("rc,rr,coef,expected,acc", [
    ([0.0], [0.0], 1e-3, math.log(2), 0.5),                                     # -log sigmoid(0) = log 2
    ([1.0, 0.0], [0.0, 0.0], 1e-3, (0.3132617 + 0.6931472) / 2 + 1e-3 * 0.5, 0.75),
    ([2.0, -1.0], [-2.0, 1.0], 0.5, (math.log1p(math.exp(-4)) + math.log1p(math.exp(2))) / 2, 0.5),
    ([3.0], [1.0], 0.1, math.log1p(math.exp(-2)) + 0.1 * 4, 1.0),             # centering 0.1 * |3 + 1|
    ([-1.0, -1.0], [-3.0, -3.0], 1e-3, math.log1p(math.exp(-2)) + 1e-3 * 4, 1.0),  # |mean(r0 + r1)| = 4
    ([0.0], [20.0], 0.0, 20.0 + math.log1p(math.exp(-20)), 0.0),                # large margins stay finite
])
def test_bt_loss_hand_computed(rc, rr, coef, expected, acc):
    loss, m = bt_loss(torch.tensor(rc), torch.tensor(rr), center_coef=coef)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert m["accuracy"] == pytest.approx(acc) and m["loss"] == pytest.approx(expected, abs=1e-5)
    assert m["margin"] == pytest.approx(sum(rc) / len(rc) - sum(rr) / len(rr), abs=1e-6)


def test_bt_loss_gradient_and_bad_shapes():
    rc, rr = torch.tensor([0.0, 1.0], requires_grad=True), torch.tensor([0.0, -1.0], requires_grad=True)
    bt_loss(rc, rr, 0.0)[0].backward()
    # d/d rc of mean(-log sigmoid(rc - rr)) = -(1 - sigmoid(d)) / n
    assert rc.grad.tolist() == pytest.approx([-0.25, -(1 - torch.sigmoid(torch.tensor(2.0)).item()) / 2], abs=1e-6)
    assert (rr.grad == -rc.grad).all()
    with pytest.raises(ValueError, match="same shape"):
        bt_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="1-d"):
        bt_loss(torch.zeros(2, 1), torch.zeros(2, 1))


def test_prompts():
    assert "{context}" in REWARD_PROMPT and "{factual_prompt}" in SEED_REWARD_PROMPT
    assert rm_prompt().endswith("the quality score of my last response is") and "{" not in rm_prompt()
    assert rm_prompt(True).count("{context}") == 1
    with pytest.raises(ValueError, match="context"):
        rm_prompt(True, "seed")
    assert rm_prompt(False, "seed") == SEED_REWARD_PROMPT  # the seed's literal slot is kept


def test_last_token_index():
    m = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(m).tolist() == [1, 3, 3]
    with pytest.raises(ValueError, match="all-zero"):
        last_token_index(torch.tensor([[0, 0]]))


# ---------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def tok():
    texts = ["The red circle moves to the left.", "The blue square stays still.", "What does the circle do?",
             rm_prompt(True)] * 3
    return train_toy_tokenizer(texts, vocab_size=400)


def texts(tok, answers, q="What does the circle do?", side="right"):
    t = [build_prompt([{"from": "human", "value": video_question(q)}, {"from": "gpt", "value": a}]) + rm_prompt()
         for a in answers]
    tok.padding_side = side
    b = tok(t, return_tensors="pt", padding=True)
    tok.padding_side = "right"
    return b.input_ids, b.attention_mask


def randomize(model: RewardModel, seed=1):
    "Non-trivial LoRA (B is zero-initialised) and head weights, so that a round trip is a real test."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or "score_head" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def sft_dir(tmp_path, tok, lora=None, name="sft"):
    torch.manual_seed(0)
    m = build_model(ModelConfig(lm_config=SMALL_LM, encoder=toy_encoder_config(), lora=lora), tok)
    if lora is not None:
        with torch.no_grad():
            for n, p in m.lm.named_parameters():
                if "lora_B" in n: p.normal_(0, 0.1)
    return m.save_pretrained(tmp_path / name)


def test_forward_padding_invariant_and_hidden_states(tmp_path, tok):
    rm = randomize(RewardModel.from_sft(sft_dir(tmp_path, tok), TINY_LORA)).eval()
    feats = torch.randn(3, 16, 64, 64)
    answers = ["The red circle moves to the left.", "It stays still.", "The blue square stays still. The circle too."]
    with torch.no_grad():
        r = rm(*texts(tok, answers), feats)
        rl = rm(*texts(tok, answers, side="left"), feats)
        single = torch.stack([rm(*texts(tok, [a]), feats[i:i + 1])[0] for i, a in enumerate(answers)])
        h, mask = rm.hidden_states(*texts(tok, answers), feats)
    assert r.shape == (3,) and torch.allclose(r, rl, atol=1e-4) and torch.allclose(r, single, atol=1e-4)
    ids, _ = texts(tok, answers)
    assert h.shape == (3, ids.shape[1] - 1 + 16 + 64, 64) and mask.shape == h.shape[:2]
    # a value head on the same backbone (what PPO does): per-token values over the expanded sequence
    values = nn.Linear(64, 1)(h).squeeze(-1)
    assert values.shape == mask.shape
    # only LoRA and the head train (the paper's RM), the projector is frozen
    rm.set_trainable(True)
    names = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n or n.startswith("score_head") for n in names)
    assert any(n.startswith("score_head") for n in names)


def test_save_load_round_trip_lora(tmp_path, tok):
    rm = randomize(RewardModel.from_sft(sft_dir(tmp_path, tok), TINY_LORA)).eval()
    ids, mask = texts(tok, ["The red circle moves to the left.", "It stays still."])
    feats = torch.randn(2, 16, 64, 64)
    with torch.no_grad(): before = rm(ids, mask, feats)
    d = rm.save_pretrained(tmp_path / "rm")
    assert (d / "reward_config.json").exists() and (d / "score_head.safetensors").exists()
    assert (d / "backbone" / "vlm_config.json").exists() and (d / "backbone" / "adapter").is_dir()
    loaded = RewardModel.from_pretrained(d)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad(): after = loaded(ids, mask, feats)
    assert torch.allclose(before, after, atol=1e-5), (before, after)
    tr = RewardModel.from_pretrained(d, trainable=True)
    assert tr.training and tr.score_head.weight.requires_grad
    assert any(p.requires_grad for n, p in tr.named_parameters() if "lora_" in n)
    # saving again over the same directory replaces it atomically
    rm.save_pretrained(tmp_path / "rm")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rm")]


def test_from_sft_merges_sft_adapter_and_full_lm(tmp_path, tok):
    sft_lora = LoraSettings(r=4, alpha=8, train_projector=True)
    d = sft_dir(tmp_path, tok, lora=sft_lora, name="sft_lora")
    rm = RewardModel.from_sft(d, None)  # no RM LoRA: the whole (merged) LM trains
    assert rm.backbone.cfg.lora is None and rm.save_base
    assert all(p.requires_grad for p in rm.backbone.lm.parameters())
    randomize(rm)
    ids, mask = texts(tok, ["The red circle moves to the left."])
    feats = torch.randn(1, 16, 64, 64)
    with torch.no_grad(): before = rm.eval()(ids, mask, feats)
    with torch.no_grad(): after = RewardModel.from_pretrained(rm.save_pretrained(tmp_path / "rm2"))(ids, mask, feats)
    assert torch.allclose(before, after, atol=1e-5)


def test_bad_directories_and_corrupted_head(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="not a RewardModel"):
        RewardModel.from_pretrained(tmp_path)
    (tmp_path / "x").mkdir(); (tmp_path / "x" / "reward_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="unreadable"):
        RewardModel.from_pretrained(tmp_path / "x")
    rm = RewardModel.from_sft(sft_dir(tmp_path, tok), TINY_LORA)
    with torch.no_grad(): rm.score_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        rm.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_config():
    c = RewardConfig()
    assert (c.lora.r, c.lora.alpha, c.lr, c.epochs, c.val_size, c.center_coef) == (64, 16, 2e-5, 1, 500, 1e-3)
    assert set(c.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert RewardConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown keys"):
        RewardConfig.from_dict({"learning_rate": 1e-5})
    with pytest.raises(ValueError, match="batch_size"):
        RewardConfig(batch_size=0)


# ---------------------------------------------------------------- toy data and training
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("rmtoy")
    world = make_dataset(ToyWorldConfig(n_videos=12, seed=0), root / "toy", progress=False)
    enc = toy_encoder_config()
    FeatureCache(root / "feats", enc, num_workers=1).precompute(
        sorted(str(p) for p in (world / "videos").glob("*.mp4")), progress=False)
    train = toy_preference_records(world, "train", 24, seed=0)
    val = toy_preference_records(world, "val", 8, seed=1)
    save_records(train, root / "rm_train.json"); save_records(val, root / "rm_val.json")
    tok = train_toy_tokenizer(corpus_texts(world) + [rm_prompt(True)] * 3, vocab_size=600)
    torch.manual_seed(0)
    build_model(ModelConfig(lm_config=SMALL_LM, encoder=enc, lora=None), tok).save_pretrained(root / "sft")
    return dict(root=root, world=world, enc=enc, train=train, val=val)


def test_toy_preference_records(toy):
    facts = load_facts(toy["world"])
    recs = load_records(toy["root"] / "rm_train.json", "rm")  # a valid RM file
    assert len(recs) == 24 and {r["preference"] for r in recs} == {1, 2}
    for r in recs:
        assert prefer(facts[r["video_id"]], r, r["output_1"]["value"], r["output_2"]["value"]) == r["preference"]
        better = r["quality_1"] > r["quality_2"]
        assert better == (r["preference"] == 1) and r["context"]
    assert toy_preference_records(toy["world"], "train", 24, seed=0) == toy["train"]  # deterministic
    flipped = noisy_labels(recs, 1.0)
    assert all(f["preference"] == 3 - r["preference"] == 3 - f["truth_preference"] for f, r in zip(flipped, recs))
    with pytest.raises(ValueError, match="could only make"):
        toy_preference_records(toy["world"], "val", 300)
    with pytest.raises(FileNotFoundError, match="make the toy world"):
        toy_preference_records(toy["root"], "train", 2)


def test_context_reaches_the_sequence(toy):
    tok = RewardModel.from_sft(toy["root"] / "sft", None).tokenizer
    r = toy["train"][0]
    with_ctx = PairwiseDataset([r], tok, lambda p: torch.zeros(1), reward_prompt=rm_prompt(True), use_context=True)
    without = PairwiseDataset([r], tok, lambda p: torch.zeros(1), reward_prompt=rm_prompt(False))
    a, b = tok.decode(with_ctx.items[0][1]), tok.decode(without.items[0][1])
    clause = "description of the video:\n" + r["context"][:60]
    assert clause in a and "description of the video" not in b
    assert a.endswith("my last response is") and b.endswith("my last response is")


def cfg_for(toy, **kw):
    return RewardConfig(**{**dict(sft_model_dir=str(toy["root"] / "sft"), train_file=str(toy["root"] / "rm_train.json"),
                                  val_file=str(toy["root"] / "rm_val.json"), data_root=str(toy["world"]),
                                  features_dir=str(toy["root"] / "feats"), encoder=toy["enc"].to_dict(), lora=TINY_LORA,
                                  lr=1e-3, batch_size=4, max_steps=4, save_every=1, progress=False), **kw})


def head(out):
    from safetensors.torch import load_file
    return load_file(out / "model" / "score_head.safetensors")["weight"]


def test_train_reward_nan_guard_and_resume(toy, tmp_path, monkeypatch):
    ref = train_reward(cfg_for(toy), tmp_path / "ref")
    done = json.loads((ref / "done.json").read_text())
    assert done["steps"] == 4 and 0 <= done["val_accuracy"] <= 1 and done["n_val"] == 8
    assert [r["step"] for r in read_metrics(ref) if "bt" in r] == [1, 2, 3, 4]
    ev = json.loads((ref / "eval.json").read_text())
    assert len(ev["margins"]) == 8 and sorted(ev["index"]) == list(range(8))
    assert ev["truth_accuracy"] == pytest.approx(ev["accuracy"])  # the toy pairs' labels are the truth
    assert done["val_truth_accuracy"] == pytest.approx(ev["accuracy"])
    loaded = RewardModel.from_pretrained(ref / "model")  # PPO's entry point
    ds = PairwiseDataset(load_records(toy["root"] / "rm_val.json", "rm"), loaded.tokenizer,
                         FeatureCache(toy["root"] / "feats", toy["enc"]), root=toy["world"], reward_prompt=rm_prompt())
    again = evaluate_rm(loaded, ds, batch_size=3)
    assert again["margins"] == pytest.approx(ev["margins"], abs=1e-4)
    t0 = (ref / "done.json").stat().st_mtime_ns
    assert train_reward(cfg_for(toy), tmp_path / "ref") == ref and (ref / "done.json").stat().st_mtime_ns == t0

    # a NaN loss at step 3: a clear error naming the step, the step-2 checkpoint intact, no model, no done.json
    real, calls = reward_mod.bt_loss, {"n": 0}
    def nan_at_3(rc, rr, center_coef=1e-3):  # the training loss of the 3rd step (not the metrics or evaluation calls)
        calls["n"] += rc.requires_grad
        loss, m = real(rc, rr, center_coef)
        return (loss * float("nan"), m) if rc.requires_grad and calls["n"] == 3 else (loss, m)
    monkeypatch.setattr(reward_mod, "bt_loss", nan_at_3)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
        train_reward(cfg_for(toy), out)
    assert not (out / "model").exists() and not (out / "done.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    monkeypatch.setattr(reward_mod, "bt_loss", real)
    # resume from step 2: same result as the uninterrupted run
    train_reward(cfg_for(toy), out)
    assert json.loads((out / "done.json").read_text())["steps"] == 4
    assert [r["step"] for r in read_metrics(out) if "bt" in r] == [1, 2, 3, 4]
    assert torch.allclose(head(out), head(ref), atol=1e-5)


def test_train_reward_context_and_held_out_split(toy, tmp_path):
    out = train_reward(cfg_for(toy, val_file=None, val_size=6, use_context=True, lora=None, max_steps=2, save_every=0,
                                gradient_accumulation_steps=2, gradient_checkpointing=True), tmp_path / "ctx")
    done = json.loads((out / "done.json").read_text())
    assert done["n_val"] == 6 and done["n_train"] == 18 and done["use_context"] and done["steps"] == 2
    assert not (out / "checkpoints").exists()
    with pytest.raises(ValueError, match="cannot hold out"):
        train_reward(cfg_for(toy, val_file=None, val_size=100), tmp_path / "bad")


def test_rm_fits_a_small_training_set(toy, tmp_path):
    "The loss path learns: 8 fixed pairs, full-batch steps, the training pairs end up ranked right."
    save_records(toy["train"][:8], tmp_path / "eight.json")
    out = train_reward(cfg_for(toy, train_file=str(tmp_path / "eight.json"), val_file=str(tmp_path / "eight.json"),
                               lora=None, lr=3e-3, warmup_ratio=0.0, lr_scheduler="constant", batch_size=8,
                               epochs=100, max_steps=25, save_every=0, reward_prompt=" USER: Rate it.{context} ASSISTANT:"),
                       tmp_path / "fit")
    rows = [r for r in read_metrics(out) if "bt" in r]
    done = json.loads((out / "done.json").read_text())
    assert rows[0]["bt"] > 0.6 and done["val_loss"] < 0.45 and done["val_accuracy"] >= 0.875, (rows[-1], done)


# ---------------------------------------------------------------- two processes (accelerate launch, gloo on CPU)
DIST_SCRIPT = '''
import json, sys
import torch
torch.set_num_threads(1)
from vlm_rlaif.reward import RewardConfig, train_reward
train_reward(RewardConfig.from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2])
'''


def test_two_process_cpu_reward(toy, tmp_path):
    cfg = cfg_for(toy, lora=None, max_steps=3, save_every=2, batch_size=2, gradient_accumulation_steps=2).to_dict()
    out = tmp_path / "run"
    launch_two_processes(DIST_SCRIPT, cfg, out, tmp_path)
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == 3 and done["n_val"] == 8  # every held-out pair scored once across the two ranks
    ev = json.loads((out / "eval.json").read_text())
    assert sorted(ev["index"]) == list(range(8))
    assert [r["step"] for r in read_metrics(out) if "bt" in r] == [1, 2, 3]
    assert (out / "checkpoints" / "step_000002").is_dir()
    RewardModel.from_pretrained(out / "model")


def test_paper_config_uses_the_original_rm_schedule_and_dropout():
    "paper_7b.yaml's reward model: the original's constant-with-warm-up schedule and LoRA dropout 0."
    import yaml
    from vlm_rlaif.reward import RewardConfig, rm_scheduler
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "paper_7b.yaml")
    cfg = RewardConfig.from_dict(yaml.safe_load(open(path))["reward"])
    assert cfg.lr_scheduler == "constant_with_warmup" and cfg.lora.dropout == 0.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, lrs = rm_scheduler(cfg, opt, 200), []
    for _ in range(200): lrs.append(sched.get_last_lr()[0]); opt.step(); sched.step()
    assert lrs[0] == 0.0 and lrs[6:] == [cfg.lr] * 194  # 6 warm-up steps (3%), then flat
    with pytest.raises(ValueError, match="lr_scheduler"): RewardConfig(lr_scheduler="cosine_typo")


def test_resume_in_a_later_epoch_matches_uninterrupted(toy, tmp_path):
    "Resumed at an epoch boundary and inside epoch 2: accelerate's loader must be told the epoch, not only the sampler."
    cfg = cfg_for(toy, epochs=2, max_steps=None, save_every=1, keep_checkpoints=100)
    full = train_reward(cfg, tmp_path / "full")  # 2 epochs, a checkpoint after every step
    bt = lambda d: [r["bt"] for r in read_metrics(d) if "bt" in r]
    per_epoch = len(bt(full)) // 2
    assert per_epoch >= 2 and len(bt(full)) == 2 * per_epoch
    for at in (per_epoch, per_epoch + 1):
        part = rewind_run(full, tmp_path / f"part{at}", at)
        train_reward(cfg, part)
        assert bt(part) == pytest.approx(bt(full), rel=1e-4), at
        assert torch.allclose(head(part), head(full), atol=1e-5)
