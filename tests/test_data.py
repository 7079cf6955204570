"Bad input over real files, label-mask exactness across tokenizers, collators and DataLoader use of vlm_rlaif.data."
import json
import os
import random
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlm_rlaif.data import (IGNORE_INDEX, Collator, DataError, PairwiseDataset, PromptDataset, VideoInstructDataset,
                            curriculum_split, encode_segments, load_records, save_records, tokenize_conversation)
from vlm_rlaif.model import build_prompt, train_toy_tokenizer

torch.set_num_threads(1)
WORDS = ("the red blue green yellow circle square triangle moves left right up down turns appears disappears "
         "first second half of video it then and stays still").split()


def rec(i, answers=("The circle is red.",), questions=None, **kw):
    qs = questions or [f"Question {k}?" for k in range(len(answers))]
    conv = []
    for k, (q, a) in enumerate(zip(qs, answers)):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": f"r{i}", "video": f"videos/r{i}.mp4", "conversations": conv, **kw}


def rm_rec(i, pref=1, **kw):
    return {**rec(i), "output_1": {"value": "The circle is red."}, "output_2": {"value": "It is blue."},
            "preference": pref, **kw}


def make_tokenizer(kind, texts, vocab_size=400):
    t = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>"))
    if kind == "bytelevel":
        t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # 'llama': Metaspace like Llama; 'merge': BPE across spaces, so tokens straddle segment boundaries
        t.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=kind == "llama")
        t.decoder, alphabet = decoders.Metaspace(prepend_scheme="first"), []
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                     initial_alphabet=alphabet, show_progress=False))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", t.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=["<image>"])


class SlowShim:
    "A tokenizer without offsets (like a slow, pure-Python one): exercises the segment-wise fallback."
    is_fast = False

    def __init__(self, tok): self.tok = tok

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        assert not return_offsets_mapping
        return self.tok(text, add_special_tokens=add_special_tokens)

    def __getattr__(self, k): return getattr(self.tok, k)


def random_records(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.choice([1, 1, 2, 3])
        answers = [" ".join(rng.choices(WORDS, k=rng.randint(1, 30))).capitalize() + rng.choice([".", "!", ""])
                   for _ in range(k)]
        questions = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) + "?" for _ in range(k)]
        out.append(rec(i, answers, questions))
    return out


@pytest.fixture(scope="module")
def toks():
    corpus = [build_prompt(r["conversations"]) for r in random_records(60, seed=1)] + ["".join(map(chr, range(32, 127)))]
    out = {k: make_tokenizer(k, corpus) for k in ("bytelevel", "llama", "merge")}
    out["toy"] = train_toy_tokenizer(corpus, vocab_size=400)  # the project's tokenizer
    out["slow"] = SlowShim(out["llama"])
    return out


def feats(path, T=3, P=4, C=5):
    g = torch.Generator().manual_seed(sum(map(ord, str(path))))
    return torch.randn(T, P, C, generator=g)


# ---------------------------------------------------------------- bad input over files
def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_json_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "sft.json", '[\n {"id": "a",\n  "conversations": [}\n]')
    with pytest.raises(DataError, match=r"sft\.json line 3: invalid JSON"):
        load_records(p)
    with pytest.raises(DataError, match="invalid JSON"):  # a broken .json cannot be skipped record by record
        load_records(p, skip_bad=True)


def test_jsonl_in_json_file_and_wrong_top_level(tmp_path):
    p = write(tmp_path, "x.json", json.dumps(rec(0)) + "\n" + json.dumps(rec(1)) + "\n")
    with pytest.raises(DataError, match="name the file .jsonl"):
        load_records(p)
    with pytest.raises(DataError, match="top level must be a list"):
        load_records(write(tmp_path, "d.json", json.dumps(rec(0))))
    with pytest.raises(DataError, match=r"expected a \.json or \.jsonl"):
        load_records(write(tmp_path, "d.txt", "[]"))
    (tmp_path / "bin.json").write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(DataError, match="not UTF-8"):
        load_records(tmp_path / "bin.json")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.json")


def test_jsonl_bad_line_raise_and_skip(tmp_path):
    lines = [json.dumps(rec(0)), "", '{"id": "r1", "conversations": [{"from": "human"', json.dumps(rec(2)),
             json.dumps({**rec(3), "conversations": []})]
    p = write(tmp_path, "sft.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl line 3 record 1: invalid JSON") as e:
        load_records(p)
    assert (e.value.line, e.value.index) == (3, 1)
    with pytest.warns(UserWarning, match="skipped 2 of 4 malformed records"):
        got = load_records(p, skip_bad=True)
    assert [r["id"] for r in got] == ["r0", "r2"]
    assert len(got.skipped) == 2 and "line 5 record 3" in got.skipped[1] and "non-empty list" in got.skipped[1]


@pytest.mark.parametrize("kind,record,msg", [
    ("sft", {"id": "a", "video": "v.mp4"}, "missing key 'conversations'"),
    ("sft", {k: v for k, v in rec(0).items() if k != "video"}, "missing key 'video' \\(or 'images'\\)"),
    ("sft", {**rec(0), "conversations": [{"from": "human", "value": "<image>\nq"}, {"value": "a"}]},
     "conversations\\[1\\] is missing key 'from'"),
    ("sft", {**rec(0), "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "a"}]},
     "bad role order"),
    ("sft", {**rec(0), "conversations": [{"from": "system", "value": "<image>"}]}, "conversations\\[0\\] has role 'system'"),
    ("sft", {**rec(0), "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "no <image> in the first human turn"),
    ("sft", rec(0, ["a", "b"], ["q", "<image>\nq2"]), "2 <image> tokens in the conversation; exactly one"),
    ("sft", rec(0, ["  "]), "conversations\\[1\\] is an empty answer"),
    ("sft", {**rec(0), "images": [], "video": None}, "'video' must be a non-empty path"),
    ("rm", rec(0), "missing key 'output_1'"),
    ("rm", {**rm_rec(0), "output_2": "It is blue."}, "'output_2' must be an object"),
    ("rm", {k: v for k, v in rm_rec(0).items() if k != "preference"}, "missing key 'preference'"),
    ("rm", rm_rec(0, pref=3), "preference must be 1 or 2, got 3"),
    ("rm", rm_rec(0, pref="1"), "preference must be 1 or 2, got '1'"),
    ("rm", rm_rec(0, pref=0), "preference must be 1 or 2, got 0"),
    ("rl", {**rec(0), "conversations": [{"from": "gpt", "value": "<image>\nq"}]}, "bad role order"),
])
def test_malformed_record_in_file(tmp_path, kind, record, msg):
    p = write(tmp_path, f"{kind}.json", json.dumps([rec(9) if kind != "rm" else rm_rec(9), record]))
    with pytest.raises(DataError, match=rf"{kind}\.json record 1: {msg}"):
        load_records(p, kind)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert len(load_records(p, kind, skip_bad=True)) == 1


def test_valid_files_keep_extra_fields_and_media_check(tmp_path):
    r = rm_rec(0, pref=2, context="A red circle moves left.", judge="Answer 2 is better.", score=[1, 2])
    p = write(tmp_path, "rm.jsonl", json.dumps(r) + "\n")
    assert load_records(p, "rm")[0] == r
    with pytest.raises(DataError, match="record 0: video not found"):
        load_records(p, "rm", root=tmp_path)
    (tmp_path / "videos").mkdir(); (tmp_path / "videos" / "r0.mp4").write_bytes(b"x")
    assert len(load_records(p, "rm", root=tmp_path)) == 1
    # the seed's frame lists: the video is the folder holding the frames
    fr = {**rec(1), "images": [f"frames/r1/{k:02d}.jpg" for k in range(3)]}
    del fr["video"]
    (tmp_path / "frames" / "r1").mkdir(parents=True)
    assert len(load_records(write(tmp_path, "f.json", json.dumps([fr])), root=tmp_path)) == 1
    bad = {**fr, "images": ["a/1.jpg", "b/2.jpg"]}
    with pytest.raises(DataError, match="in 2 folders"):
        load_records(write(tmp_path, "g.json", json.dumps([bad])), root=tmp_path)


def test_save_records_roundtrip(tmp_path):
    rs = random_records(5)
    for name in ("a/x.json", "b/y.jsonl"):
        assert list(load_records(save_records(rs, tmp_path / name))) == rs
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------- label masks
@pytest.mark.parametrize("name", ["bytelevel", "llama", "merge", "toy", "slow"])
def test_label_mask_exact(toks, name):
    tok = toks[name]
    for r in random_records(40, seed=2):
        ex = tokenize_conversation(r, tok)
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels) and ids[0] == tok.bos_token_id
        assert all(l in (IGNORE_INDEX, i) for i, l in zip(ids, labels))
        # runs of supervised tokens decode to exactly the answers, each closed by </s> (the eos token)
        runs, cur = [], []
        for i, l in zip(ids, labels):
            if l != IGNORE_INDEX: cur.append(i)
            elif cur: runs.append(cur); cur = []
        runs += [cur] if cur else []
        answers = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
        assert [tok.decode(x).strip() for x in runs] == [a + "</s>" for a in answers]
        assert all(x[-1] == tok.eos_token_id for x in runs)
        assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1


@pytest.mark.parametrize("name", ["bytelevel", "llama", "toy"])
def test_ids_equal_full_string_tokenisation(toks, name):
    "Where no token straddles a boundary, the ids are exactly the tokenisation of the whole prompt (as at inference)."
    tok = toks[name]
    for r in random_records(40, seed=3):
        assert tokenize_conversation(r, tok)["input_ids"] == tok(build_prompt(r["conversations"]))["input_ids"]


def test_boundary_merges_are_cut(toks):
    "The merge-happy tokenizer straddles boundaries on the full string; the result still has exact boundaries."
    tok = toks["merge"]
    rs = random_records(40, seed=4)
    differs = sum(tokenize_conversation(r, tok)["input_ids"] != tok(build_prompt(r["conversations"]))["input_ids"]
                  for r in rs)
    assert differs > 0  # the fallback was exercised (exactness itself is checked in test_label_mask_exact)
    (ids, seg), = encode_segments([["ab", "", "cd"]], toks["llama"])  # empty segments are harmless
    assert set(seg[1:].tolist()) <= {0, 2}


def test_truncation_keeps_image(toks):
    tok = toks["llama"]
    rs = random_records(30, seed=5)
    lengths = [len(tokenize_conversation(r, tok)["input_ids"]) for r in rs]
    limit = sorted(lengths)[len(lengths) // 2]
    with pytest.warns(UserWarning, match="truncated to max_length"):
        ds = VideoInstructDataset(rs, tok, feats, max_length=limit)
    assert ds.n_truncated == sum(n > limit for n in lengths) and len(ds) == len(rs) - ds.n_dropped
    img = tok.convert_tokens_to_ids("<image>")
    for k in range(len(ds)):
        it = ds[k]
        assert len(it["input_ids"]) <= limit and (it["input_ids"] == img).sum() == 1
        assert (it["labels"] != IGNORE_INDEX).any()


def test_tokenizer_without_image_token_and_wrong_eos(toks, tmp_path):
    corpus = ["USER: ASSISTANT: hello </s>"]
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<eos>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="<eos>")
    with pytest.raises(ValueError, match="no <image> token"):
        VideoInstructDataset([rec(0)], tok, feats)
    tok.add_special_tokens({"extra_special_tokens": ["<image>"]})
    # the template closes each answer with the tokenizer's own eos (`model.turn_end`), whatever it is called
    it = VideoInstructDataset([rec(0)], tok, feats)[0]
    assert it["labels"][it["labels"] != IGNORE_INDEX][-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<eos>")
    # records read from a file: a dataset error names the file
    rs = load_records(write(tmp_path, "s.json", json.dumps([rec(0), {**rec(1), "conversations": rec(1)["conversations"][:1]}])),
                      skip_bad=False, kind="rl")
    with pytest.raises(DataError, match=r"s\.json record 1: the last turn must be from 'gpt'"):
        VideoInstructDataset(rs, toks["llama"], feats)


# ---------------------------------------------------------------- collators
def test_sft_collator_shapes_and_padding(toks):
    tok = toks["llama"]
    ds = VideoInstructDataset(random_records(6, seed=6), tok, feats, root="/data")
    items = [ds[k] for k in range(len(ds))]
    n = [len(it["input_ids"]) for it in items]
    for side in ("right", "left"):
        b = Collator(tok.pad_token_id, padding_side=side, pad_to_multiple_of=16)(items)
        L = b["input_ids"].shape[1]
        assert L % 16 == 0 and L >= max(n) and b["video_feats"].shape == (6, 3, 4, 5)
        assert b["labels"].shape == b["attention_mask"].shape == (6, L)
        for r, it in enumerate(items):
            sl = slice(0, n[r]) if side == "right" else slice(L - n[r], L)
            assert torch.equal(b["input_ids"][r, sl], it["input_ids"]) and torch.equal(b["labels"][r, sl], it["labels"])
            assert b["attention_mask"][r].sum() == n[r] and b["attention_mask"][r, sl].all()
            pad = b["attention_mask"][r] == 0
            assert (b["input_ids"][r][pad] == tok.pad_token_id).all() and (b["labels"][r][pad] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="padding_side"):
        Collator(0, padding_side="middle")


def test_pairwise_and_prompt_collators(toks):
    tok = toks["llama"]
    pairs = [rm_rec(0, 1), rm_rec(1, 2), {**rm_rec(2, 1), "output_1": {"value": " ".join(WORDS)}}]
    with pytest.raises(ValueError, match="needs a reward_prompt with a \\{context\\}"):
        PairwiseDataset(pairs, tok, feats, use_context=True)
    ds = PairwiseDataset(pairs, tok, feats, reward_prompt=" USER: Rate it.{context} ASSISTANT: Score:")
    b = Collator(tok.pad_token_id)([ds[k] for k in range(3)])
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape == b["chosen_attention_mask"].shape
    assert b["video_feats"].shape == (3, 3, 4, 5) and b["index"].tolist() == [0, 1, 2]
    last = b["chosen_attention_mask"].sum(1) - 1  # right padding: the scored token
    assert all(tok.decode(b["chosen_input_ids"][r, : last[r] + 1]).endswith("Score:") for r in range(3))
    assert "It is blue." in tok.decode(ds[1]["chosen_input_ids"]) and "is red" in tok.decode(ds[1]["rejected_input_ids"])
    # prompts: left padded, every row ends at the last column with the generation prompt
    ps = PromptDataset(random_records(5, seed=7), tok, feats)
    g = Collator(tok.pad_token_id, padding_side="left")([ps[k] for k in range(5)])
    assert (g["attention_mask"][:, -1] == 1).all() and set(g) == {"input_ids", "attention_mask", "video_feats", "index"}
    assert all(tok.decode(row[m.bool()]).endswith("ASSISTANT:") for row, m in zip(g["input_ids"], g["attention_mask"]))


def test_dataloader_with_workers(toks):
    tok = toks["llama"]
    ds = VideoInstructDataset(random_records(8, seed=8), tok, feats)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=Collator(tok.pad_token_id))
    batches = list(dl)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4]
    ref = Collator(tok.pad_token_id)([ds[k] for k in range(4)])
    assert all(torch.equal(batches[0][k], ref[k]) for k in ref)


# ---------------------------------------------------------------- curriculum
def test_curriculum_on_file(tmp_path):
    rs = [rec(0, ["Red."]), rec(1, [" ".join(["word"] * 30)]), rec(2, ["Red."], difficulty="long"),
          rec(3, [" ".join(["word"] * 30)], difficulty="short")]
    got = load_records(save_records(rs, tmp_path / "c.jsonl"))
    easy, hard = curriculum_split(got, threshold=20)
    assert [r["id"] for r in easy] == ["r0", "r3"] and [r["id"] for r in hard] == ["r1", "r2"]
    easy, hard = curriculum_split(got, threshold=20, difficulty_key=None)
    assert [r["id"] for r in easy] == ["r0", "r2"]
    with pytest.raises(DataError, match="record 0: difficulty='medium'"):
        curriculum_split([rec(0, difficulty="medium")])
