"""Can the toy LM read motion when the temporal tokens keep where things are? (an experiment, not the paper's model)

VLM-RLAIF's visual tokens (Video-ChatGPT's pooling) are T temporal tokens, each the mean of one frame over all its
patches, and P spatial tokens, each the mean of one patch position over all frames. Where an object is at a given
time survives only in the temporal tokens, averaged over the whole frame; the SFT models of this project never
learn to read motion from them (`bench/toy_video_use.py`: motion words cost the same with another video's features).

This experiment changes only the temporal tokens: each frame is average-pooled to a `--grid` x `--grid` grid of
patch blocks instead of to one token (grid 2: 4 tokens per frame, T*4 + P visual tokens; grid 1 is the paper's
pooling). It retrains the demo's SFT stage with that pooling on a finished demo run's toy world, tower and features
(same config, same seed, same steps), then runs `bench/toy_video_use.py`'s measurement on it:

    python bench/toy_motion_tokens.py RUN_DIR --out DIR [--grid 2] [--set sft.max_steps=1500 ...]

RUN_DIR is a finished `make demo` run (its `config.yaml`, `data/`, `tower/`, `features/`); DIR gets symlinks to them
and its own `sft/`. Writes `DIR/video_use.json` (what `toy_video_use.py` prints). The pooling is patched into
`vlm_rlaif.model` for this process only; the model it saves cannot be loaded by the library without the same patch.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch

import vlm_rlaif.model as M


def grid_pool(grid: int):
    "`[..., T, P, C]` -> `[..., T*grid^2 + P, C]`: each frame pooled to grid x grid blocks of patches, then the P spatial tokens."
    def pool(x: torch.Tensor) -> torch.Tensor:
        *lead, T, P, C = x.shape
        s = int(round(P ** 0.5))
        if s * s != P or s % grid: raise ValueError(f"grid {grid} does not divide a {s}x{s} patch grid ({P} patches)")
        blocks = x.reshape(*lead, T, grid, s // grid, grid, s // grid, C).mean(dim=(-4, -2))  # [..., T, g, g, C]
        return torch.cat([blocks.flatten(-4, -2), x.mean(dim=-3)], dim=-2)
    return pool


def patch_pooling(grid: int):
    "Make every VideoLMM of this process use `grid_pool(grid)` (grid 1 is the library's own pooling)."
    if grid == 1: return
    M.spatio_temporal_pool = grid_pool(grid)
    M.num_visual_tokens = lambda T, P: int(T) * grid * grid + int(P)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--grid", type=int, default=2)
    p.add_argument("--records", type=int, default=400)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    a = p.parse_args(argv)
    from vlm_rlaif.pipeline import Run, load_config, run_pipeline
    torch.set_num_threads(a.threads)
    src, out = Path(a.run_dir).resolve(), Path(a.out)
    for need in ("config.yaml", "data", "tower", "features", "stages/features.json"):
        if not (src / need).exists(): raise FileNotFoundError(f"{src}: no {need}; give a finished demo run directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages").mkdir(exist_ok=True)
    for d in ("data", "tower", "features"):
        if not (out / d).exists(): (out / d).symlink_to(src / d)
    for s in ("toyworld", "tower", "features"):
        if (src / "stages" / f"{s}.json").exists(): shutil.copy(src / "stages" / f"{s}.json", out / "stages" / f"{s}.json")
    cfg = load_config(src / "config.yaml", a.set)
    patch_pooling(a.grid)
    run_pipeline(cfg, out, stages=["toyworld", "tower", "features", "sft"])
    spec = importlib.util.spec_from_file_location("toy_video_use", Path(__file__).parent / "toy_video_use.py")
    vu = importlib.util.module_from_spec(spec); spec.loader.exec_module(vu)
    res = vu.measure(out, a.records)
    enc = Run(cfg, out, create=False).encoder_config()
    res.update(run=f"SFT of {src.name}'s config with {a.grid}x{a.grid} blocks per frame as temporal tokens", grid=a.grid,
               visual_tokens=M.num_visual_tokens(enc.n_frames, enc.num_patches))
    (out / "video_use.json").write_text(json.dumps(res, indent=1))
    for k, v in res["words"].items():
        print(f"{k:7s} n={v['n']:5d}   NLL {v['nll_own']:.3f} vs {v['nll_other']:.3f}   top-1 {v['top1_own']:.3f} vs {v['top1_other']:.3f}")
    return res


if __name__ == "__main__":
    main()
