"""Benchmark: sampling 50 frames with decord vs PyAV (vlm_rlaif.frames), on videos generated here.

    .venv/bin/python bench/frames.py [--reps-small 15] [--reps-large 3]

Videos are written into a temp dir: two toy-size clips (64x64, 32 and 64 frames), a larger noisy one
(640x480, 300 frames of moving noise + a moving block, x264 veryfast with B-frames, keyframes 250
frames apart) and a long video with short GOPs (160x120, 2400 frames, a keyframe every 25 frames:
96 s at 25 fps, where 50 samples lie ~49 frames apart). Methods are timed interleaved (every
repetition runs each method once, in a shuffled order) and the report gives median times and the
ratio to decord measured in the same run. Besides the library's PyAV reader (sequential decoding
that seeks only past keyframes), naive PyAV strategies are measured with the same threading and
colour conversion: seek to every index, and decode everything; on the toy clips also
`frame.to_ndarray` per frame instead of one shared reformatter. It also prints how many frames
each PyAV strategy decodes. About 30-50 s on 2 cores (timings on a shared machine vary by ~20%).
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import av
import decord
import numpy as np
from av.video.reformatter import VideoReformatter

from vlm_rlaif.frames import (_decord_read, _pyav_open, _pyav_read, load_frames, probe_video, sample_indices,
                              synthetic_frames, write_video)

K = 50


def pyav_seek_each(path, k=K):
    "Naive PyAV: for every index, seek to its keyframe and decode forward to it. Returns (frames, frames decoded)."
    c, s = _pyav_open(Path(path))
    with c:
        pts = sorted(p.pts for p in c.demux(s) if p.size)
        rgb, out, decoded = VideoReformatter(), [], 0
        for i in sample_indices(len(pts), k):
            c.seek(pts[i], stream=s, backward=True)
            for f in c.decode(s):
                decoded += 1
                if f.pts >= pts[i]:
                    out.append(rgb.reformat(f, format="rgb24").to_ndarray()); break
    return np.stack(out), decoded


def pyav_decode_all(path, k=K, shared_reformatter=True):
    "Naive PyAV: count by demuxing, then decode every frame once and keep the wanted ones."
    c, s = _pyav_open(Path(path))
    with c:
        n = sum(1 for p in c.demux(s) if p.size)
        idx = sample_indices(n, k); want = set(idx); got = {}
        rgb = VideoReformatter()
        c.seek(0)
        for i, f in enumerate(c.decode(s)):
            if i in want:
                got[i] = rgb.reformat(f, format="rgb24").to_ndarray() if shared_reformatter else f.to_ndarray(format="rgb24")
    return np.stack([got[i] for i in idx])


def pyav_library_decoded(path, k=K):
    "Frames decoded (and seeks made) by the library's PyAV reader for k uniform samples."
    info = probe_video(path)
    st = {}
    _pyav_read(info, sorted(set(info.timeline[i] for i in sample_indices(len(info.timeline), k))), stats=st)
    return st


def seek_each_count(path, k=K):
    "Frames seek-each would decode, from the keyframe positions (no decoding)."
    info = probe_video(path)
    order = {t: i for i, t in enumerate(info.order)}
    keys = sorted(order[t] for t, kf in zip(info.pts, info.key) if kf)
    return sum(i - max(kk for kk in keys if kk <= i) + 1 for i in sample_indices(info.n_coded, k))


def stripe_clip(n: int, H: int = 120, W: int = 160) -> np.ndarray:
    "n frames of a moving colour gradient with a sliding bar: every frame differs, so a wrong frame is visible."
    yy, xx = np.mgrid[:H, :W]
    frames = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        frames[i] = ((xx + yy + 3 * i) % 256)[..., None] // np.array([1, 2, 3])
        x = (i * 2) % (W - 30); frames[i, 45:75, x:x + 30] = (255, (i * 7) % 256, 0)
    return frames


def make_container_videos(d: Path) -> dict[str, Path]:
    "The same 160x120, 250-frame clip (keyframe every 25 frames) in each codec/container pair the library verifies."
    H, W, n = 120, 160, 250
    frames = stripe_clip(n, H, W)
    gaps = [i + i // 3 for i in range(n)]
    spec = {"avi mpeg4 B-frames": ("a.avi", "mpeg4", {"bf": 2, "b": "2M", "g": 25}, None),
            "avi h264": ("h.avi", "libx264", {"g": 25, "preset": "veryfast"}, None),
            "mpeg-ts h264": ("h.ts", "libx264", {"g": 25, "preset": "veryfast"}, None),
            "mkv h264": ("h.mkv", "libx264", {"g": 25, "preset": "veryfast"}, None),
            "webm vp9": ("v.webm", "libvpx-vp9", {"g": 25, "b": "1M", "deadline": "realtime", "cpu-used": 8}, None),
            "mp4 h264 B-frames": ("h.mp4", "libx264", {"g": 25, "bf": 3, "preset": "veryfast"}, None),
            "mp4 variable rate": ("vfr.mp4", "libx264", {"g": 25, "preset": "veryfast"}, gaps),
            "avi skipped frames": ("s.avi", "mpeg4", {"b": "2M", "g": 25}, gaps)}
    return {name: write_video(frames, d / f, codec=c, options=o, pts=p) for name, (f, c, o, p) in spec.items()}


def bench_containers(d: Path, reps: int):
    "Per codec/container: the mode each backend chose (verified) and median ms of load_frames; pyav/decord ratio."
    print("\nper container (160x120, 250 frames, keyframe every 25; load_frames, k=50, verified paths):")
    print(f"{'video':20s} {'decord mode':>11s} {'pyav mode':>9s} {'decord ms':>9s} {'pyav ms':>8s} {'pyav/decord':>11s}")
    for name, path in make_container_videos(d).items():
        info = probe_video(path)
        want = sorted(set(info.timeline[i] for i in sample_indices(len(info.timeline), K)))
        modes = {}
        for b, read in (("decord", _decord_read), ("pyav", _pyav_read)):
            st = {}; read(info, want, stats=st); modes[b] = st["mode"]
        x, y = load_frames(path, K, "decord"), load_frames(path, K, "pyav")
        assert np.abs(x.astype(int) - y).max() <= 3, name
        times = {"decord": [], "pyav": []}
        for _ in range(reps):
            order = list(times); random.shuffle(order)
            for b in order:
                t = time.perf_counter(); load_frames(path, K, b); times[b].append(time.perf_counter() - t)
        md, mp = (statistics.median(times[b]) * 1e3 for b in ("decord", "pyav"))
        print(f"{name:20s} {modes['decord']:>11s} {modes['pyav']:>9s} {md:9.1f} {mp:8.1f} {mp / md:11.2f}")


def make_videos(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    v = {"toy 64x64 x32": write_video(synthetic_frames(32), d / "toy32.mp4"),
         "toy 64x64 x64": write_video(synthetic_frames(64), d / "toy64.mp4")}
    H, W, n = 480, 640, 300
    yy, xx = np.mgrid[:H, :W]
    base = (np.stack([xx * 255 // W, yy * 255 // H, (xx + yy) * 255 // (W + H)], -1) // 2 + 20).astype(np.uint8)
    noise = rng.integers(0, 32, (2 * H, 2 * W, 3), dtype=np.uint8)
    frames = np.empty((n, H, W, 3), np.uint8)
    for i in range(n):
        oy, ox = (i * 37) % H, (i * 53) % W
        frames[i] = base + noise[oy:oy + H, ox:ox + W]
        x = (i * 5) % (W - 80); frames[i, 200:280, x:x + 80] = (255, (i * 7) % 256, 0)
    v["noisy 640x480 x300"] = write_video(frames, d / "noisy.mp4", fps=30, options={"preset": "veryfast"})
    H, W, n = 120, 160, 2400
    frames = stripe_clip(n, H, W)
    v["long 160x120 x2400 g25"] = write_video(frames, d / "long.mp4", fps=25, options={"preset": "veryfast", "g": "25"})
    return v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps-small", type=int, default=15)
    ap.add_argument("--reps-large", type=int, default=3)
    args = ap.parse_args(argv)
    random.seed(0)
    print(f"decord {decord.__version__} | PyAV {av.__version__} | numpy {np.__version__} | "
          f"{platform.machine()} x{os.cpu_count()} cores | load avg {os.getloadavg()[0]:.1f} | k={K}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        videos = make_videos(Path(tmp))
        print(f"wrote {len(videos)} videos in {time.perf_counter() - t0:.1f} s\n")
        all_methods = {"decord": lambda p: load_frames(p, K, "decord"),
                       "pyav": lambda p: load_frames(p, K, "pyav"),
                       "seek-each": lambda p: pyav_seek_each(p)[0],
                       "decode-all": pyav_decode_all,
                       "to_ndarray": lambda p: pyav_decode_all(p, shared_reformatter=False)}
        plan = {"toy": ["decord", "pyav", "seek-each", "decode-all", "to_ndarray"],
                "noisy": ["decord", "pyav"],      # 2 GOPs: pyav == decode-all; seek-each decodes ~25x more
                "long": ["decord", "pyav", "seek-each", "decode-all"]}
        rows = []
        for name, path in videos.items():
            methods = {m: all_methods[m] for m in plan[name.split()[0]]}
            ref = None
            for m, f in methods.items():               # warm-up, and all methods must return the same frames
                x = f(path)
                ref = x if ref is None else ref
                assert x.shape == ref.shape and np.abs(x.astype(int) - ref).max() <= 3, (name, m)
            times = {m: [] for m in methods}
            for _ in range(args.reps_small if name.startswith("toy") else args.reps_large):
                order = list(methods); random.shuffle(order)
                for m in order:
                    t = time.perf_counter(); methods[m](path); times[m].append(time.perf_counter() - t)
            with av.open(str(path)) as c:
                nk = sum(1 for p in c.demux(video=0) if p.size and p.is_keyframe)
            seek_dec = pyav_seek_each(path)[1] if "seek-each" in methods else f"{seek_each_count(path)} (counted, not timed)"
            rows.append((name, path.stat().st_size, nk, len(times["decord"]),
                         {m: statistics.median(ts) for m, ts in times.items()}, (seek_dec, pyav_library_decoded(path))))
        print("median ms per call (50 frames); ratios = method / decord, same run")
        cols = ["pyav", "seek-each", "decode-all", "to_ndarray"]
        print(f"{'video':24s} {'MB':>5s} {'keyfr':>5s} {'reps':>4s} {'decord ms':>9s} {'pyav ms':>8s} " +
              " ".join(f"{c + '/decord':>17s}" for c in cols))
        for name, size, nk, reps, med, _ in rows:
            d = med["decord"]
            print(f"{name:24s} {size / 1e6:5.2f} {nk:5d} {reps:4d} {d * 1e3:9.1f} {med['pyav'] * 1e3:8.1f} " +
                  " ".join(f"{med[c] / d:17.2f}" if c in med else f"{'-':>17s}" for c in cols))
        print("\nframes decoded for 50 samples (pyav = library reader, seeks in brackets):")
        for name, _, _, _, _, (sd, st) in rows:
            with av.open(str(videos[name])) as c: n = sum(1 for p in c.demux(video=0) if p.size)
            print(f"  {name:24s} frames {n:5d} | pyav {st['decoded']:5d} ({st['seeks']} seeks) | decode-all {n:5d} | "
                  f"seek-each {sd}")
        bench_containers(Path(tmp), args.reps_small)
    print(f"total {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
