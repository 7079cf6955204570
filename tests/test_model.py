"""Save/load round trips, LoRA bookkeeping, padding invariance and bad input for vlm_rlaif.model."""
from __future__ import annotations

import itertools
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from dataclasses import replace
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlm_rlaif.model import (IGNORE_INDEX, IMAGE_TOKEN, TOY_LM_CONFIG, LoraSettings, ModelConfig, VideoLMM,
                             add_lora, build_model, build_prompt, train_toy_tokenizer, video_question)

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft calls a deprecated HF API
T, P, CV = 3, 5, 32
SMALL_LM = dict(TOY_LM_CONFIG, hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=2)
QUESTIONS = ["What does the red circle do?", "Which shape turns blue at the end of the video?", "Describe it."]


@pytest.fixture(scope="module")
def tok():
    words = [f"The {c} {s} moves {m}." for c, s, m in itertools.product(
        ["red", "green", "blue"], ["circle", "square"], ["left", "right", "up"])]
    return train_toy_tokenizer(words + QUESTIONS * 2)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    "A 'pretrained' LM on disk whose tokenizer lacks <image> and a pad token (like Vicuna's)."
    d = tmp_path_factory.mktemp("base")
    from tokenizers import Tokenizer, models, pre_tokenizers
    text = " ".join(QUESTIONS + ["The red circle moves left."]).replace("?", " ? ").replace(".", " . ")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<unk>", "<s>", "</s>"] + text.split()))}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=wl, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, tie_word_embeddings=False)).save_pretrained(d)
    return d


def toy_cfg(**kw):
    return ModelConfig(**{"lm_config": SMALL_LM, "lora": None, "vision_hidden_size": CV, **kw})


def prompts(tokenizer, side="right", n=3):
    tokenizer.padding_side = side
    texts = [build_prompt([{"from": "human", "value": video_question(q)}], True) for q in QUESTIONS[:n]]
    b = tokenizer(texts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    return b.input_ids, b.attention_mask


def randomize_lora(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # B starts at zero; pretend it was trained


def logits(model, ids, am, feats):
    model.eval()
    with torch.no_grad():
        return model(ids, am, feats).logits


def test_round_trip_full_toy(tmp_path, tok):
    torch.manual_seed(0)
    m = build_model(toy_cfg(), tok)
    ids, am = prompts(m.tokenizer)
    feats = torch.randn(3, T, P, CV)
    ck = m.save_pretrained(tmp_path / "ck")
    meta = json.loads((ck / "vlm_config.json").read_text())
    assert meta["lm_dir"] == "lm" and meta["adapter_dir"] is None and meta["image_token_id"] == m.image_token_id
    r = VideoLMM.from_pretrained(ck)
    assert torch.equal(logits(m, ids, am, feats), logits(r, ids, am, feats))
    assert torch.equal(m.generate(ids, am, feats, max_new_tokens=6), r.generate(ids, am, feats, max_new_tokens=6))
    # saving again over the same directory replaces it and leaves no temporary directories behind
    m.save_pretrained(ck)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_round_trip_lora_toy(tmp_path, tok):
    "Toy LM + LoRA: the clean base goes to lm/ (HF format), the adapter to adapter/ (peft format)."
    torch.manual_seed(1)
    m = build_model(toy_cfg(lora=LoraSettings(r=4, alpha=8)), tok)
    randomize_lora(m)
    ids, am = prompts(m.tokenizer)
    feats = torch.randn(3, T, P, CV)
    ck = m.save_pretrained(tmp_path / "ck")
    base = AutoModelForCausalLM.from_pretrained(ck / "lm")
    assert not any("lora" in k or "base_layer" in k for k in base.state_dict())
    with m.lm.disable_adapter():  # lm/ holds exactly the base weights
        for k, v in m.lm.get_base_model().state_dict().items():
            if "lora_" not in k:
                assert torch.equal(v, base.state_dict()[k.replace(".base_layer.", ".")]), k
    r = VideoLMM.from_pretrained(ck)
    assert torch.equal(logits(m, ids, am, feats), logits(r, ids, am, feats))
    assert not any(p.requires_grad for p in r.parameters())
    assert torch.equal(m.generate(ids, am, feats, max_new_tokens=5), r.generate(ids, am, feats, max_new_tokens=5))
    # reload for further training: adapters and projector trainable, base frozen
    rt = VideoLMM.from_pretrained(ck, trainable=True)
    assert rt.training
    trainable = [n for n, p in rt.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    assert any(n.startswith("projector.") for n in trainable)


def test_lora_on_pretrained_base(tmp_path, base_dir):
    "A LoRA run on a pretrained LM stores only adapter + projector; peft reads the adapter on its own."
    from peft import PeftModel
    torch.manual_seed(2)
    cfg = ModelConfig(lm_name_or_path=str(base_dir), vision_hidden_size=CV, lora=LoraSettings(r=4))
    m = build_model(cfg, None)
    assert m.tokenizer.pad_token is not None and IMAGE_TOKEN in m.tokenizer.get_vocab()
    randomize_lora(m)
    ids, am = prompts(m.tokenizer)
    feats = torch.randn(3, T, P, CV)
    ck = m.save_pretrained(tmp_path / "ck")
    assert not (ck / "lm").exists()
    assert json.loads((ck / "adapter" / "adapter_config.json").read_text())["r"] == 4
    r = VideoLMM.from_pretrained(ck)
    assert torch.equal(logits(m, ids, am, feats), logits(r, ids, am, feats))
    # plain peft + transformers: base from its directory, tokenizer (with <image>) from the checkpoint
    tk = AutoTokenizer.from_pretrained(ck)
    assert tk.convert_tokens_to_ids(IMAGE_TOKEN) == m.image_token_id
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    from vlm_rlaif.model import prepare_tokenizer_and_embeddings
    prepare_tokenizer_and_embeddings(tk, base)
    pm = PeftModel.from_pretrained(base, ck / "adapter").eval()
    text = tk(["The red circle moves left."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(pm(**text).logits, m.lm(**text).logits)
    with pytest.raises(ValueError, match="toy LM"):
        build_model(toy_cfg(lora=LoraSettings(r=2)), m.tokenizer).save_pretrained(tmp_path / "x", save_base=False)


def test_merge_lora_then_save(tmp_path, tok):
    torch.manual_seed(3)
    m = build_model(toy_cfg(lora=LoraSettings(r=4)), tok)
    randomize_lora(m)
    ids, am = prompts(m.tokenizer)
    feats = torch.randn(3, T, P, CV)
    before = logits(m, ids, am, feats)
    m.merge_lora()
    assert m.cfg.lora is None
    torch.testing.assert_close(logits(m, ids, am, feats), before, atol=1e-4, rtol=1e-4)
    ck = m.save_pretrained(tmp_path / "merged")
    assert (ck / "lm").exists() and not (ck / "adapter").exists()
    assert torch.equal(logits(VideoLMM.from_pretrained(ck), ids, am, feats), logits(m, ids, am, feats))


@pytest.mark.parametrize("projector,order", [("mlp2x_gelu", "after"), ("mlp2x_gelu", "before"),
                                             ("linear", "after"), ("linear", "before")])
def test_padding_invariance_and_counts(tok, projector, order):
    torch.manual_seed(4)
    m = build_model(toy_cfg(projector=projector, pool_order=order), tok).eval()
    feats = torch.randn(3, T, P, CV)
    (ri, ra), (li, la) = prompts(m.tokenizer, "right"), prompts(m.tokenizer, "left")
    assert ra[:, -1].min() == 0 and la[:, 0].min() == 0  # really padded on both sides
    lr, ll = logits(m, ri, ra, feats), logits(m, li, la, feats)
    N = m.num_visual_tokens(T, P)
    assert N == T + P and lr.shape[1] == ri.shape[1] + N - 1
    for b in range(3):
        n = int(ra[b].sum()) + N - 1
        torch.testing.assert_close(lr[b, :n], ll[b, -n:], atol=1e-4, rtol=1e-4)
    assert torch.equal(m.generate(ri, ra, feats, max_new_tokens=4), m.generate(li, la, feats, max_new_tokens=4))


def test_training_step_touches_only_adapters_and_projector(tok):
    torch.manual_seed(5)
    m = build_model(toy_cfg(lora=LoraSettings(r=4, dropout=0.0)), tok)
    ids, am = prompts(m.tokenizer)
    labels = ids.masked_fill(am == 0, IGNORE_INDEX)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(ids, am, torch.randn(3, T, P, CV), labels=labels).loss.backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or n.startswith("projector.") for n in changed)
    assert any("lora_B" in n for n in changed) and any(n.startswith("projector.") for n in changed)


def test_bfloat16_round_trip(tmp_path, tok):
    torch.manual_seed(6)
    m = build_model(toy_cfg(dtype="bfloat16"), tok)
    assert m.lm.dtype == torch.bfloat16 and next(m.projector.parameters()).dtype == torch.bfloat16
    ids, am = prompts(m.tokenizer)
    feats = torch.randn(3, T, P, CV)  # float32 features are cast to the projector's dtype
    out = logits(m, ids, am, feats)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    r = VideoLMM.from_pretrained(m.save_pretrained(tmp_path / "bf16"))
    assert r.lm.dtype == torch.bfloat16 and torch.equal(out, logits(r, ids, am, feats))


def test_text_only_forward(tok):
    torch.manual_seed(7)
    m = build_model(toy_cfg(), tok).eval()
    text = m.tokenizer(["The red circle moves left."], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(m(text.input_ids, text.attention_mask).logits, m.lm(**text).logits)


def test_bad_inputs(tmp_path, tok):
    torch.manual_seed(8)
    m = build_model(toy_cfg(), tok)
    ids, am = prompts(m.tokenizer)
    feats = torch.randn(3, T, P, CV)
    no_img = ids.clone()
    no_img[1][no_img[1] == m.image_token_id] = m.tokenizer.unk_token_id
    with pytest.raises(ValueError, match=r"rows \[1\] have \[0\]"):
        m(no_img, am, feats)
    with pytest.raises(ValueError, match="frames, patches"):
        m(ids, am, feats[0])
    with pytest.raises(FileNotFoundError, match="not a VideoLMM checkpoint"):
        VideoLMM.from_pretrained(tmp_path / "missing")
    ck = m.save_pretrained(tmp_path / "ck")
    (ck / "vlm_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="vlm_config.json"):
        VideoLMM.from_pretrained(ck)
    ck = m.save_pretrained(tmp_path / "ck")
    cfg_path = ck / "vlm_config.json"
    meta = json.loads(cfg_path.read_text())
    meta["config"]["projector"] = "linear"  # config and weights disagree
    cfg_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="projector.safetensors"):
        VideoLMM.from_pretrained(ck)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        build_model(toy_cfg())


def test_generate_never_emits_image_token(tok):
    "Rig the LM so that <image> is by far the likeliest next token: generate must still not produce it."
    torch.manual_seed(9)
    m = build_model(toy_cfg(), tok).eval()  # tied embeddings: the <image> row is also its output row
    ids, am = prompts(m.tokenizer, n=1)
    feats = torch.randn(1, T, P, CV)
    with torch.no_grad():
        h = m(ids, am, feats, output_hidden_states=True).hidden_states[-1][0, -1]  # after the final norm
        m.lm.get_input_embeddings().weight[m.image_token_id] = 1e3 * h  # never read as input: it is replaced
        assert m(ids, am, feats).logits[0, -1].argmax() == m.image_token_id
    out = m.generate(ids, am, feats, max_new_tokens=3)
    assert out.shape == (1, 3) and not (out == m.image_token_id).any()
    rigged = m.generate(ids, am, feats, max_new_tokens=3, suppress_tokens=None)  # without the guard
    assert rigged[0, 0] == m.image_token_id
