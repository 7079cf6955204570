"""Is the tiny tower good enough for the toy LM? Probes of 02_encoder section 6: a small MLP projector + pooling +
linear read-out on the features of 1,000 single-object toy videos (the first 240 or 750 for training, the last 250
held out), for the random-init and the contrastively pre-trained tiny tower.

    python bench/toy_tower_probes.py [--out bench/results/toy_tower_probes.json]

~7 minutes on one CPU thread. The table in 02_encoder section 6 comes from this measurement.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlm_rlaif.encoder import build_vision_tower, pretrain_toy_tower, probe, toy_encoder_config, toy_probe_data


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "toy_tower_probes.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    toy, rows, t0 = toy_encoder_config(), [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        pt = pretrain_toy_tower(toy, Path(tmp) / "tiny_tower_full.safetensors", progress=False)
        print(f"pre-training: {time.time() - t0:.0f} s, loss {np.mean(pt['losses'][:10]):.2f} -> {np.mean(pt['losses'][-10:]):.2f}")
        cfg_pt = toy_encoder_config(pretrained=str(pt["path"]))
        for name, c in [("random init", toy), ("contrastive", cfg_pt)]:
            X, ys = toy_probe_data(1000, c, build_vision_tower(c), seed=1)
            for n_train in (240, 750):
                Xs = torch.cat([X[:n_train], X[750:]])
                yy = {k: torch.cat([y[:n_train], y[750:]]) for k, (y, _) in ys.items()}
                nc = {k: c_ for k, (_, c_) in ys.items()}
                r = dict(colour=probe(Xs, yy["colour"], nc["colour"], n_train), shape=probe(Xs, yy["shape"], nc["shape"], n_train),
                         event=probe(Xs, yy["event"], nc["event"], n_train, readout="temporal"),
                         **{f"motion {o} {ro}": probe(Xs, yy["motion"], nc["motion"], n_train, order=o, readout=ro)
                            for o in ("after", "before") for ro in ("temporal", "all")})
                rows.append(dict(tower=name, train_videos=n_train, **{k: round(v, 3) for k, v in r.items()}))
                print(rows[-1], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(dict(rows=rows, seconds=round(time.time() - t0)), indent=1))


if __name__ == "__main__":
    main()
