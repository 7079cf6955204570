"""Does the SFT model look at the video? Teacher-forced answer tokens with the video's own features vs another video's.

For each class of answer word (colour, shape, motion, count, event, half), the SFT model's mean negative
log-likelihood and top-1 accuracy on those words in held-out (validation) SFT answers, fed (a) the features of the
record's own video and (b) those of another validation video (a fixed random permutation). A word the model reads
from the video gets cheaper with its own video; a word it guesses from the text (the question, the answer so far)
costs the same with either. No sampling, no scorer: only the records' answers.

    python bench/toy_video_use.py RUN_DIR [--records 400] [--records-file F] [--out bench/results/toy_video_use.json]

About a minute on two CPU threads for the toy demo's model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vlm_rlaif.data import Collator, VideoInstructDataset, load_records
from vlm_rlaif.model import VideoLMM
from vlm_rlaif.pipeline import Run, load_config
from vlm_rlaif.toyworld import COLORS, EVENTS, MOTIONS, NUMBERS, SHAPES

WORDS = dict(colour=COLORS, shape=SHAPES, motion=MOTIONS, count=tuple(NUMBERS.values()), event=EVENTS,
             half=("first", "second"), position=("top", "bottom", "centre"))  # position: bench/toy_position_records.py


def word_ids(tok, words) -> torch.Tensor:
    "First token id of each word as it appears inside a sentence (after a space)."
    return torch.tensor(sorted({tok.encode(" " + w, add_special_tokens=False)[0] for w in words}))


@torch.no_grad()
def measure(run_dir, n_records: int = 400, batch_size: int = 16, seed: int = 0, records_file=None) -> dict:
    root = Path(run_dir)
    run = Run(load_config(root / "config.yaml"), root, create=False)
    model = VideoLMM.from_pretrained(root / "sft" / "model").eval()
    tok = model.tokenizer
    recs = load_records(records_file or run.data_dir / "val_sft.json", "sft")[:n_records]
    ds = VideoInstructDataset(recs, tok, run.features(), root=run.data_dir)
    other = np.random.default_rng(seed).permutation(len(ds))
    ids = {k: word_ids(tok, w) for k, w in WORDS.items()}
    acc = {m: {k: ([], []) for k in (*WORDS, "all")} for m in ("own", "other")}
    collate = Collator(tok.pad_token_id)
    for s in range(0, len(ds), batch_size):
        idx = range(s, min(s + batch_size, len(ds)))
        b = collate([ds[i] for i in idx])
        for mode in ("own", "other"):
            vf = b["video_feats"] if mode == "own" else torch.stack([ds[int(other[i])]["video_feats"] for i in idx])
            inp = model.build_inputs(b["input_ids"], b["attention_mask"], vf, b["labels"])  # labels follow the splice
            labels = inp.pop("labels")
            logits = model.lm(**inp).logits
            lp, tgt = logits[:, :-1].log_softmax(-1), labels[:, 1:]
            mask, t = tgt != -100, tgt.clamp(min=0)
            nll, top1 = -lp.gather(-1, t[..., None])[..., 0], (lp.argmax(-1) == t).float()
            for k, (n_list, a_list) in acc[mode].items():
                km = mask if k == "all" else mask & torch.isin(t, ids[k])
                n_list += nll[km].tolist(); a_list += top1[km].tolist()
    out = {}
    for k in (*WORDS, "all"):
        (no, ao), (nx, ax) = acc["own"][k], acc["other"][k]
        if no: out[k] = dict(n=len(no), nll_own=round(float(np.mean(no)), 4), nll_other=round(float(np.mean(nx)), 4),
                             top1_own=round(float(np.mean(ao)), 4), top1_other=round(float(np.mean(ax)), 4))
    return dict(run=root.name, records=len(ds), words=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--records-file", default=None, help="SFT records to read (default: the run's val_sft.json)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "toy_video_use.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    res = measure(a.run_dir, a.records, records_file=a.records_file)
    print(f"{res['records']} validation answers; answer words by class, own video vs another video's:")
    for k, r in res["words"].items():
        print(f"{k:7s} n={r['n']:5d}   NLL {r['nll_own']:.3f} vs {r['nll_other']:.3f}   top-1 {r['top1_own']:.3f} vs {r['top1_other']:.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
