"""Feature cache over real files (videos and frame folders, bad input, edits), several processes filling one
cache, and the tiny tower giving the same features in every process."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import multiprocessing as mp
import warnings

import pytest
import torch
from safetensors.torch import load_file

from vlm_rlaif.encoder import (EncoderConfig, FeatureCache, build_vision_tower, feature_bytes, spatio_temporal_pool,
                               toy_encoder_config)
from vlm_rlaif.frames import VideoError, load_frames, save_frames
from vlm_rlaif.toyworld import ToyWorldConfig, render_frames, render_video, sample_facts

torch.set_num_threads(1)
CFG = toy_encoder_config(n_frames=8)


@pytest.fixture(scope="module")
def tower():
    return build_vision_tower(CFG)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    vids = [str(render_video(sample_facts(ToyWorldConfig(), [9, i], f"t{i}"), d / f"t{i}.mp4")) for i in range(4)]
    folder = d / "frames_t0"
    save_frames(render_frames(sample_facts(ToyWorldConfig(), [9, 0], "t0")), folder, ext="png")
    return d, vids, folder


def _fill(args):
    "Worker: build the tower from the config alone and fill the shared cache."
    root, cfg_dict, vids = args
    torch.set_num_threads(1)
    cache = FeatureCache(root, EncoderConfig.from_dict(cfg_dict), batch_frames=16, num_workers=1)
    return cache.precompute(vids, progress=False)["computed"]


def test_processes_share_one_cache_and_agree(tmp_path, videos, tower):
    _, vids, _ = videos
    with mp.get_context("spawn").Pool(2) as pool:
        computed = pool.map(_fill, [(str(tmp_path), CFG.to_dict(), vids)] * 2)
    assert 4 <= sum(computed) <= 8  # each video computed at least once; atomic renames make races harmless
    cache = FeatureCache(tmp_path, CFG, tower=tower)
    assert all(v in cache for v in vids)
    assert not list(cache.dir.glob(".tmp-*"))  # no temp files left behind
    for v in vids:  # a tower built in another process (seeded init) gives the same features as this one
        torch.testing.assert_close(cache.get(v).float(), tower.encode(load_frames(v, k=8)), atol=1e-2, rtol=1e-2)


def test_frame_folder_and_edits(tmp_path, videos, tower):
    _, vids, folder = videos
    cache = FeatureCache(tmp_path, CFG, tower=tower, dtype="float32")
    f_dir = cache.get(folder)
    assert f_dir.dtype == torch.float32 and f_dir.shape == (8, 64, 64)
    torch.testing.assert_close(f_dir, tower.encode(load_frames(folder, k=8)))
    # the mp4 of the same video differs only by compression
    assert (f_dir - cache.get(vids[0]).float()).abs().mean() < 0.1 * f_dir.abs().mean()
    # editing one image of the folder changes the key: recomputed, not served stale
    old = cache.path(folder)
    img = sorted(folder.iterdir())[5]
    img.write_bytes(img.read_bytes())  # same content, new mtime
    os.utime(img, ns=(1, 1))
    assert cache.path(folder) != old and folder not in cache
    meta = load_file(old)  # the old entry is intact
    assert meta["feats"].shape == (8, 64, 64)


def test_bad_inputs_named_or_skipped(tmp_path, videos, tower):
    _, vids, _ = videos
    empty = tmp_path / "empty_folder"; empty.mkdir()
    trunc = tmp_path / "truncated.mp4"
    data = open(vids[1], "rb").read(); trunc.write_bytes(data[: len(data) // 3])
    cache = FeatureCache(tmp_path / "cache", CFG, tower=tower)
    for bad in (empty, trunc, tmp_path / "nope.mp4"):
        with pytest.raises(VideoError, match=bad.name):
            cache.get(bad)
    st = cache.precompute([vids[0], str(trunc), str(empty), vids[1]], on_error="skip", progress=False)
    assert st["computed"] == 2 and [os.path.basename(p) for p, _ in st["failed"]] == ["truncated.mp4", "empty_folder"]
    with pytest.raises(ValueError, match="on_error"):
        cache.precompute(vids, on_error="ignore")
    with pytest.raises(ValueError, match="dtype"):
        FeatureCache(tmp_path, CFG, dtype="int8")


def test_half_precision_compute(tmp_path, videos, tower):
    _, vids, _ = videos
    cache = FeatureCache(tmp_path, CFG, compute_dtype="bfloat16", dtype="float32")  # builds its own tower
    f = cache.get(vids[3])
    assert cache.tower.dtype == torch.bfloat16 and f.dtype == torch.float32
    ref = tower.encode(load_frames(vids[3], k=8))
    assert (f - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_shape_mismatch_recomputed(tmp_path, videos, tower):
    _, vids, _ = videos
    cache = FeatureCache(tmp_path, CFG, tower=tower)
    from safetensors.torch import save_file
    save_file({"feats": torch.zeros(3, 64, 64)}, cache.path(vids[2]))  # e.g. written by a buggy tool
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert cache.get(vids[2]).shape == (8, 64, 64)
    assert any("recomputing" in str(m.message) for m in w)


def test_real_config_shapes_and_costs():
    cfg = EncoderConfig()  # ViT-L-14-336, openai, layer -2, 50 frames
    tower = build_vision_tower(EncoderConfig(pretrained=None), device="meta")
    feats = tower(torch.empty(50, 3, 336, 336, device="meta"))
    assert feats.shape == (50, 576, 1024)
    assert spatio_temporal_pool(feats).shape == (cfg.num_visual_tokens, 1024) == (626, 1024)
    assert feature_bytes(cfg) == 58_982_400 and feature_bytes(cfg, pooled=True) == 1_282_048
    assert feature_bytes(cfg, "float32") == 2 * feature_bytes(cfg)


def test_openai_weights_offline_error():
    hub = pytest.importorskip("huggingface_hub")
    for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if isinstance(hub.try_to_load_from_cache("timm/vit_large_patch14_clip_336.openai", f), str):
            pytest.skip("ViT-L-14-336 openai weights are cached on this machine")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        build_vision_tower(EncoderConfig())


def test_paper_config_pads_and_toy_keeps_its_cache_key():
    "The paper's config pads frames to square (LLaVA-1.5 `pad`); the toy config crops, with the key from before `aspect`."
    import yaml
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    paper = EncoderConfig.from_dict(yaml.safe_load(open(os.path.join(root, "paper_7b.yaml")))["encoder"])
    assert paper.aspect == "pad" and paper.fingerprint() != EncoderConfig.from_dict({**paper.to_dict(), "aspect": "crop"}).fingerprint()
    toy = EncoderConfig.from_dict(yaml.safe_load(open(os.path.join(root, "toy.yaml")))["encoder"])
    assert toy.aspect == "crop" and toy.fingerprint() == "ddd39ebe4caaf019"  # toy.yaml's encoder = toy_encoder_config()
    tower = build_vision_tower(EncoderConfig.from_dict({**toy.to_dict(), "aspect": "pad"}))
    assert tower.transform.transforms[0].__class__.__name__ == "ResizeKeepRatio"  # open_clip's 'longest' resize, then pad


def test_large_frames_are_decoded_small(tmp_path, tower, monkeypatch):
    "A video far larger than the tower's input is decoded at most 2x the input size, not at full size."
    import numpy as np
    import vlm_rlaif.encoder as E
    from vlm_rlaif.frames import write_video
    rng = np.random.default_rng(0)
    big = write_video(rng.integers(0, 255, (8, 480, 640, 3), dtype=np.uint8), tmp_path / "big.mp4")
    seen = []
    def spy(*a, **kw):
        fr = load_frames(*a, **kw); seen.append(fr.shape); return fr
    monkeypatch.setattr(E, "load_frames", spy)
    cache = FeatureCache(tmp_path / "feats", tower.cfg, tower=tower)
    cache.precompute([big], progress=False)
    side = 2 * min(tower.image_size)
    assert seen and min(seen[0][1:3]) == side and max(seen[0][1:3]) < 640, seen
    assert cache(big).shape[0] == tower.cfg.n_frames
