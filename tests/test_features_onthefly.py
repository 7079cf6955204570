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
