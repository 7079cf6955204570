"""Features computed on the fly (the frozen tower in the data path) against the feature cache, and the cache's
disk estimate."""
from __future__ import annotations

import pytest
import torch

from vlm_rlaif.data import (Collator, DataConfig, PromptDataset, TowerFeatures, VideoInstructDataset,
                            feature_disk_estimate, load_records, video_features)
from vlm_rlaif.encoder import EncoderConfig, FeatureCache, build_vision_tower, toy_encoder_config
from vlm_rlaif.model import train_toy_tokenizer
from vlm_rlaif.toyworld import ToyWorldConfig, corpus_texts, make_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fly")
    data = make_dataset(ToyWorldConfig(n_videos=6, seed=3), root / "data", progress=False)
    tok = train_toy_tokenizer(corpus_texts(data))
    return dict(root=root, data=data, tok=tok, enc=toy_encoder_config(n_frames=8))


def test_estimate_paper_and_toy():
    e = feature_disk_estimate(EncoderConfig(model_name="ViT-L-14-336", n_frames=50), 100_000)
    assert e["bytes_per_video"] == 50 * 576 * 1024 * 2 == 58_982_400  # ~59 MB per 50-frame video
    assert e["total_bytes"] == 100_000 * 58_982_400 and "59 MB per video" in e["text"] and "5.9 TB" in e["text"]
    t = feature_disk_estimate(toy_encoder_config(n_frames=16), 768)
    assert t["bytes_per_video"] == 16 * 64 * 64 * 2 and "131 kB per video" in t["text"]
    assert feature_disk_estimate(toy_encoder_config(n_frames=16), 1, dtype="float32")["bytes_per_video"] == 16 * 64 * 64 * 4


def test_estimate_matches_the_cache_on_disk(world, tmp_path):
    "The estimate is the payload of the cache's files (each adds only a small safetensors header)."
    recs = load_records(world["data"] / "train_sft.json")
    cache = FeatureCache(tmp_path, world["enc"])
    vids = sorted({str(world["data"] / r["video"]) for r in recs})
    cache.precompute(vids, progress=False)
    sizes = [cache.path(v).stat().st_size for v in vids]
    est = feature_disk_estimate(world["enc"], len(vids))["bytes_per_video"]
    assert all(est <= s <= est + 4096 for s in sizes), (est, sizes)


def test_same_batches_both_ways(world, tmp_path):
    "Every dataset gives the same batch tensors from the cache and on the fly (fp16 rounding apart)."
    tok = world["tok"]
    tower = build_vision_tower(world["enc"])
    cache = video_features("cache", tmp_path, world["enc"], tower=tower)
    fly = video_features("on_the_fly", None, world["enc"], tower=tower)
    assert isinstance(cache, FeatureCache) and isinstance(fly, TowerFeatures)
    recs = load_records(world["data"] / "train_sft.json")[:4]
    col = Collator(pad_token_id=tok.pad_token_id)
    for make in (lambda f: VideoInstructDataset(recs, tok, f, root=world["data"]),
                 lambda f: PromptDataset(recs, tok, f, root=world["data"])):
        a, b = (col([make(f)[i] for i in range(len(recs))]) for f in (cache, fly))
        assert a.keys() == b.keys()
        for k in a:
            if k == "video_feats":
                assert a[k].dtype == b[k].dtype == torch.float16 and a[k].shape == b[k].shape
                torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-2, rtol=1e-2)
                assert (a[k] != 0).any()
            elif torch.is_tensor(a[k]): assert torch.equal(a[k], b[k]), k
    # the cache's stored copy is the on-the-fly tensor, both ways round: cached first, then read back from disk
    v = world["data"] / recs[0]["video"]
    torch.testing.assert_close(FeatureCache(tmp_path, world["enc"]).get(v).float(), fly(v).float(), atol=1e-2, rtol=1e-2)


def test_on_the_fly_writes_nothing_and_bad_input(world, tmp_path):
    fly = TowerFeatures(world["enc"])
    x = fly(world["data"] / load_records(world["data"] / "train_sft.json")[0]["video"])
    assert x.shape == (8, world["enc"].num_patches, world["enc"].hidden_size) and not x.requires_grad
    assert not any(p.requires_grad for p in fly.tower.parameters())
    with pytest.raises(ValueError, match="on_the_fly"): video_features("disk", tmp_path, world["enc"])
    with pytest.raises(ValueError, match="features_dir"): video_features("cache", None, world["enc"])
    with pytest.raises(ValueError, match="DataConfig.features"): DataConfig(features="disk")
    with pytest.raises(ValueError, match="another EncoderConfig"):
        TowerFeatures(world["enc"], tower=build_vision_tower(toy_encoder_config(n_frames=4, seed=1)))
    with pytest.raises(Exception, match="(?i)no such|not found|does not exist"):
        fly(tmp_path / "missing.mp4")


def test_pipeline_prints_the_estimate_before_the_cache_fills(tmp_path, capsys):
    "run_pipeline says what the feature cache will take on disk before the features stage writes it."
    from vlm_rlaif.pipeline import load_config, run_pipeline
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("toyworld: {n_videos: 3}\nencoder: {model_name: tiny-vit, pretrained: null, tiny: {}, n_frames: 4}\n"
                        "stages: [toyworld, features]\n")
    run_pipeline(load_config(cfg_path), tmp_path / "run", progress=True)
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("feature cache:"))
    assert "3 videos" in line and "per video" in line, line
    assert out.index("feature cache:") < out.index("== stage features:")  # printed before the stage ends


# ---- every stage reads its features through `features` ("cache" | "on_the_fly") ----

def _sft_cfg(world, **kw):
    from conftest import TINY_LM
    from vlm_rlaif.sft import SFTConfig
    return SFTConfig(data_dir=str(world["data"]), model=dict(lm_config=TINY_LM, encoder=world["enc"].to_dict(), lora=None),
                     tokenizer_vocab_size=300, curriculum=False, batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                     lr=1e-3, save_every=0, log_every=1, mixed_precision="no", max_length=512, seed=0, **kw)


def test_sft_on_the_fly_writes_no_features_and_matches_the_cache(world, tmp_path):
    "A tiny SFT with features='on_the_fly' stores nothing under features_dir; its first loss is the cached run's."
    from vlm_rlaif.sft import train_sft
    from vlm_rlaif.training import read_metrics
    loss = {}
    for src in ("cache", "on_the_fly"):
        out = train_sft(_sft_cfg(world, features=src, features_dir=str(tmp_path / f"feats_{src}")), tmp_path / src,
                        progress=False)
        loss[src] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        assert (out / "model").is_dir()
    assert list((tmp_path / "feats_cache").rglob("*.safetensors"))  # the cache run did precompute
    assert not (tmp_path / "feats_on_the_fly").exists()             # on the fly: nothing written, not even the folder
    assert len(loss["cache"]) == len(loss["on_the_fly"]) == 2
    assert abs(loss["cache"][0] - loss["on_the_fly"][0]) < 1e-2 * abs(loss["cache"][0]), loss  # fp16 storage both ways


def test_bad_features_value_names_the_allowed_values(world):
    from vlm_rlaif.dpo import DPOConfig
    from vlm_rlaif.evaluate import EvalConfig
    from vlm_rlaif.feedback import FeedbackConfig
    from vlm_rlaif.grpo import GRPOConfig
    from vlm_rlaif.pipeline import PipelineConfig
    from vlm_rlaif.ppo import PPOConfig
    from vlm_rlaif.reward import RewardConfig
    from vlm_rlaif.sft import SFTConfig
    for make, name in ((SFTConfig, "SFTConfig"), (FeedbackConfig, "FeedbackConfig"), (RewardConfig, "RewardConfig"),
                       (PPOConfig, "PPOConfig"), (DPOConfig, "DPOConfig"), (GRPOConfig, "GRPOConfig"),
                       (lambda **kw: EvalConfig(data_dir="d", **kw), "EvalConfig"), (PipelineConfig, "PipelineConfig")):
        with pytest.raises(ValueError, match=rf"{name}\.features must be one of \('cache', 'on_the_fly'\), got 'disk'"):
            make(features="disk")
        assert make(features="on_the_fly").features == "on_the_fly"
    with pytest.raises(ValueError, match="num_workers=0"): SFTConfig(features="on_the_fly", num_workers=2)


def test_pipeline_features_reach_every_section(tmp_path):
    "The top-level `features` goes to every stage that reads features; a section's own `features` wins."
    from pathlib import Path
    from vlm_rlaif.pipeline import check_config, check_run_config, load_config
    repo = Path(__file__).resolve().parents[1]
    cfgs = check_config(load_config(repo / "configs/paper_7b.yaml", ["features=on_the_fly", "ppo.features=cache"]))
    assert {s: c.features for s, c in cfgs.items()} == dict(sft="on_the_fly", feedback="on_the_fly", reward="on_the_fly",
        policy_init="on_the_fly", ppo="cache", dpo="on_the_fly", grpo="on_the_fly", eval="on_the_fly")
    toy = load_config(repo / "configs/toy.yaml")
    assert toy.features == "cache" and {c.features for c in check_config(toy).values()} == {"cache"}
    # a run directory written before `features` existed holds the cache's run: still the same config
    import yaml
    held = toy.to_dict(); held.pop("features")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(held, sort_keys=False))
    assert check_run_config(toy, tmp_path) is False  # the same run: no error, nothing to rewrite
    fly = load_config(repo / "configs/toy.yaml", ["features=on_the_fly"])
    with pytest.raises(ValueError, match="features: 'cache' -> 'on_the_fly'"): check_run_config(fly, tmp_path)
    from vlm_rlaif.evaluate import _fingerprint  # so is an evaluation's, resumed
    assert _fingerprint("features", None) == _fingerprint("features", "cache") != _fingerprint("features", "on_the_fly")


def test_pipeline_on_the_fly_caches_nothing(tmp_path):
    "toyworld -> features -> sft -> feedback -> reward -> ppo, dpo, grpo -> eval with `features: on_the_fly`: no feature file."
    import json
    from conftest import TINY_LM
    from vlm_rlaif.pipeline import PipelineConfig, Run, features_note, run_pipeline
    lora = dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    cfg = PipelineConfig.from_dict(dict(
        name="fly", toyworld=dict(n_videos=8, qa_per_video=2, seed=2), features="on_the_fly",
        encoder=dict(model_name="tiny-vit", pretrained=None, tiny={}, n_frames=4),
        model=dict(lm_config=TINY_LM, projector="mlp2x_gelu", lora=None),
        sft=dict(curriculum=False, tokenizer_vocab_size=300, batch_size=4, gradient_accumulation_steps=1, max_steps=2,
                 lr=1e-3, save_every=0, log_every=1, mixed_precision="no", max_length=512),
        feedback=dict(judge="model", judge_form="logprob", n_prompts=6, max_new_tokens=6, caption_max_new_tokens=6,
                      batch_size=8, n_clips=1, max_clip_frames=4, val_count=1),
        reward=dict(lora=None, max_steps=2, batch_size=2, val_size=1, save_every=0, max_length=1024),
        ppo=dict(lora=lora, num_steps=1, rollout_batch_size=4, generation_batch_size=4, minibatch_size=2,
                 max_new_tokens=6, max_prompt_length=1024, length_coef=0.0, save_every=0),
        dpo=dict(lora=lora, max_steps=1, batch_size=2, max_length=1024, save_every=0),
        grpo=dict(lora=lora, group_size=2, num_steps=1, rollout_batch_size=4, generation_batch_size=4, minibatch_size=2,
                  max_new_tokens=6, max_prompt_length=1024, length_coef=0.0, save_every=0),
        eval=dict(judge="toy", max_new_tokens=6, max_items=2, batch_size=8),
        stages=["toyworld", "features", "sft", "feedback", "reward", "ppo", "dpo", "grpo", "eval"]))
    run = Run(cfg, tmp_path / "run")
    assert features_note(run).startswith("features: on_the_fly, nothing will be stored (a cache would hold ")
    assert "8 videos" in features_note(run)  # from the toy world's n_videos: the data is not rendered yet
    res = run_pipeline(cfg, run.root, progress=False)
    for s in ("sft", "feedback", "reward", "ppo", "dpo", "grpo", "eval"): assert run.done(s), s
    feats = json.loads(run.marker("features").read_text())["summary"]
    assert feats["videos"] == 8 and feats["computed"] == 0 and "on_the_fly" in feats["skipped"]
    assert not (run.root / "features").exists()  # not a file, not even the folder
    assert res["feedback"]["kept"] > 0 and {f"{s}_correctness" for s in ("sft", "ppo", "dpo", "grpo")} <= set(res["eval"]), res["eval"]
