"""Config errors surface before any stage runs, naming the key; a run directory keeps the config it was made with."""
from pathlib import Path

import pytest
import yaml

from vlm_rlaif.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, msg", [
    ("sft.lr=abc", "SFTConfig.lr: expected float, got 'abc'"),
    ("sft.curriculum=flase", "SFTConfig.curriculum: expected bool, got 'flase'"),
    ("ppo.lr=-1", "PPOConfig.lr: must be in (0, inf), got -1"),
    ("sft.save_every=-3", "SFTConfig.save_every: must be in [0, inf), got -3"),
    ("sft.epochs_per_stage=1.7", "SFTConfig.epochs_per_stage: expected int, got 1.7"),
    ("feedback.judge_tol=high", "FeedbackConfig.judge_tol: expected float or null"),
    ("reward.center_coef=-1", "RewardConfig.center_coef: must be in [0, inf)"),
    ("eval.batch_size=0", "EvalConfig.batch_size: must be in [1, inf)"),
    ("dpo.beta=0", "DPOConfig.beta: must be in (0, inf)"),
])
def test_bad_values_fail_before_any_stage(tmp_path, override, msg):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["demo", "--config", str(REPO / "configs/toy.yaml"), "--out", str(out), "--quiet", "--set", override])
    assert msg in str(e.value) and f"`{override.split('.')[0]}`" in str(e.value)
    assert not out.exists()  # no stage ran, nothing was written


def test_changed_config_on_a_finished_run_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("toyworld: {n_videos: 4}\nencoder: {model_name: tiny-vit, pretrained: null, tiny: {}, n_frames: 4}\n"
                   "sft: {lr: 0.001}\nstages: [toyworld, report]\n")
    out = tmp_path / "run"
    assert main(["demo", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    held = (out / "config.yaml").read_text()
    with pytest.raises(SystemExit) as e:
        main(["demo", "--config", str(cfg), "--out", str(out), "--quiet", "--set", "sft.lr=0.002", "toyworld.seed=1"])
    assert "sft.lr: 0.001 -> 0.002" in str(e.value) and "toyworld.seed" in str(e.value)
    assert (out / "config.yaml").read_text() == held  # still what the run holds
    # the same config again, or only another choice of stages: resumes, and config.yaml follows the stages
    assert main(["demo", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert main(["toyworld", "--config", str(cfg), "--out", str(out), "--quiet", "--set", "stages=[toyworld]"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"] == ["toyworld"]
