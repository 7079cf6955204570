"""DPO loss against hand-computed cases, pair tokenisation, log-probs, the loop (what moves, resume, bad input)."""
from __future__ import annotations

import json
import math
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from vlm_rlaif.data import Collator, DataError, save_records
from vlm_rlaif.dpo import DPOConfig, DPOPairDataset, answer_logps, dpo_loss, pair_logps, train_dpo
from vlm_rlaif.encoder import FeatureCache, toy_encoder_config
from vlm_rlaif.model import IGNORE_INDEX, LoraSettings, ModelConfig, VideoLMM, build_model, train_toy_tokenizer
from vlm_rlaif.ppo import load_policy
from vlm_rlaif.toyworld import ToyWorldConfig, corpus_texts, make_dataset
from conftest import TINY_LM, rewind_run

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
LORA = LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=False)


def test_dpo_loss_hand():
    z = torch.zeros(4)
    loss, st = dpo_loss(z, z, z, z)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and st["rewards/accuracies"] == 0
    loss, st = dpo_loss(torch.tensor([-8.0, -10.0]), torch.tensor([-11.0, -9.0]), torch.tensor([-10.0, -10.0]),
                        torch.tensor([-10.0, -10.0]), beta=0.5)
    d = torch.tensor([0.5 * 3, 0.5 * -1])  # margins: (2 - -1) and (0 - 1), times beta
    assert math.isclose(loss.item(), (-F.logsigmoid(d)).mean().item(), rel_tol=1e-6)
    assert st["rewards/accuracies"] == 0.5 and math.isclose(st["rewards/margins"].item(), 0.5, rel_tol=1e-6)
    assert math.isclose(st["rewards/chosen"].item(), 0.5 * (2 + 0) / 2, rel_tol=1e-6)
    ls, _ = dpo_loss(torch.tensor([-8.0]), torch.tensor([-11.0]), torch.tensor([-10.0]), torch.tensor([-10.0]),
                     beta=0.1, label_smoothing=0.2)
    d = torch.tensor(0.3)
    assert math.isclose(ls.item(), (-0.8 * F.logsigmoid(d) - 0.2 * F.logsigmoid(-d)).item(), rel_tol=1e-6)


def test_config():
    assert DPOConfig.from_dict({"beta": 0.2}).beta == 0.2
    with pytest.raises(ValueError, match="betta"): DPOConfig.from_dict({"betta": 0.2})
    with pytest.raises(ValueError, match="label_smoothing"): DPOConfig(label_smoothing=0.5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vlm_rlaif.reward import toy_preference_records
    root = tmp_path_factory.mktemp("dpo")
    data = make_dataset(ToyWorldConfig(n_videos=12, seed=5), root / "data", progress=False)
    enc = toy_encoder_config()
    tok = train_toy_tokenizer(corpus_texts(data), vocab_size=400)
    torch.manual_seed(0)
    build_model(ModelConfig(lm_config=TINY_LM, encoder=enc, lora=None), tok).save_pretrained(root / "sft")
    pairs = toy_preference_records(data, "train", n=12, seed=0)
    save_records(pairs[:8], root / "train.json"); save_records(pairs[8:], root / "val.json")
    return dict(root=root, data=data, enc=enc, pairs=pairs, features=FeatureCache(root / "features", enc))


def dpo_cfg(world, **kw):
    r = world["root"]
    return DPOConfig.from_dict({**dict(sft_model_dir=str(r / "sft"), train_file=str(r / "train.json"),
                                       val_file=str(r / "val.json"), data_root=str(world["data"]),
                                       features_dir=str(r / "features"), encoder=world["enc"].to_dict(),
                                       lora=dict(r=4, alpha=8, dropout=0.0), batch_size=2, lr=1e-3, save_every=1,
                                       progress=False), **kw})


def test_pair_dataset_labels(world):
    pol = load_policy(world["root"] / "sft", LORA)
    tok = pol.tokenizer
    ds = DPOPairDataset(world["pairs"], tok, world["features"], root=world["data"])
    for k in range(3):
        it, rec = ds[k], world["pairs"][ds.items[k][0]]
        win = rec["output_1" if rec["preference"] == 1 else "output_2"]["value"]
        lose = rec["output_2" if rec["preference"] == 1 else "output_1"]["value"]
        for side, text in (("chosen", win), ("rejected", lose)):
            lab = it[f"{side}_labels"]
            got = tok.decode(lab[lab != IGNORE_INDEX])
            assert got.strip() == text.strip() + "</s>", (got, text)
    # too short a max_length leaves no answer: the pair is dropped, not silently kept
    short = DPOPairDataset(world["pairs"][:2], tok, world["features"], root=world["data"], max_length=5)
    assert len(short) == 0 and short.n_dropped == 2
    bad = dict(world["pairs"][0], preference=3)
    with pytest.raises(DataError, match="preference"):
        DPOPairDataset([bad], tok, world["features"], root=world["data"])


def test_answer_logps_match_cross_entropy(world):
    pol = load_policy(world["root"] / "sft", LORA)
    ds = DPOPairDataset(world["pairs"][:3], pol.tokenizer, world["features"], root=world["data"])
    b = Collator(pol.tokenizer.pad_token_id)([ds[i] for i in range(3)])
    with torch.no_grad():
        lc, lr = pair_logps(pol, b)
        for i in range(3):
            m = int(b["rejected_attention_mask"][i].sum())
            lab = b["rejected_labels"][i:i + 1, :m]
            ce = pol(b["rejected_input_ids"][i:i + 1, :m], video_feats=b["video_feats"][i:i + 1], labels=lab).loss
            n = int((lab != IGNORE_INDEX).sum())
            assert math.isclose(lr[i].item(), -ce.item() * n, rel_tol=1e-4)


def test_train_changes_only_lora_and_starts_at_log2(world, tmp_path):
    pol = load_policy(world["root"] / "sft", LORA)
    before = {n: p.detach().clone() for n, p in pol.named_parameters()}
    out = train_dpo(dpo_cfg(world, epochs=2), tmp_path / "dpo", policy=pol)
    changed = {n for n, p in pol.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed), changed
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and abs(rows[0]["loss"] - math.log(2)) < 1e-4
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert math.isfinite(rows[-1][k])
    ev = json.loads((out / "eval.json").read_text())
    assert ev["n"] == 4 and 0 <= ev["accuracy"] <= 1
    m = VideoLMM.from_pretrained(out / "policy")
    sd = dict(m.named_parameters())
    for n, p in pol.named_parameters():
        if "lora_" in n: torch.testing.assert_close(sd[n], p.detach())
    assert (out / "done.json").exists() and train_dpo(dpo_cfg(world), out) == out


def test_resume_matches_uninterrupted(world, tmp_path):
    cfg = dpo_cfg(world, epochs=1, keep_checkpoints=5, val_file=None)
    full = train_dpo(cfg, tmp_path / "full")  # 4 steps, checkpoints at 1..3
    part = tmp_path / "part"
    shutil.copytree(full, part)
    (part / "done.json").unlink(); shutil.rmtree(part / "policy"); shutil.rmtree(part / "checkpoints" / "step_000003")
    train_dpo(cfg, part)  # resumes after step 2
    la = {n: p for n, p in VideoLMM.from_pretrained(full / "policy").named_parameters() if "lora_" in n}
    lb = {n: p for n, p in VideoLMM.from_pretrained(part / "policy").named_parameters() if "lora_" in n}
    for n in la: torch.testing.assert_close(la[n], lb[n])
    assert [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_in_a_later_epoch_matches_uninterrupted(world, tmp_path):
    "Resumed at an epoch boundary and in the middle of epoch 2: accelerate's loader must be told the epoch too."
    cfg = dpo_cfg(world, epochs=2, keep_checkpoints=10, val_file=None)
    full = train_dpo(cfg, tmp_path / "full")  # 2 epochs of 4 steps, checkpoints at 1..7
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]
    la = {n: p for n, p in VideoLMM.from_pretrained(full / "policy").named_parameters() if "lora_" in n}
    for at in (4, 6):
        part = rewind_run(full, tmp_path / f"part{at}", at, model="policy")
        train_dpo(cfg, part)
        assert len(losses(part)) == 8
        for a, b in zip(losses(full), losses(part)): assert math.isclose(a, b, rel_tol=1e-4), (at, losses(full), losses(part))
        lb = {n: p for n, p in VideoLMM.from_pretrained(part / "policy").named_parameters() if "lora_" in n}
        for n in la: torch.testing.assert_close(la[n], lb[n])
