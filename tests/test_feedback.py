"Verdict parser edge cases, order-swap consistency, clips, toy judging records and run_feedback end to end (vlm_rlaif.feedback)."
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from vlm_rlaif import toyworld as tw
from vlm_rlaif.data import PairwiseDataset, load_records, validate_record
from vlm_rlaif.encoder import FeatureCache, toy_encoder_config
from vlm_rlaif.feedback import (STATUSES, VERDICT_TEXT, ClipFeatures, FeedbackConfig, build_context, clip_caption_records,
                                clip_spans, clip_video_path, combine_verdicts, corrupt_answer, corrupted_pairs,
                                judge_agreement, judge_pairs, judge_question, judge_sft_records, lmm_generator,
                                parse_judge_question, parse_verdict, question_text, run_feedback, truth_context,
                                truth_judge)
from vlm_rlaif.model import TOY_LM_CONFIG, ModelConfig, build_model, train_toy_tokenizer

torch.set_num_threads(1)


# ---------------------------------------------------------------- parser edge cases
@pytest.mark.parametrize("text,want", [
    ("(A) is better.", 1), ("(B) is better.", 2), ("(a) is better", 2 - 1), ("  (B)  is  clearly  better  ", 2),
    ("Answer (A) is better than answer (B).", 1), ("Response B is more accurate.", 2), ("answer b is better", 2),
    ("The better answer is (B).", 2), ("The best response is Answer A.", 1), ("I prefer (A).", 1),
    ("I would choose B.", 2), ("Verdict: (A)", 1), ("[[B]]", 2), ("A", 1), ("(B).", 2), ("\n(A)\n", 1),
    ("(B) is wrong, the square is red.", 1), ("(A) is incorrect.", 2),
    ("(A) is better. (B) claims the circle moves up; (B) is wrong.", 1),
    ("It is a tie.", 0), ("Both answers are equally good.", 0), ("Neither answer is better.", 0),
    ("They are the same.", 0),
])
def test_parse_verdict_reads(text, want):
    assert parse_verdict(text) == want


@pytest.mark.parametrize("text", [
    "", "   ", None, 12, "The circle moves to the left.", "a", "I prefer a short answer.",
    "Reply with (A) or (B) first.",                 # echoing the instruction names both letters
    "(A) is better. Actually (B) is better.",        # contradicts itself
    "Both are equally good, but (B) is better.",     # tie and a letter
    "(A) is not better.", "A or B?", "A red circle moves left.",
    "There are two objects in the video: a red circle and a blue square.",
    "(A) is better" + " (B) is better" * 3, "better better better", "(C) is better.",
])
def test_parse_verdict_never_guesses(text):
    assert parse_verdict(text) is None


def test_parse_verdict_fuzz_no_crash():
    rng = np.random.default_rng(0)
    alphabet = list("AB()[]ab .,:!?\n") + ["better", "worse", "answer", "tie", "is", "equally", "prefer"]
    for _ in range(500):
        t = " ".join(rng.choice(alphabet, rng.integers(0, 12)).tolist())
        assert parse_verdict(t) in (None, 0, 1, 2)


# ---------------------------------------------------------------- order swap
@pytest.mark.parametrize("v_ab,v_ba,want", [
    (1, 2, (1, "kept")), (2, 1, (2, "kept")), (1, 1, (None, "inconsistent")), (2, 2, (None, "inconsistent")),
    (0, 0, (None, "tie")), (0, 2, (None, "inconsistent")), (1, 0, (None, "inconsistent")),
    (None, 2, (None, "unparsable")), (1, None, (None, "unparsable")), (None, None, (None, "unparsable")),
])
def test_combine_verdicts(v_ab, v_ba, want):
    assert combine_verdicts(v_ab, v_ba) == want


def test_order_swap_prompts_and_judges():
    seen = []

    def echo(questions, videos):   # a judge that records its prompts, then prefers the answer mentioning "red"
        seen.extend(questions)
        return ["(A) is better." if "red" in parse_judge_question(q)["answer_a"] else "(B) is better." for q in questions]

    res = judge_pairs(echo, ["What color?", "What color?"], ["v.mp4", None], [("It is red.", "It is blue."),
                                                                              ("It is blue.", "It is red.")],
                      contexts=["A red circle.", None])
    assert [r["preference"] for r in res] == [1, 2] and {r["status"] for r in res} == {"kept"}
    p = [parse_judge_question(q) for q in seen]
    assert (p[0]["answer_a"], p[1]["answer_a"]) == ("It is red.", "It is blue.")   # both orders asked
    assert p[0]["context"] == "A red circle." and p[2]["context"] is None
    assert seen[0].startswith("<image>\n") and not seen[2].startswith("<image>")   # no video -> text only
    biased = judge_pairs(lambda q, v: ["(B) is better."] * len(q), ["q"] * 3, ["v"] * 3, [("x", "y")] * 3)
    assert [r["status"] for r in biased] == ["inconsistent"] * 3
    single = judge_pairs(lambda q, v: ["(B) is better."] * len(q), ["q"], ["v"], [("x", "y")], both_orders=False)
    assert single[0]["preference"] == 2 and len(single[0]["raw"]) == 1
    bad = judge_pairs(lambda q, v: ["(A) is better.", "hmm"] * (len(q) // 2), ["q"], ["v"], [("x", "y")])
    assert bad[0]["status"] == "unparsable" and bad[0]["raw"] == ["(A) is better.", "hmm"]


def test_judge_question_roundtrip():
    q = judge_question("How many?", "Two.\nReally.", "Three.", context="line 1\nline 2")
    p = parse_judge_question(q)
    assert q.count("<image>") == 1 and p["context"] == "line 1\nline 2" and p["answer_a"] == "Two.\nReally."


# ---------------------------------------------------------------- clips and toy records
def test_clip_spans_cover_and_bound():
    for T in (1, 2, 5, 16, 49, 50, 51, 100, 300):
        for k in (1, 2, 3, 5):
            for m in (1, 7, 20):
                s = clip_spans(T, k, m)
                assert 1 <= len(s) <= k and all(0 <= a < b <= T and b - a <= m for a, b in s)
                assert all(b1 <= a2 for (_, b1), (a2, _) in zip(s, s[1:]))
                if k * m >= T + k: assert s[0][0] == 0 and s[-1][1] == T    # no frame left out when clips can cover
    with pytest.raises(ValueError): clip_spans(10, 0)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("fb")
    data = tw.make_dataset(tw.ToyWorldConfig(n_videos=10, seed=4), d / "toy", progress=False)
    enc = toy_encoder_config()
    return dict(root=d, data=data, enc=enc, features=FeatureCache(d / "features", enc), facts=tw.load_facts(data),
                train=json.loads((data / "train_sft.json").read_text()))


def test_judge_sft_records_truthful_and_balanced(toy):
    recs = judge_sft_records(toy["data"], "train", n=60, seed=2, n_frames=16)
    src = {r["id"]: r for r in toy["train"]}
    assert len(recs) == 60 and {r["context_mode"] for r in recs} == {"truth", "none"}
    for r in recs:
        validate_record(r, "sft")
        p = parse_judge_question(r["conversations"][0]["value"])
        assert tw.prefer(toy["facts"][r["video_id"]], src[r["source_id"]], p["answer_a"], p["answer_b"]) == r["preference"]
        assert r["conversations"][1]["value"] == VERDICT_TEXT[r["preference"]]
    assert 15 <= sum(r["preference"] == 1 for r in recs) <= 45


def test_corrupt_answer_changes_facts():
    rng = np.random.default_rng(1)
    a = "There are two objects in the video: a red circle and a blue square. The red circle moves to the left."
    for _ in range(30):
        c = corrupt_answer(a, rng, 1)
        assert c is not None and c != a and "to the up" not in c and "two object " not in c


def test_clip_caption_records_and_features(toy):
    recs = clip_caption_records(toy["data"], "train", n_frames=16)
    cf = ClipFeatures(toy["features"], resample=True)
    full = toy["features"](str(toy["data"] / toy["train"][0]["video"]))
    for r in recs[:3]:
        validate_record(r, "sft")
        x = cf(str(toy["data"] / r["video"]))
        assert x.shape == full.shape
    assert ClipFeatures(toy["features"])(clip_video_path(str(toy["data"] / toy["train"][0]["video"]), (2, 7))).shape[0] == 5
    f = toy["facts"][recs[0]["video_id"]]
    assert build_context([r["conversations"][1]["value"] for r in recs[:3]]) == truth_context(f, 16)


def test_judge_agreement_truth_and_bias(toy):
    recs, pairs = corrupted_pairs(toy["data"], "train", n=20, seed=3)
    s = judge_agreement(truth_judge(toy["facts"], recs), recs, pairs, toy["facts"])["stats"]
    assert s["kept"] == s["decidable"] == 20 and s["agreement"] == 1.0
    s = judge_agreement(lambda q, v: ["(A) is better."] * len(q), recs, pairs, toy["facts"])["stats"]
    assert s["kept"] == 0 and s["inconsistent"] == 20 and s["accuracy"] == 0.0


# ---------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def sft_dir(toy):
    torch.manual_seed(0)
    tok = train_toy_tokenizer(tw.corpus_texts(toy["data"]))
    m = build_model(ModelConfig(lm_config=dict(TOY_LM_CONFIG, num_hidden_layers=1, hidden_size=32, intermediate_size=64),
                                encoder=toy["enc"], lora=None), tok)
    return m.save_pretrained(toy["root"] / "sft")


def _cfg(toy, sft_dir, **kw):
    return FeedbackConfig(**{**dict(sft_model_dir=str(sft_dir), data_dir=str(toy["data"]), features_dir=str(toy["root"] / "features"),
                                    encoder=toy["enc"].to_dict(), n_prompts=12, max_new_tokens=6, caption_max_new_tokens=6,
                                    judge_max_new_tokens=6, batch_size=8, progress=False, val_count=2), **kw})


def test_run_feedback_model_judge_counts(toy, sft_dir, tmp_path):
    out = run_feedback(_cfg(toy, sft_dir), tmp_path / "fb")
    st = json.loads((out / "stats.json").read_text())
    assert st["generated"] == 12 and sum(st[k] for k in ("empty", "identical", *STATUSES)) == 12
    ctx = json.loads((out / "contexts.json").read_text())
    assert all(len(v["captions"]) == 3 for v in ctx.values())     # 3 clip captions per video
    j = json.loads((out / "judgments.json").read_text())
    assert all(len(v["raw"]) == 2 for v in j.values())            # both orders asked
    assert (out / "done.json").exists() and (out / "rm_val.json").exists()


def test_run_feedback_rm_format_resume(toy, sft_dir, tmp_path):
    calls = []

    def judge(q, v):
        calls.append(len(q)); return truth_judge(toy["facts"], toy["train"])(q, v)

    by_q = {(r["conversations"][0]["value"], r["video"]): r for r in toy["train"]}

    def sampler(seed):   # a policy whose answers are true or corrupted, at random
        rng = np.random.default_rng(seed)
        return lambda qs, vs: [a if rng.random() < 0.4 else (corrupt_answer(a, rng) or a) for a in
                               (by_q[(q, v)]["conversations"][1]["value"] for q, v in zip(qs, vs))]

    cfg = _cfg(toy, sft_dir, context="truth", n_prompts=None, val_fraction=0.25, agreement_pairs=12, agreement_split="train",
               agreement_forms=["verdict"])
    out = run_feedback(cfg, tmp_path / "fb", judge=judge, sampler=sampler)
    st = json.loads((out / "stats.json").read_text())
    train, val = load_records(out / "rm_train.json", "rm"), load_records(out / "rm_val.json", "rm")
    assert len(train) + len(val) == st["kept"] > 5 and st["agreement"] == 1.0 and len(val) == round(0.25 * st["kept"])
    assert st["identical"] > 0    # true/true pairs are not judged
    ag = json.loads((out / "agreement.json").read_text())
    assert set(ag) == {"verdict"} and set(ag["verdict"]) == {"none", "captions", "truth", "mcnemar"}
    for m in ("none", "captions", "truth"):   # the policy's own pairs to 12 questions: the oracle judge keeps and gets every one
        a = ag["verdict"][m]
        assert a["decidable"] > 0 and a["kept_decidable"] == a["decidable"] and a["agreement"] == 1.0 and all(a["correct"])
    assert ag["verdict"]["mcnemar"]["captions_vs_none"]["p"] == 1.0
    for r in list(train) + list(val):
        assert r["preference"] == r["truth_preference"] and r["context"] and len(r["judge"]["raw"]) == 2
        assert r["conversations"][0]["value"].startswith("<image>") and len(r["conversations"]) == 1
    if len(train):
        tok = __import__("transformers").AutoTokenizer.from_pretrained(sft_dir)
        ds = PairwiseDataset(train, tok, toy["features"], root=toy["data"], reward_prompt="Context: {context}", use_context=True)
        assert len(ds) == len(train)
    # finished: a rerun returns at once; without done.json it resumes from the saved phases (no new judging)
    n_calls = len(calls)
    run_feedback(cfg, out, judge=judge, sampler=sampler)
    (out / "done.json").unlink(); (out / "stats.json").unlink()
    run_feedback(cfg, out, judge=judge, sampler=sampler)
    assert len(calls) == n_calls and json.loads((out / "stats.json").read_text()) == st
    with pytest.raises(ValueError, match="another FeedbackConfig"):
        (out / "done.json").unlink(); run_feedback(_cfg(toy, sft_dir, context="none"), out)


def test_feedback_config_rejects_unknown():
    with pytest.raises(ValueError, match="unknown keys"): FeedbackConfig.from_dict({"n_clip": 3})
    with pytest.raises(ValueError, match="context"): FeedbackConfig(context="gt")
    assert FeedbackConfig.from_dict({"context": "none"}).both_orders


def test_lmm_generator_batches_clips_and_text(toy, sft_dir):
    from vlm_rlaif.model import VideoLMM
    m = VideoLMM.from_pretrained(sft_dir)
    g = lmm_generator(m, toy["features"], toy["data"], batch_size=2, max_new_tokens=4, do_sample=True, seed=3)
    v = toy["train"][0]["video"]
    vids = [clip_video_path(v, s) for s in clip_spans(16)] + [v, None]
    qs = ["<image>\nDescribe this video in detail."] * 4 + ["Which is better?"]
    out = g(qs, vids)
    assert len(out) == 5 and out == g(qs, vids)
    with pytest.raises(ValueError): g(qs, vids[:2])
