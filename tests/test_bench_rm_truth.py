"bench/toy_rm_truth.py: the interval it reports and the errors it gives before any work."
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("toy_rm_truth", ROOT / "bench" / "toy_rm_truth.py")
rt = importlib.util.module_from_spec(spec); spec.loader.exec_module(rt)


def test_interval_is_wilson_and_stays_in_0_1():
    i = rt.interval95(50, 100)
    assert i["accuracy"] == 0.5 and i["n"] == 100
    assert i["low"] == pytest.approx(0.4038, abs=1e-3) and i["high"] == pytest.approx(0.5962, abs=1e-3)
    edge = rt.interval95(20, 20)  # all right: the interval still has width, below 1
    assert edge["accuracy"] == 1.0 and 0.8 < edge["low"] < 1.0 and edge["high"] == pytest.approx(1.0)
    assert rt.interval95(0, 0)["accuracy"] is None


def test_a_run_without_a_reward_model_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(FileNotFoundError, match="sft/model"):
        rt._run(tmp_path)
