"""Data errors name the file and the record in every stage, and a corrupt video is named by the features stage."""
import json
import shutil

import pytest

from vlm_rlaif.data import DataError
from vlm_rlaif.pipeline import PipelineConfig, run_pipeline

TINY = dict(name="t", toyworld=dict(n_videos=6, seed=1), encoder=dict(model_name="tiny-vit", pretrained=None, tiny={}, n_frames=4),
            stages=["toyworld", "features"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("data_errors") / "run"
    run_pipeline(PipelineConfig.from_dict(TINY), d, progress=False)
    return d


@pytest.fixture
def run_dir(base, tmp_path):
    d = tmp_path / "run"; shutil.copytree(base, d); return d


@pytest.mark.parametrize("stage", ["sft", "feedback", "eval"])
def test_invalid_json_names_file_and_line(run_dir, stage):
    f = run_dir / "data" / "train_sft.json"
    f.write_text(f.read_text()[:-40])  # truncated
    cfg = PipelineConfig.from_dict({**TINY, "stages": ["toyworld", "features", stage]})
    with pytest.raises(DataError, match=r"train_sft\.json.*line \d+.*invalid JSON"):
        run_pipeline(cfg, run_dir, progress=False)


def test_record_without_video_names_file_and_record(run_dir):
    f = run_dir / "data" / "train_sft.json"
    recs = json.loads(f.read_text()); del recs[2]["video"]; f.write_text(json.dumps(recs))
    cfg = PipelineConfig.from_dict({**TINY, "stages": ["toyworld", "features", "sft"]})
    with pytest.raises(DataError, match=rf"train_sft\.json.*record 2.*missing key 'video'.*{recs[2]['id']}"):
        run_pipeline(cfg, run_dir, progress=False)


def test_corrupt_video_is_named_by_the_features_stage(run_dir):
    test = json.loads((run_dir / "data" / "test_sft.json").read_text())[0]["video"]
    shutil.rmtree(run_dir / "features"); (run_dir / "stages" / "features.json").unlink()
    (run_dir / "data" / test).write_bytes(b"not a video at all")
    with pytest.warns(UserWarning, match=rf"features: 1 video\(s\) could not be read.*{test}"):
        res = run_pipeline(PipelineConfig.from_dict(TINY), run_dir, progress=False)
    assert res["features"]["failed"] == 1 and res["features"]["failed_videos"] == [test]
    held = json.loads((run_dir / "stages" / "features.json").read_text())["summary"]
    assert held["failed_videos"] == [test]
