"""Import of original LLaVA-1.5 / VLM-RLAIF checkpoints (vlm_rlaif.convert), checked against raw-weight references."""
from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from vlm_rlaif.convert import (TINY_LLAMA, classify_llava_key, convert_hf_clip_tower, convert_llava_checkpoint,
                               convert_llava_reward_model, find_adapter_dir, hf_clip_to_open_clip,
                               llava_weight_files, load_llava_checkpoint, load_llava_reward_head,
                               load_llava_reward_model, make_tiny_llava_adapter, make_tiny_llava_checkpoint,
                               read_llava_adapter, read_llava_config, read_tensors)
from vlm_rlaif.encoder import build_vision_tower, toy_encoder_config
from vlm_rlaif.model import ModelConfig, VideoLMM, build_model

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
ENC = toy_encoder_config()  # 64 wide, like the synthetic checkpoints' mm_hidden_size
V = TINY_LLAMA["vocab_size"]
TEXT = "USER: <image>\nwhat does the red circle do ? ASSISTANT:"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def ck(root):
    return make_tiny_llava_checkpoint(root / "base-bin", fmt="bin", shards=2)


@pytest.fixture(scope="module")
def feats():
    return torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))


def raw_state(ck):
    sd = {}
    for f in ck.iterdir():
        if f.name.startswith(("model", "pytorch_model")) and f.suffix in (".bin", ".safetensors"):
            sd.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f))
    return sd


def reference(ck, ids, feats, lora=None, image_id=V, override=None):
    "Logits and final hidden states computed straight from the raw tensors (HF Llama + the projector by hand)."
    sd = {k: v.clone() for k, v in raw_state(ck).items() if "vision_tower" not in k and "inv_freq" not in k}
    sd.update(override or {})
    for mod, (A, B, s) in (lora or {}).items():
        sd[mod + ".weight"] += s * B @ A
    conf = json.loads((ck / "config.json").read_text())
    ref = LlamaForCausalLM(LlamaConfig(**{k: conf[k] for k in TINY_LLAMA})).eval()
    ref.load_state_dict({k: v for k, v in sd.items() if "mm_projector" not in k})
    if "model.mm_projector.weight" in sd:  # linear projector
        vis = feats @ sd["model.mm_projector.weight"].T + sd["model.mm_projector.bias"]
    else:
        h = F.gelu(feats @ sd["model.mm_projector.0.weight"].T + sd["model.mm_projector.0.bias"])
        vis = h @ sd["model.mm_projector.2.weight"].T + sd["model.mm_projector.2.bias"]
    vis = torch.cat([vis.mean(1), vis.mean(0)])
    pos = int((ids == image_id).nonzero())
    emb = ref.get_input_embeddings()(ids.masked_fill(ids == image_id, 0))
    with torch.no_grad():
        out = ref(inputs_embeds=torch.cat([emb[:pos], vis, emb[pos + 1:]])[None], output_hidden_states=True)
    return out.logits[0], out.hidden_states[-1][0]


def raw_lora(adir, scale):
    "{module: (A, B, scale)} read from the raw adapter file, whatever the key naming."
    f = next(p for p in adir.iterdir() if p.name.startswith("adapter_model."))
    sd = load_file(f) if f.suffix == ".safetensors" else torch.load(f)
    out = {}
    for k, A in sd.items():
        if ".lora_A" in k:
            mod = k[len("base_model.model."):k.index(".lora_A")]
            out[mod] = (A, sd[k.replace("lora_A", "lora_B")], scale)
    return out


def ours(model, feats):
    ids = model.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids[0], model(ids, video_feats=feats[None]).logits[0]


@pytest.mark.parametrize("fmt,shards", [("bin", 2), ("safetensors", 1)])
def test_logits_match_raw_weights(root, fmt, shards, feats):
    ck = make_tiny_llava_checkpoint(root / f"ck-{fmt}-{shards}", fmt=fmt, shards=shards, seed=3)
    model = load_llava_checkpoint(ck, encoder=ENC)
    ids, logits = ours(model, feats)
    ref, _ = reference(ck, ids, feats, image_id=model.image_token_id)
    torch.testing.assert_close(logits[:, :V], ref, atol=1e-5, rtol=1e-5)
    assert logits.shape[0] == len(ids) - 1 + 3 + 5
    assert model.tokenizer.pad_token == "<unk>" and model.image_token_id == V
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.cfg.vision_hidden_size == 64 and model.cfg.projector == "mlp2x_gelu" and model.cfg.dtype == "float32"


def test_linear_projector_and_projector_file(root, feats):
    ck = make_tiny_llava_checkpoint(root / "ck-linear", projector="linear", seed=4)
    assert classify_llava_key("model.mm_projector.weight") == ("projector", "weight")
    model = load_llava_checkpoint(ck, encoder=ENC)
    ids, logits = ours(model, feats)
    torch.testing.assert_close(logits[:, :V], reference(ck, ids, feats)[0], atol=1e-5, rtol=1e-5)
    # projector taken from a separate mm_projector.bin (pretraining-stage file) instead of the LM weights
    ck2 = make_tiny_llava_checkpoint(root / "ck-noproj", with_projector=False, seed=4, projector="linear")
    m2 = load_llava_checkpoint(ck2, encoder=ENC, projector_path=ck2 / "mm_projector.bin")
    torch.testing.assert_close(ours(m2, feats)[1], logits)


@pytest.mark.parametrize("variant", ["plain", "default-name", "nested-lora_default-safetensors"])
def test_adapter_naming_variants(root, ck, variant, feats):
    kw = {"plain": {}, "default-name": {"adapter_name": "default"},
          "nested-lora_default-safetensors": {"adapter_name": "lora_default", "nest": True, "fmt": "safetensors"}}[variant]
    ad = make_tiny_llava_adapter(root / f"ad-{variant}", ck, r=4, alpha=8, **kw)
    model = load_llava_checkpoint(ck, adapter=ad, encoder=ENC)
    ids, logits = ours(model, feats)
    ref, _ = reference(ck, ids, feats, lora=raw_lora(find_adapter_dir(ad), 8 / 4))
    torch.testing.assert_close(logits[:, :V], ref, atol=1e-5, rtol=1e-5)
    base = ours(load_llava_checkpoint(ck, encoder=ENC), feats)[1]
    assert (logits - base).abs().max() > 1e-2  # the adapter changed the model
    assert sorted(model.cfg.lora.target_modules) == ["down_proj", "q_proj", "v_proj"]
    assert (model.cfg.lora.r, model.cfg.lora.alpha) == (4, 8)
    if variant == "plain":  # trainable: only the LoRA factors (and the projector) train, as in this library's SFT
        t = load_llava_checkpoint(ck, adapter=ad, encoder=ENC, trainable=True)
        names = {n for n, p in t.lm.named_parameters() if p.requires_grad}
        assert names and all("lora_" in n for n in names) and t.training
        assert all(p.requires_grad for p in t.projector.parameters())


def test_projector_lora_and_reward_model(root, ck, feats):
    ad = make_tiny_llava_adapter(root / "rm", ck, adapter_name="lora_default", nest=True, projector_lora=True,
                                 reward_head=True, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"))
    adir = find_adapter_dir(ad)
    assert adir == ad / "adapter_model" / "lora_default"
    lora = raw_lora(adir, 2.0)
    assert "model.mm_projector.0" in lora  # LoRA on the projector: merged into it by the loader
    rm = load_llava_reward_model(ck, ad, encoder=ENC)
    ids = rm.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = rm.backbone(ids, video_feats=feats[None]).logits[0]
        r = rm(ids, video_feats=feats[None])
    ref, h = reference(ck, ids[0], feats, lora=lora)
    torch.testing.assert_close(logits[:, :V], ref, atol=1e-5, rtol=1e-5)
    head = torch.load(ad / "reward_head")
    torch.testing.assert_close(r, h[-1] @ head["weight"].T + head["bias"], atol=1e-5, rtol=1e-5)
    # converted to the RewardModel layout and back
    from vlm_rlaif.reward import RewardModel
    dst = convert_llava_reward_model(ck, ad, root / "rm-converted", encoder=ENC)
    with torch.no_grad():
        torch.testing.assert_close(RewardModel.from_pretrained(dst)(ids, video_feats=feats[None]), r)
    with pytest.raises(FileExistsError):
        convert_llava_reward_model(ck, ad, dst, encoder=ENC)


def test_non_lora_trainables_projector(root, ck, feats):
    "LLaVA's LoRA checkpoints keep the trained projector in non_lora_trainables.bin: it replaces the base one."
    ad = make_tiny_llava_adapter(root / "ad-nonlora", ck, non_lora_projector=True)
    nl = torch.load(ad / "non_lora_trainables.bin")
    assert all(k.startswith("base_model.model.model.mm_projector.") for k in nl)
    model = load_llava_checkpoint(ck, adapter=ad, encoder=ENC)
    ids, logits = ours(model, feats)
    override = {k[len("base_model.model."):]: v for k, v in nl.items()}
    ref, _ = reference(ck, ids, feats, lora=raw_lora(ad, 2.0), override=override)
    torch.testing.assert_close(logits[:, :V], ref, atol=1e-5, rtol=1e-5)
    # LM tensors in non_lora_trainables (e.g. tuned embeddings) are loaded too, into the original rows
    emb = torch.randn(V, 32)
    torch.save({**nl, "base_model.model.model.embed_tokens.weight": emb}, ad / "non_lora_trainables.bin")
    m2 = load_llava_checkpoint(ck, adapter=ad, encoder=ENC)
    torch.testing.assert_close(m2.lm.get_input_embeddings().weight[:V], emb)
    torch.save({**nl, "base_model.model.model.nope.weight": emb}, ad / "non_lora_trainables.bin")
    with pytest.raises(ValueError, match="keys not in the LM"):
        load_llava_checkpoint(ck, adapter=ad, encoder=ENC)


def test_unexpected_lm_keys_warn(root):
    st = make_tiny_llava_checkpoint(root / "w-extra")
    sd = load_file(st / "model.safetensors")
    save_file({**sd, "model.some_new_module.weight": torch.zeros(2)}, st / "model.safetensors")
    with pytest.warns(UserWarning, match="some_new_module"):
        load_llava_checkpoint(st, encoder=ENC)


def test_convert_roundtrip(root, ck, feats):
    ad = make_tiny_llava_adapter(root / "ad-conv", ck)
    model = load_llava_checkpoint(ck, adapter=ad, encoder=ENC)
    ids, logits = ours(model, feats)
    dst = convert_llava_checkpoint(ck, root / "conv", adapter=ad, encoder=ENC)
    meta = json.loads((dst / "vlm_config.json").read_text())
    assert meta["adapter_dir"] == "adapter" and meta["lm_dir"] == "lm" and meta["source"]["adapter"]
    torch.testing.assert_close(ours(VideoLMM.from_pretrained(dst), feats)[1], logits)
    with pytest.raises(FileExistsError, match="exists"):
        convert_llava_checkpoint(ck, dst, encoder=ENC)
    merged = convert_llava_checkpoint(ck, root / "conv-merged", adapter=ad, merge=True, encoder=ENC)
    assert not (merged / "adapter").exists()
    torch.testing.assert_close(ours(VideoLMM.from_pretrained(merged), feats)[1], logits, atol=1e-5, rtol=1e-5)
    # the converted base is a starting point for a new run: ModelConfig(lm_name_or_path=dst/lm, projector_path=...)
    plain = convert_llava_checkpoint(ck, root / "conv-plain", encoder=ENC)
    cfg = ModelConfig(lm_name_or_path=str(plain / "lm"), projector_path=str(plain / "projector.safetensors"),
                      encoder=ENC, vision_hidden_size=64, lora=None)
    fresh = build_model(cfg).eval()
    torch.testing.assert_close(ours(fresh, feats)[1], ours(load_llava_checkpoint(ck, encoder=ENC), feats)[1])


def test_dtype_and_device(ck, feats):
    m = load_llava_checkpoint(ck, encoder=ENC, dtype="bfloat16", device="cpu")
    assert m.lm.dtype == torch.bfloat16 and next(m.projector.parameters()).dtype == torch.bfloat16
    ids, lb = ours(m, feats)
    ref, _ = reference(ck, ids, feats)
    assert (lb[:, :V].float() - ref).abs().max() < 0.25 * ref.abs().max()


def test_read_config_real_fields(root):
    d = root / "cfg-real"
    d.mkdir()
    base = {**json.loads((make_tiny_llava_checkpoint(root / "cfg-src") / "config.json").read_text()),
            "mm_hidden_size": 1024, "torch_dtype": "float16"}
    (d / "config.json").write_text(json.dumps(base))
    info = read_llava_config(d)
    enc = info.model_config.encoder
    assert (enc.model_name, enc.pretrained, enc.select_layer, enc.num_patches) == ("ViT-L-14-336", "openai", -2, 576)
    assert info.model_config.dtype == "float16" and info.lm_hf_config().model_type == "llama"
    assert not any(k.startswith("mm_") for k in info.lm_config)
    del base["mm_projector_type"]  # LLaVA's default is 'linear'
    base.update(model_type="llava_llama", mm_vision_tower="/ckpts/clip-vit-large-patch14-336", mm_vision_select_layer=-1)
    (d / "config.json").write_text(json.dumps(base))
    info = read_llava_config(d)
    assert info.model_config.projector == "linear" and info.model_config.encoder.select_layer == -1


@pytest.mark.parametrize("change,msg", [
    ({"mm_projector_type": "qformer"}, "unknown projector"),
    ({"mm_vision_select_feature": "cls_patch"}, "cls_patch"),
    ({"mm_use_im_start_end": True}, "im_start_end"),
    ({"mm_vision_tower": "some/eva-clip"}, "pass encoder="),
    ({"mm_hidden_size": 64}, "mm_hidden_size=64"),
    ({"text_config": {}}, "llava-hf"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "not a LLaVA config"),
])
def test_config_errors(root, ck, change, msg):
    d = root / "bad-cfg"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**json.loads((ck / "config.json").read_text()), "mm_hidden_size": 1024, **change}))
    with pytest.raises(ValueError, match=msg):
        read_llava_config(d)


def test_missing_files_and_keys(root, ck):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        read_llava_config(root / "nowhere")
    # projector: absent, wrong shapes
    nop = make_tiny_llava_checkpoint(root / "e-noproj", with_projector=False)
    with pytest.raises(ValueError, match="no mm_projector weights"):
        load_llava_checkpoint(nop, encoder=ENC)
    lin = make_tiny_llava_checkpoint(root / "e-lin", projector="linear")
    with pytest.raises(ValueError, match="projector keys"):
        load_llava_checkpoint(nop, encoder=ENC, projector_path=lin / "mm_projector.bin")
    bad = root / "e-badproj.bin"
    torch.save({k: v[:, :3] if v.ndim == 2 else v for k, v in torch.load(nop / "mm_projector.bin").items()}, bad)
    with pytest.raises(ValueError, match="projector shapes differ"):
        load_llava_checkpoint(nop, encoder=ENC, projector_path=bad)
    # weights: a missing shard, no weights at all, a missing LM tensor
    d = root / "e-shard"
    shutil.copytree(ck, d)
    (d / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        load_llava_checkpoint(d, encoder=ENC)
    for f in d.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        llava_weight_files(d)
    st = make_tiny_llava_checkpoint(root / "e-nohead")
    sd = load_file(st / "model.safetensors")
    del sd["lm_head.weight"]
    save_file(sd, st / "model.safetensors")
    with pytest.raises(ValueError, match="LM weights missing.*lm_head"):
        load_llava_checkpoint(st, encoder=ENC)
    # tokenizer
    nt = make_tiny_llava_checkpoint(root / "e-notok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (nt / f).unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_llava_checkpoint(nt, encoder=ENC)


def test_adapter_errors(root, ck):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        find_adapter_dir(root / "nowhere")
    ad = make_tiny_llava_adapter(root / "e-ad", ck)
    (ad / "adapter_model.bin").rename(ad / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        read_llava_adapter(ad)
    sd = torch.load(ad / "weights.bin")
    torch.save({**sd, "base_model.model.model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.lora_A.weight":
                torch.zeros(4, 64)}, ad / "adapter_model.bin")
    with pytest.raises(ValueError, match="vision tower"):
        read_llava_adapter(ad)
    k = next(k for k in sd if "lora_A" in k)
    torch.save({**sd, k: torch.zeros(4, 7)}, ad / "adapter_model.bin")  # wrong shape
    with pytest.raises(ValueError, match="do not fit the LM"):
        load_llava_checkpoint(ck, adapter=ad, encoder=ENC)
    with pytest.raises(FileNotFoundError, match="reward_head"):
        load_llava_reward_head(ad)
    torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, ad / "reward_head")
    with pytest.raises(ValueError, match="Linear"):
        load_llava_reward_head(ad)


def test_hf_clip_tower_to_open_clip(root):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                          image_size=24, patch_size=8, hidden_act="quick_gelu")).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(root / "hf-clip")
    cfg = convert_hf_clip_tower(root / "hf-clip", root / "oc.safetensors", select_layer=-2, n_frames=4)
    assert cfg.quick_gelu and cfg.tiny["mlp_ratio"] == 2.0 and cfg.n_frames == 4
    tower = build_vision_tower(cfg)
    px = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        want = hf(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(px), want, atol=1e-5, rtol=1e-5)
    # keys with LLaVA's prefix convert the same way
    sd = {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in hf.state_dict().items()}
    assert set(hf_clip_to_open_clip(sd)) == set(load_file(root / "oc.safetensors"))
    with pytest.raises(ValueError, match="unexpected CLIP vision keys"):
        hf_clip_to_open_clip({**sd, "vision_model.encoder.extra.weight": torch.zeros(1)})
