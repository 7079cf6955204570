"""Bad input over real files, cross-backend equality and short-video repetition for vlm_rlaif.frames."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import av
import numpy as np
import pytest
from PIL import Image

from vlm_rlaif.frames import (BACKENDS, VideoError, _pyav_read, load_frames, num_frames, probe_video,
                              read_marker, sample_indices, save_frames, synthetic_frames, write_video)

SRC = ["decord", "pyav", "jpg", "png"]  # the four ways to get frames


def markers(frames):
    return [read_marker(f) for f in frames]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    v = {
        "plain": write_video(synthetic_frames(40), d / "plain.mp4"),  # moov at the end, one GOP
        "gop": write_video(synthetic_frames(120, size=(96, 128)), d / "gop.mp4",
                           options={"g": "10", "bf": "3"}),             # B-frames, short GOPs
        "faststart": write_video(synthetic_frames(60), d / "fast.mp4", faststart=True),
        "mkv": write_video(synthetic_frames(33), d / "clip.mkv"),     # no frame count in the header
        "short": write_video(synthetic_frames(20), d / "short.mp4"),
        "one": write_video(synthetic_frames(1), d / "one.mp4"),
    }
    return d, v


def load_any(path, k, src, tmp):
    "Frames from a video through one of the four sources (folders extracted from all frames with PyAV)."
    if src in BACKENDS: return load_frames(path, k, backend=src)
    folder = tmp / f"{path.stem}_{src}"
    if not folder.exists(): save_frames(load_frames(path, num_frames(path, "pyav"), "pyav"), folder, ext=src)
    return load_frames(folder, k)


# ---------------------------------------------------------------- same indices -> same frames

@pytest.mark.parametrize("name,k", [("plain", 50), ("gop", 50), ("gop", 7), ("faststart", 50), ("mkv", 50)])
def test_same_frames_across_sources(videos, name, k):
    d, v = videos
    n = {"plain": 40, "gop": 120, "faststart": 60, "mkv": 33}[name]
    out = {s: load_any(v[name], k, s, d) for s in SRC}
    for s, x in out.items():
        assert x.dtype == np.uint8 and x.shape[0] == k and x.shape[-1] == 3, s
        assert markers(x) == sample_indices(n, k), s
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int))
    assert diff(out["decord"], out["pyav"]).max() <= 3       # same decoder, maybe other swscale
    assert diff(out["png"], out["pyav"]).max() == 0          # lossless folder
    assert diff(out["jpg"], out["pyav"]).mean() < 3          # JPEG quality 95


@pytest.mark.parametrize("name,n", [("plain", 40), ("gop", 120), ("mkv", 33), ("one", 1)])
def test_num_frames_agree(videos, name, n):
    _, v = videos
    assert num_frames(v[name], "decord") == num_frames(v[name], "pyav") == n


def test_mkv_header_has_no_count(videos):
    _, v = videos
    with av.open(str(v["mkv"])) as c:
        assert c.streams.video[0].frames == 0   # so counting must not trust metadata


def test_pyav_seeking_reader_random_subsets(videos):
    "The keyframe-skipping PyAV reader returns exactly the wanted frames for arbitrary index sets."
    _, v = videos
    rng = np.random.default_rng(0)
    info = probe_video(v["gop"])
    for _ in range(6):
        want = sorted(rng.choice(120, size=int(rng.integers(1, 12)), replace=False).tolist())
        st = {}
        assert markers(_pyav_read(info, want, stats=st)) == want
        assert st["mode"] == "seek" and st["decoded"] <= 120
    st = {}
    _pyav_read(info, [5, 115], stats=st)
    assert st["seeks"] == 1 and st["decoded"] < 40    # decoded from the start, jumped over the GOPs in between


def test_decord_torch_bridge_still_numpy(videos):
    decord = pytest.importorskip("decord")
    pytest.importorskip("torch")
    _, v = videos
    decord.bridge.set_bridge("torch")
    try:
        x = load_frames(v["plain"], 5, "decord")
    finally:
        decord.bridge.reset_bridge()
    assert isinstance(x, np.ndarray) and markers(x) == sample_indices(40, 5)


# ---------------------------------------------------------------- short videos repeat frames

@pytest.mark.parametrize("src", SRC)
def test_short_video_repeats_frames(videos, src):
    d, v = videos
    x = load_any(v["short"], 50, src, d)
    got = markers(x)
    assert got == sample_indices(20, 50) and len(got) == 50
    assert sorted(set(got)) == list(range(20))
    i = got.index(0)
    assert np.array_equal(x[i], x[i + 1])          # a repeated frame is the same pixels


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_frame_video(videos, backend):
    _, v = videos
    x = load_frames(v["one"], 4, backend)
    assert x.shape == (4, 64, 64, 3) and markers(x) == [0, 0, 0, 0]


# ---------------------------------------------------------------- bad input -> VideoError naming the path

def expect_error(path, backend="decord", k=50, match=None):
    with pytest.raises(VideoError) as e:
        load_frames(path, k, backend)
    msg = str(e.value)
    assert str(path) in msg, msg
    if match: assert match in msg, msg
    return msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    expect_error(tmp_path / "nope.mp4", backend, match="no such")
    with pytest.raises(VideoError, match="nope.mp4"): num_frames(tmp_path / "nope.mp4", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frac", [0.05, 0.5, 0.95])
def test_truncated_mp4(videos, tmp_path, backend, frac):
    "A valid mp4 with its bytes cut: moov at the end (unopenable) and faststart (data missing)."
    _, v = videos
    for name in ("plain", "faststart"):
        data = v[name].read_bytes()
        cut = tmp_path / f"cut_{name}.mp4"
        cut.write_bytes(data[: int(len(data) * frac)])
        expect_error(cut, backend)


def packet_ends(path):
    with av.open(str(path)) as c:
        return sorted(p.pos + p.size for p in c.demux(video=0) if p.size)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_between_packets(videos, tmp_path, backend):
    "Cut exactly after a packet: the demuxer sees fewer frames than the header declares (decord alone would accept it)."
    _, v = videos
    data = v["faststart"].read_bytes()
    cut = tmp_path / "clean_cut.mp4"
    cut.write_bytes(data[: packet_ends(v["faststart"])[29]])
    expect_error(cut, backend, match="truncated")
    with pytest.raises(VideoError, match="truncated"): num_frames(cut, backend)
    cut.write_bytes(data[: packet_ends(v["faststart"])[-1] - 1])   # last packet incomplete
    expect_error(cut, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_frame_and_empty_files(tmp_path, backend):
    for ext in ("mp4", "mkv"):                          # containers written with a video stream and no frame
        zero = tmp_path / f"zero.{ext}"
        with av.open(str(zero), "w") as c:
            s = c.add_stream("libx264", rate=25); s.width = s.height = 64; s.pix_fmt = "yuv420p"
            c.start_encoding()                          # header only
        assert zero.stat().st_size > 0
        expect_error(zero, backend)
        with pytest.raises(VideoError, match=f"zero.{ext}"): num_frames(zero, backend)
    empty = tmp_path / "empty.mp4"; empty.write_bytes(b"")
    expect_error(empty, backend)
    junk = tmp_path / "junk.mp4"; junk.write_bytes(np.random.default_rng(0).bytes(5000))
    expect_error(junk, backend)


def test_frame_folder_bad_images(tmp_path):
    frames = synthetic_frames(10)
    folder = tmp_path / "vid_50frames"
    paths = save_frames(frames, folder)
    assert markers(load_frames(folder, 10)) == list(range(10))
    paths[3].write_bytes(b"not a jpeg")                 # unreadable image
    with pytest.raises(VideoError) as e: load_frames(folder, 50)
    assert str(paths[3]) in str(e.value)
    save_frames(frames[3:4], tmp_path / "tmp")[0].replace(paths[3])
    data = paths[6].read_bytes(); paths[6].write_bytes(data[: len(data) // 3])   # truncated JPEG
    with pytest.raises(VideoError) as e: load_frames(folder, 50)
    assert str(paths[6]) in str(e.value)


def test_frame_folder_empty_and_mixed_sizes(tmp_path):
    empty = tmp_path / "empty_dir"; empty.mkdir()
    (empty / "readme.txt").write_text("no frames here")
    expect_error(empty, match="no images")
    with pytest.raises(VideoError, match="empty_dir"): num_frames(empty)
    mixed = tmp_path / "mixed"
    save_frames(synthetic_frames(4), mixed, ext="png")
    Image.fromarray(synthetic_frames(1, size=(96, 96))[0]).save(mixed / "image_05.png")
    with pytest.raises(VideoError, match="image_05.png"): load_frames(mixed, 5)


def test_folder_natural_order(tmp_path):
    frames = synthetic_frames(12)
    folder = tmp_path / "unpadded"; folder.mkdir()
    for i, f in enumerate(frames): Image.fromarray(f).save(folder / f"frame_{i}.png")  # frame_10 < frame_2 as strings
    assert markers(load_frames(folder, 12)) == list(range(12))
