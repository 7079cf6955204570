"Curriculum SFT: exact kill-and-resume, the NaN guard, bad configs, stage markers and the training runtime it uses."
import json
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from vlm_rlaif.encoder import toy_encoder_config
from vlm_rlaif.model import VideoLMM
from vlm_rlaif.sft import SFTConfig, train_sft
from vlm_rlaif.training import (NonFiniteLossError, check_finite, generate_answers, latest_checkpoint, read_metrics,
                                stage_done)
from vlm_rlaif.toyworld import ToyWorldConfig, make_dataset
from conftest import TINY_LM

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    "A tiny toy world (8 videos) and a features folder, shared by the tests of this file."
    root = tmp_path_factory.mktemp("sft_world")
    return make_dataset(ToyWorldConfig(n_videos=8, seed=3), root / "data", progress=False), root / "features"


def cfg_for(world, **kw):
    data, feats = world
    base = dict(data_dir=str(data), features_dir=str(feats), tokenizer_vocab_size=300, batch_size=4,
                gradient_accumulation_steps=2, lr=1e-3, warmup_ratio=0.1, save_every=2, log_every=1, seed=0,
                model=dict(lm_config=TINY_LM, encoder=toy_encoder_config().to_dict(),
                           lora=dict(r=4, alpha=8, dropout=0.1, train_projector=True)))
    return SFTConfig(**{**base, **kw})


class Kill(Exception):
    pass


def killer(at):
    def f(step, row):
        if step == at: raise Kill(f"killed after step {at}")
    return f


def weights(run):
    m = VideoLMM.from_pretrained(run / "model")
    return {**{f"lm.{k}": v for k, v in m.lm.state_dict().items()}, **{f"p.{k}": v for k, v in m.projector.state_dict().items()}}


@pytest.fixture(scope="session")
def reference(world, tmp_path_factory):
    "An uninterrupted run (LoRA with dropout: the resumed run must also restore the RNG)."
    out = tmp_path_factory.mktemp("sft_ref") / "run"
    return train_sft(cfg_for(world), out, progress=False)


@pytest.mark.parametrize("kill_at,save_every", [(3, 2), (4, 1)])  # mid-epoch resume; resume at a stage boundary
def test_kill_and_resume_gives_the_same_weights(world, reference, tmp_path, kill_at, save_every):
    cfg = cfg_for(world, save_every=save_every)
    out = tmp_path / "run"
    with pytest.raises(Kill):
        train_sft(cfg, out, on_step=killer(kill_at), progress=False)
    assert not stage_done(out) and not (out / "model").exists()
    ck = latest_checkpoint(out / "checkpoints")
    assert ck is not None and json.loads((ck / "trainer_state.json").read_text())["step"] <= kill_at
    train_sft(cfg, out, progress=False)
    assert stage_done(out)
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows, ref_rows = read_metrics(out), read_metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # no doubled steps after the resume
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-6)


def test_run_layout_and_stages(reference):
    for name in ("model/vlm_config.json", "metrics.jsonl", "done.json", "sft_config.json", "tokenizer/tokenizer.json"):
        assert (reference / name).exists(), name
    assert any((reference / "tb").iterdir())
    rows = read_metrics(reference)
    names = [r["stage_name"] for r in rows]
    assert names[0] == "easy" and names[-1] == "hard" and names == sorted(names)  # easy steps all before hard ones
    last_easy = [r for r in rows if r["stage_name"] == "easy"][-1]
    first_hard = [r for r in rows if r["stage_name"] == "hard"][0]
    assert first_hard["lr"] > last_easy["lr"]  # schedule='per_stage': warm-up and cosine restart with the hard stage
    done = json.loads((reference / "done.json").read_text())
    assert done["steps"] == rows[-1]["step"] and set(done["stages"]) == {"easy", "hard"}
    t = time.time()
    assert train_sft(SFTConfig(), reference) == reference  # done.json: returns before even reading the config's inputs
    assert time.time() - t < 2


def test_no_curriculum_and_budget(world, tmp_path):
    out = train_sft(cfg_for(world, curriculum=False, max_steps=3, save_every=0, model=dict(
        lm_config=TINY_LM, encoder=toy_encoder_config().to_dict(), lora=None)), tmp_path / "mixed", progress=False)
    rows = read_metrics(out)
    assert {r["stage_name"] for r in rows} == {"mixed"} and rows[-1]["step"] == 3
    assert latest_checkpoint(out / "checkpoints") is None


def test_joint_schedule_decays_across_stages(world, tmp_path):
    out = train_sft(cfg_for(world, schedule="joint", save_every=0, model=dict(
        lm_config=TINY_LM, encoder=toy_encoder_config().to_dict(), lora=None)), tmp_path / "joint", progress=False)
    lrs = [r["lr"] for r in read_metrics(out)]
    peak = lrs.index(max(lrs))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:])) and lrs[-1] < 0.2 * lrs[peak]
    with pytest.raises(ValueError, match="schedule"):
        SFTConfig(schedule="linear")


def test_nan_loss_names_the_step_and_writes_no_checkpoint(world, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = VideoLMM.forward

    def bad_forward(self, *a, **kw):
        out = forward(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:  # the first micro-batch of optimizer step 2 (accumulation 2)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VideoLMM, "forward", bad_forward)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="step 2") as e:
        train_sft(cfg_for(world, save_every=1), out, progress=False)
    assert e.value.step == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000001"]
    assert not stage_done(out)
    with pytest.raises(NonFiniteLossError, match="step 5"):
        check_finite(torch.tensor(float("inf")), 5)


def test_bad_config(world, tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        SFTConfig.from_dict({"learning_rate": 1e-4})
    with pytest.raises(ValueError, match="not both"):
        SFTConfig(model={"lm_config": TINY_LM}, init_model_dir="somewhere")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        SFTConfig(gradient_accumulation_steps=0)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        train_sft(cfg_for(world, train_files=["missing.json"]), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="features_dir"):
        train_sft(cfg_for(world, features_dir=None), tmp_path / "b", progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "video": "videos/toy_00000.mp4",
                                "conversations": [{"from": "human", "value": "<image>\nQ?"}]}]))
    with pytest.raises(ValueError, match="bad.json.*record 0"):
        train_sft(cfg_for(world, extra_records=[str(bad)]), tmp_path / "c", progress=False)


def test_generate_answers_is_batch_invariant(world, reference):
    data, feats = world
    from vlm_rlaif.encoder import FeatureCache
    model = VideoLMM.from_pretrained(reference / "model")
    recs = json.loads((data / "test_sft.json").read_text())[:5]
    fc = FeatureCache(feats, model.cfg.encoder)
    a = generate_answers(model, recs, fc, root=data, batch_size=5, max_new_tokens=6)
    b = generate_answers(model, recs, fc, root=data, batch_size=2, max_new_tokens=6)
    assert a == b and len(a) == 5


def test_a_second_writer_is_refused(world, tmp_path):
    import socket
    from vlm_rlaif.training import RunLockedError
    out = tmp_path / "locked"
    out.mkdir()
    (out / ".lock").write_text(f"{socket.gethostname()}:{os.getppid()}")  # a live process holds the run
    with pytest.raises(RunLockedError, match="another run"):
        train_sft(cfg_for(world, max_steps=1), out, progress=False)
    (out / ".lock").unlink()
    train_sft(cfg_for(world, max_steps=1, save_every=0), out, progress=False)
    assert stage_done(out) and not (out / ".lock").exists()


def test_text_warmup_runs_once_before_sft_and_resume_is_exact(world, tmp_path):
    "The toy LM's text warm-up runs on a fresh start only; a run killed during SFT resumes to the same weights."
    kw = dict(model=dict(lm_config=TINY_LM, encoder=toy_encoder_config().to_dict(), lora=None), text_warmup_steps=4)
    ref = train_sft(cfg_for(world, **kw), tmp_path / "ref", progress=False)
    log = json.loads((ref / "text_warmup.json").read_text())
    assert log["steps"] == 4 and len(log["losses"]) == 4
    with pytest.raises(Kill):
        train_sft(cfg_for(world, **kw), tmp_path / "killed", on_step=killer(3), progress=False)
    (tmp_path / "killed" / "text_warmup.json").unlink()
    run = train_sft(cfg_for(world, **kw), tmp_path / "killed", progress=False)
    assert not (run / "text_warmup.json").exists()  # resumed from the step-2 checkpoint: no second warm-up
    a, b = weights(ref), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="text_warmup_steps"):
        cfg_for(world, text_warmup_steps=-1)


def _rec(i, answer, **kw):
    return dict(id=f"r{i}", video="v.mp4", conversations=[{"from": "human", "value": "<image>\nQ?"},
                                                         {"from": "gpt", "value": answer}], **kw)


def test_curriculum_stages_are_the_files(tmp_path):
    "The paper's stages are its files: a short answer in SFT_long.json is hard, a long one in SFT_short.json easy."
    from vlm_rlaif.sft import load_sft_records, sft_stages
    long_ans = " ".join(["word"] * 40)
    (tmp_path / "SFT_short.json").write_text(json.dumps([_rec(0, long_ans), _rec(1, "Red.")]))
    (tmp_path / "SFT_long.json").write_text(json.dumps([_rec(2, "Yes."), _rec(3, long_ans, difficulty="easy")]))
    import yaml
    paper = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "configs", "paper_7b.yaml")))["sft"]
    cfg = SFTConfig.from_dict({**paper, "data_dir": str(tmp_path), "deepspeed_config": None})
    stages = {n: [r["id"] for r in rs] for n, rs in sft_stages(load_sft_records(cfg), threshold=cfg.curriculum_threshold)}
    assert stages == {"easy": ["r0", "r1", "r3"], "hard": ["r2"]}  # r3's own label wins over its file
    # with the file mapping off, the word count decides again
    cfg = SFTConfig.from_dict({**paper, "data_dir": str(tmp_path), "deepspeed_config": None, "file_stages": {}})
    stages = {n: [r["id"] for r in rs] for n, rs in sft_stages(load_sft_records(cfg))}
    assert stages == {"easy": ["r1", "r2", "r3"], "hard": ["r0"]}


def test_resume_in_a_later_epoch_gives_the_same_weights(world, tmp_path):
    "Killed at an epoch boundary and inside epoch 2: accelerate's loader must be told the epoch, not only the sampler."
    cfg = cfg_for(world, curriculum=False, epochs_per_stage=2, save_every=1, model=dict(
        lm_config=TINY_LM, encoder=toy_encoder_config().to_dict(), lora=None))
    full = train_sft(cfg, tmp_path / "full", progress=False)
    rows = read_metrics(full)
    first_of_epoch2 = min(r["step"] for r in rows if r["epoch"] > 1)  # epoch = passes done, fractional
    assert first_of_epoch2 >= 2 and rows[-1]["step"] > first_of_epoch2  # epoch 2 has at least two steps
    for kill_at in (first_of_epoch2 - 1, first_of_epoch2):  # the end of epoch 1; one step into epoch 2
        out = tmp_path / f"run{kill_at}"
        with pytest.raises(Kill):
            train_sft(cfg, out, on_step=killer(kill_at), progress=False)
        train_sft(cfg, out, progress=False)
        a, b = weights(full), weights(out)
        for k in a:
            assert torch.equal(a[k], b[k]), (kill_at, k)
        assert [r["loss"] for r in read_metrics(out)] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
