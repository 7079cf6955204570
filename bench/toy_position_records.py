"""Dense grounding instructions for the toy SFT (an experiment of issue 12): where each object is at the start and at
the end of the video, and where it goes, in the 3x3 grid cells of the tower's frame captions.

    python bench/toy_position_records.py DATA_DIR OUT.json [--split train]

Three records per object of each video of the split ("Where is the square at the start of the video?" -> "At the
start, the square is at the top-left."; "... at the end ..."; "Where does the square go?" -> "The square starts at
the top-left and ends at the top-right, so it moves to the right."), from the sampled frames the model sees. Train on
them with `--set "sft.extra_records=[OUT.json]"`; measure whether the model reads positions with
`python bench/toy_video_use.py RUN_DIR --records-file VAL.json` (the `position` words) on the val split's records.
"""
import argparse
import json
from pathlib import Path

from vlm_rlaif.encoder import GRID_CELLS
from vlm_rlaif.frames import sample_indices
from vlm_rlaif.toyworld import load_facts, position, visible


def cell(facts: dict, obj: dict, t: int) -> str:
    x, y = position(obj, t, facts["n_frames"])
    r, c = (min(int(3 * v / facts["size"]), 2) for v in (y, x))
    return GRID_CELLS[3 * r + c]


def position_records(data_dir, split: str = "train", n_frames: int = 16) -> list[dict]:
    data_dir = Path(data_dir)
    facts = load_facts(data_dir)
    videos = {r["video_id"]: r["video"] for r in json.loads((data_dir / f"{split}_sft.json").read_text())}
    recs = []
    for vid, path in sorted(videos.items()):
        f = facts[vid]
        idx = [int(t) for t in sample_indices(f["n_frames"], n_frames)]
        for o in f["objects"]:
            ts = [t for t in idx if visible(o, t)]
            if not ts: continue
            c0, c1, sh, m = cell(f, o, ts[0]), cell(f, o, ts[-1]), o["shape"], o["motion"]
            goes = "it is still" if m == "still" else f"it moves {'to the ' if m in ('left', 'right') else ''}{m}"
            qa = [(f"Where is the {sh} at the start of the video?", f"At the start, the {sh} is at the {c0}."),
                  (f"Where is the {sh} at the end of the video?", f"At the end, the {sh} is at the {c1}."),
                  (f"Where does the {sh} go?", f"The {sh} starts at the {c0} and ends at the {c1}, so {goes}.")]
            for k, (q, a) in enumerate(qa):
                recs.append(dict(id=f"{vid}-position-{sh}-{k}", video=path, video_id=vid, task="position",
                                 difficulty="short", temporal=True,
                                 conversations=[{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]))
    return recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir"); ap.add_argument("out")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n-frames", type=int, default=16, help="frames the encoder samples (toy.yaml: 16)")
    a = ap.parse_args(argv)
    recs = position_records(a.data_dir, a.split, a.n_frames)
    Path(a.out).write_text(json.dumps(recs))
    print(f"{len(recs)} records -> {a.out}")


if __name__ == "__main__":
    main()
