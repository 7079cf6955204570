"""Checkpoints run no code and survive damage: a crafted pickle in a checkpoint directory is never unpickled, a
damaged newest checkpoint (truncated weights or optimizer, empty trainer state) is named and the previous intact one
resumes, and the resumed run still ends with exactly the weights of an uninterrupted one."""
import json
import shutil
import warnings

import pytest
import torch

from vlm_rlaif.encoder import toy_encoder_config
from vlm_rlaif.model import VideoLMM
from vlm_rlaif.sft import SFTConfig, train_sft
from vlm_rlaif.toyworld import ToyWorldConfig, make_dataset
from vlm_rlaif.training import CheckpointError, latest_checkpoint, stage_done, write_manifest
from conftest import TINY_LM

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck_world")
    return make_dataset(ToyWorldConfig(n_videos=6, seed=3), root / "data", progress=False), root / "features"


def cfg_for(world, **kw):
    data, feats = world
    return SFTConfig(**{**dict(data_dir=str(data), features_dir=str(feats), tokenizer_vocab_size=300, batch_size=4,
                               gradient_accumulation_steps=1, lr=1e-3, save_every=1, keep_checkpoints=3, log_every=1,
                               seed=0, max_steps=5, model=dict(lm_config=TINY_LM, encoder=toy_encoder_config().to_dict(),
                                                               lora=dict(r=4, alpha=8, dropout=0.1))), **kw})


def weights(run):
    m = VideoLMM.from_pretrained(run / "model")
    return {**{f"lm.{k}": v for k, v in m.lm.state_dict().items()}, **{f"p.{k}": v for k, v in m.projector.state_dict().items()}}


class Kill(Exception):
    pass


def kill_at(at):
    def f(step, row):
        if step == at: raise Kill
    return f


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    return weights(train_sft(cfg_for(world), tmp_path_factory.mktemp("ck_ref") / "run", progress=False))


@pytest.fixture
def killed(world, tmp_path):
    "A run killed after step 4: checkpoints of steps 2, 3, 4."
    out = tmp_path / "run"
    with pytest.raises(Kill): train_sft(cfg_for(world), out, on_step=kill_at(4), progress=False)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_000002", "step_000003", "step_000004"]
    return out


class Crafted:
    def __init__(self, flag): self.flag = str(flag)
    def __reduce__(self): return (exec, (f"open({self.flag!r}, 'w').write('ran')",))


def _resume_warns(world, out, reference, match):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train_sft(cfg_for(world), out, progress=False)
    msgs = [str(x.message) for x in w if "skipped" in str(x.message)]
    assert any(match in m for m in msgs), msgs
    got = weights(out)
    assert all(torch.equal(reference[k], got[k]) for k in reference)  # resumed from step 3: still exact


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "trainer_state.json"])
def test_damaged_latest_checkpoint_is_named_and_the_previous_resumes(world, reference, killed, name):
    f = killed / "checkpoints" / "step_000004" / name
    if name == "trainer_state.json": f.write_text("")
    else: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _resume_warns(world, killed, reference, f"step_000004/{name}")
    assert stage_done(killed)


def test_crafted_pickle_is_never_unpickled(world, reference, killed, tmp_path):
    flag = tmp_path / "PWNED"
    ck4 = killed / "checkpoints" / "step_000004"
    torch.save(Crafted(flag), ck4 / "custom_checkpoint_0.pkl")  # what accelerate would unpickle on load_state
    assert latest_checkpoint(killed / "checkpoints").name == "step_000003"
    # with a forged manifest that lists it, the resume stops at the refused file; nothing ran
    write_manifest(ck4)
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl: refused"):
        train_sft(cfg_for(world), killed, progress=False)
    assert not flag.exists()
    # the same for a replaced RNG state, which accelerate would load (and whose failure it would hide)
    (ck4 / "custom_checkpoint_0.pkl").unlink()
    torch.save(Crafted(flag), ck4 / "random_states_0.pkl"); write_manifest(ck4)
    with pytest.raises(CheckpointError, match="random_states_0.pkl: refused"):
        train_sft(cfg_for(world), killed, progress=False)
    assert not flag.exists()
    # without the forged manifest the tampered checkpoint is passed over and the run resumes exactly from step 3
    (ck4 / "manifest.json").unlink()
    _resume_warns(world, killed, reference, "step_000004/manifest.json: missing")
    assert not flag.exists()


def test_manifest_lists_every_file_and_no_pickled_scheduler(killed):
    ck = killed / "checkpoints" / "step_000004"
    files = json.loads((ck / "manifest.json").read_text())["files"]
    assert set(files) == {p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.name != "manifest.json"}
    assert "custom_state_0.json" in files and not list(ck.glob("custom_checkpoint_*"))
