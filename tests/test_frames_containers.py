"""Frame sampling on real codecs and containers: either the frames of a sequential decode, or `VideoError` naming the path.

The corpus (made here with PyAV, 64x48, 48 frames, each carrying its index in a marker band): MPEG-4 Part 2 with
B-frames in AVI, H.264 in AVI, MPEG-TS, Matroska, WebM (VP8, VP9), mp4 H.264 with B-frames, a variable frame rate
mp4, an AVI with skipped frames, and the first half of each. Returned frames are compared with a plain sequential
decode of the same file (the definition of frame i), not with the source, so lossy compression does not matter.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import av
import numpy as np
import pytest

from vlm_rlaif.frames import (BACKENDS, VideoError, _decord_read, _pyav_read, load_frames, num_frames,
                              probe_video, read_marker, sample_indices, synthetic_frames, write_video)

N, K = 48, 8
GAPS = [i + i // 3 for i in range(N)]       # 0,1,2,4,5,6,8,...: every fourth tick skipped (VFR mp4, skipped-frame AVI)
SPECS = {  # name: (file, codec, encoder options, pts)
    "avi_mpeg4_bf": ("mpeg4_bf.avi", "mpeg4", {"bf": 2, "b": "1M", "g": 12}, None),
    "avi_h264": ("h264.avi", "libx264", {"g": 12}, None),
    "ts_h264": ("h264.ts", "libx264", {"g": 12}, None),
    "mkv_h264": ("h264.mkv", "libx264", {"g": 12}, None),
    "webm_vp8": ("vp8.webm", "libvpx", {"g": 12, "b": "1M"}, None),
    "webm_vp9": ("vp9.webm", "libvpx-vp9", {"g": 12, "b": "1M"}, None),
    "mp4_h264_bf": ("h264_bf.mp4", "libx264", {"g": 12, "bf": 3}, None),
    "mp4_vfr": ("vfr.mp4", "libx264", {"g": 12}, GAPS),
    "avi_skipped": ("skipped.avi", "mpeg4", {"b": "1M", "g": 12}, GAPS),
}
SPECS = {k: v for k, v in SPECS.items() if v[1] in av.codecs_available}
# what a half file must give: VideoError, or (MPEG-TS: no declared length) a valid shorter video
CUT_OK = {"ts_h264"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("containers")
    src = synthetic_frames(N, size=(48, 64))
    v = {}
    for name, (fname, codec, opts, pts) in SPECS.items():
        v[name] = p = write_video(src, d / fname, codec=codec, options=opts, pts=pts)
        cut = d / f"cut_{fname}"
        cut.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
        v["cut_" + name] = cut
    return v


def sequential(path) -> list[np.ndarray]:
    "Every frame of a plain sequential PyAV decode, in the order the decoder puts them out."
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def expected(path, name, k=K) -> list[np.ndarray]:
    "The sequential decode at the sampled positions (by presentation tick for the skipped-frame AVI)."
    seq = sequential(path)
    if name.endswith("avi_skipped"):        # tick t shows the last stored frame at or before t
        slot = [max(j for j, g in enumerate(GAPS) if g <= t) for t in range(GAPS[-1] + 1)]
        return [seq[slot[i]] for i in sample_indices(len(slot), k)]
    return [seq[i] for i in sample_indices(len(seq), k)]


def same(a, b) -> bool:
    return a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).max() <= 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_whole_file_gives_sequential_frames(corpus, name, backend):
    path = corpus[name]
    got = load_frames(path, K, backend)
    want = expected(path, name)
    assert got.shape == (K, 48, 64, 3)
    assert [read_marker(f) for f in got] == [read_marker(f) for f in want]
    assert all(same(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_half_file_is_rejected_or_right(corpus, name, backend):
    path = corpus["cut_" + name]
    if name not in CUT_OK:
        with pytest.raises(VideoError) as e:
            load_frames(path, K, backend)
        assert str(path) in str(e.value)
        with pytest.raises(VideoError, match=path.name): num_frames(path, backend)
        return
    got = load_frames(path, K, backend)                # a TS file has no declared length: a shorter valid video
    want = expected(path, name)
    assert all(same(g, w) for g, w in zip(got, want))


def test_skipped_frame_avi_is_sampled_by_time(corpus):
    info = probe_video(corpus["avi_skipped"])
    assert info.n_coded == N and len(info.timeline) == GAPS[-1] + 1
    assert num_frames(corpus["avi_skipped"]) == GAPS[-1] + 1
    assert info.timeline[:6] == [0, 1, 2, 2, 3, 4]     # tick 3 was skipped: frame 2 is shown twice as long


def test_untrusted_timestamps_fall_back_to_counting(corpus):
    "H.264 in AVI: the decoder's timestamps do not name its frames; the PyAV reader notices and counts."
    info = probe_video(corpus["avi_h264"])
    st = {}
    _pyav_read(info, [4, 20, 47], stats=st)
    assert st["mode"] == "count" and "untrusted" in st
    st = {}
    _decord_read(info, [4, 20, 47], stats=st)           # decord has no timestamps for it: sequential decord
    assert st["mode"] == "count"
    st = {}
    _decord_read(probe_video(corpus["ts_h264"]), [0, 47], stats=st)
    assert st["mode"] == "pyav"                         # decord loses TS's first GOP: PyAV reads it


@pytest.mark.parametrize("name", ["mp4_h264_bf", "mkv_h264", "webm_vp9", "mp4_vfr"])
def test_fast_paths_kept_where_right(corpus, name):
    info = probe_video(corpus[name])
    for read in (_decord_read, _pyav_read):
        st = {}
        read(info, [0, 20, 47], stats=st)
        assert st["mode"] == "seek", (read.__name__, st)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mp4_h264_bf", "avi_mpeg4_bf", "ts_h264"])
def test_output_size(corpus, name, backend):
    "A large video is scaled while decoding: the array has the requested size, the frames stay the right ones."
    for size, shape in [((32, 40), (32, 40)), (24, (24, 32)), (100, (48, 64))]:
        got = load_frames(corpus[name], 4, backend, size=size)
        assert got.shape == (4, *shape, 3), (size, got.shape)
    got = load_frames(corpus[name], K, backend, size=(40, 64))   # full width keeps the marker readable
    assert [read_marker(f) for f in got] == [read_marker(f) for f in expected(corpus[name], name)]
