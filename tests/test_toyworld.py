"End to end: generate a small toy world into tmp_path, read everything back, check it against the facts."
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest

from vlm_rlaif import toyworld as tw
from vlm_rlaif.frames import load_frames, num_frames

CFG = tw.ToyWorldConfig(n_videos=10, seed=5, qa_per_video=3, yesno_per_video=2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return tw.make_dataset(CFG, tmp_path_factory.mktemp("toy"), progress=False)


def test_layout_and_counts(world):
    meta = json.loads((world / "dataset.json").read_text())
    conf = {k: v for k, v in tw.asdict(CFG).items() if k != "reasoning_per_video"}   # 0 (default): left out, as before it existed
    assert meta["complete"] and meta["rendered"] == 10 and meta["config"] == json.loads(json.dumps(conf))
    assert sum(meta["counts"][f"{s}_videos"] for s in tw.SPLITS) == 10
    for name in meta["files"]: assert (world / name).exists(), name
    rows = [json.loads(line) for line in (world / "facts.jsonl").read_text().splitlines()]
    assert [r["video_id"] for r in rows] == [f"toy_{i:05d}" for i in range(10)]
    assert [r["split"] for r in rows] == tw.split_of(CFG)
    for s in tw.SPLITS:
        assert meta["counts"][f"{s}_sft"] == meta["counts"][f"{s}_videos"] * (1 + 3 + 1)
        assert meta["counts"][f"{s}_consistency"] == 2 * meta["counts"][f"{s}_videos"]
        assert meta["counts"][f"{s}_yesno"] == 2 * meta["counts"][f"{s}_videos"]


def test_records_valid_and_ground_truth_scores_full(world):
    facts = tw.load_facts(world)
    split_of = {r["video_id"]: r["split"] for r in map(json.loads, (world / "facts.jsonl").read_text().splitlines())}
    pairs = {}
    for s in tw.SPLITS:
        for kind in ("sft", "consistency", "yesno"):
            for r in json.loads((world / f"{s}_{kind}.json").read_text()):
                assert split_of[r["video_id"]] == s
                assert r["video"] == f"videos/{r['video_id']}.mp4" and (world / r["video"]).is_file()
                (h, g) = r["conversations"]
                assert (h["from"], g["from"]) == ("human", "gpt") and h["value"].startswith("<image>\n")
                assert r["difficulty"] == ("long" if r["task"] == "describe" else "short")
                f = facts[r["video_id"]]
                sc = tw.score_answer(f, r, g["value"])
                assert sc["qa_correct"] and sc["correctness"] == sc["detail"] == sc["context"] == 5, (r, sc)
                if kind == "yesno": assert g["value"] == r["answer"].capitalize() + "." and tw.yes_no(g["value"]) == r["answer"]
                if kind == "consistency": pairs.setdefault(r["pair_id"], []).append(r)
    assert pairs and all(len(p) == 2 for p in pairs.values())
    for a, b in pairs.values():
        f = facts[a["video_id"]]
        assert tw.consistency_score(f, a, a["conversations"][1]["value"], b["conversations"][1]["value"]) == 5


def test_videos_match_facts(world):
    "Decode every mp4 (decord) and check the colour at each object's probe point in every frame."
    facts = tw.load_facts(world)
    for vid, f in facts.items():
        path = world / "videos" / f"{vid}.mp4"
        assert num_frames(path) == f["n_frames"] == 32
        frames = load_frames(path, k=f["n_frames"])
        assert frames.shape == (32, 64, 64, 3)
        err = np.abs(frames.astype(int) - tw.render_frames(f)).mean()
        assert err < 3, (vid, err)                                   # lossy (edges, 4:2:0 chroma), but close
        for t in range(32):
            for o in f["objects"]:
                if tw.visible(o, t):
                    x, y = tw.probe_point(o, t, 32)
                    assert tw.nearest_color(frames[t, y, x]) == tw.color_at(o, t), (vid, t, o["shape"])


def test_resume_and_config_guard(world):
    (world / "videos" / "toy_00003.mp4").unlink()
    before = (world / "train_sft.json").read_text()
    tw.make_dataset(CFG, world, progress=False)
    meta = json.loads((world / "dataset.json").read_text())
    assert meta["rendered"] == 1 and (world / "train_sft.json").read_text() == before    # same text, one video re-rendered
    with pytest.raises(ValueError, match="another config"):
        tw.make_dataset(tw.ToyWorldConfig(n_videos=11, seed=5), world, progress=False)


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    cfg = tw.ToyWorldConfig(n_videos=3, seed=9)
    a, b = tw.make_dataset(cfg, tmp_path / "a", progress=False), tw.make_dataset(cfg, tmp_path / "b", progress=False)
    for name in ["facts.jsonl", "train_sft.json", "train_yesno.json", "videos/toy_00001.mp4"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = tw.make_dataset(tw.ToyWorldConfig(n_videos=3, seed=10), tmp_path / "c", progress=False)
    assert (a / "facts.jsonl").read_text() != (c / "facts.jsonl").read_text()


def test_cli_and_bad_input(tmp_path, capsys):
    out = tw.main(["--out", str(tmp_path / "cli"), "--n-videos", "2", "--seed", "1"])
    assert "vocabulary" in capsys.readouterr().out
    assert len(list((out / "videos").glob("*.mp4"))) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "facts.jsonl").write_text(json.dumps({"video_id": "x", "facts": {"video_id": "x", "size": 64, "n_frames": 32,
        "objects": [{"shape": "hexagon", "color": "red", "motion": "up"}]}}) + "\n")
    with pytest.raises(ValueError, match=r"facts.jsonl:1.*hexagon"):
        tw.load_facts(tmp_path / "bad")
    with pytest.raises(SystemExit):
        tw.main(["--n-videos", "2"])                                             # --out is required


def test_scorer_ranks_answers(world):
    "Over all descriptions: truth > truth with one fact dropped > truth with an invented object."
    facts = tw.load_facts(world)
    for vid, f in facts.items():
        rec = tw.make_record(f, "describe")
        gt = tw.describe(f)
        fewer = gt.split(". ")[0] + "."
        absent = next(s for s in tw.SHAPES[::-1] if s not in {o["shape"] for o in f["objects"]}) if len(f["objects"]) < 3 else None
        if absent:
            halluc = gt + f" A purple {absent} moves up."
            assert tw.prefer(f, rec, gt, halluc) == 1 and tw.score_answer(f, rec, halluc)["n_hallucinated"] >= 2
        assert tw.prefer(f, rec, gt, fewer) == 1 and tw.prefer(f, rec, fewer, gt) == 2


def test_reasoning_records_opt_in(tmp_path):
    "reasoning_per_video adds long 'reason' records to the SFT files; the other records stay exactly as without it."
    cfg = tw.ToyWorldConfig(n_videos=6, seed=2, qa_per_video=3, reasoning_per_video=2)
    plain = tw.make_dataset(tw.ToyWorldConfig(n_videos=6, seed=2, qa_per_video=3), tmp_path / "plain", progress=False)
    world = tw.make_dataset(cfg, tmp_path / "reason", progress=False)
    assert json.loads((world / "dataset.json").read_text())["config"]["reasoning_per_video"] == 2
    facts = tw.load_facts(world)
    for s in tw.SPLITS:
        old, new = (json.loads((d / f"{s}_sft.json").read_text()) for d in (plain, world))
        assert [r for r in new if r["task"] != "reason"] == old
        reason = [r for r in new if r["task"] == "reason"]
        assert len(reason) == sum(min(2, len(tw.reason_candidates(f))) for v, f in facts.items() if v in {r["video_id"] for r in old})
        for r in reason:
            ans = r["conversations"][1]["value"]
            assert r["difficulty"] == "long" and len(ans.split()) > 15
            assert tw.quality(tw.score_answer(facts[r["video_id"]], r, ans)) == 5
            worse = ans.replace("left", "right") if "left" in ans else ans.split(". ")[0] + "."
            assert tw.quality(tw.score_answer(facts[r["video_id"]], r, worse)) < 5
