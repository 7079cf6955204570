"bench/toy_rl_compare.py: one sampling budget for every method, DPO beside them, and the seed intervals."
import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("toy_rl_compare", ROOT / "bench" / "toy_rl_compare.py")
rc = importlib.util.module_from_spec(spec); spec.loader.exec_module(rc)

from vlm_rlaif.pipeline import Run, load_config


def args(**kw):
    a = dict(steps=7, batch=16, group=4, minibatch=None, max_new_tokens=24, save_every=5, set=[])
    return argparse.Namespace(**{**a, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run(load_config(ROOT / "configs" / "toy.yaml"), tmp_path_factory.mktemp("run"), create=False)


def test_every_sampling_method_gets_the_same_budget(run):
    for m in ("ppo", "grpo", "rloo"):
        c = rc.method_config(run, m, args(), seed=3)
        assert (c.num_steps, c.rollout_batch_size, c.max_new_tokens, c.minibatch_size, c.seed) == (7, 16, 24, 8, 3), m
    g, r = rc.method_config(run, "grpo", args(), 0), rc.method_config(run, "rloo", args(), 0)
    assert (g.advantage, g.group_size, r.advantage, r.kl_in) == ("grpo", 4, "rloo", "reward")


def test_dpo_trains_on_the_runs_preferences_with_the_seed(run):
    c = rc.method_config(run, "dpo", args(set=["dpo.epochs=1", "ppo.lr=1.0"]), seed=5)
    assert c.seed == 5 and c.epochs == 1 and c.train_file.endswith("rm_train.json")
    assert rc.method_config(run, "ppo", args(set=["dpo.epochs=1", "ppo.lr=1.0"]), 0).lr == 1.0
    with pytest.raises(ValueError, match="METHOD"):
        rc.method_config(run, "dpo", args(set=["epochs=1"]), 0)


def test_interval_is_a_t_interval_over_seeds():
    i = rc.interval([1.0, 2.0, 3.0])
    assert i["mean"] == pytest.approx(2.0) and i["half_width"] == pytest.approx(4.303 / 3 ** 0.5, rel=1e-3)
    assert rc.interval([2.5])["half_width"] is None


def test_table_leaves_what_dpo_does_not_have_empty():
    g = {"mean_criterion": rc.interval([0.1, 0.2]), "correctness": rc.interval([0.0, 0.1])}
    s = dict(dpo=dict(gain_over_sft=g, train_seconds=rc.interval([60.0, 62.0])),
             ppo=dict(gain_over_sft=g, rm_score_last=rc.interval([0.3, 0.5]), kl_last=rc.interval([0.1, 0.2])))
    rows = rc.table(s, ["ppo", "dpo"]).splitlines()
    dpo = [c.strip() for c in rows[3].split("|")[1:-1]]
    assert dpo[0] == "dpo" and dpo[1].startswith("+0.150 ±") and dpo[4] == dpo[5] == "–" and dpo[7] == "61 ± 13"
    assert [c.strip() for c in rows[2].split("|")[1:-1]][4].startswith("+0.400")


def test_curve_reads_the_rl_steps_and_nothing_for_dpo(tmp_path):
    import json
    rows = [{"step": 1, "objective/kl": 0.0, "objective/scores": 0.5, "objective/kl_k3": 0.0, "objective/monitor": 2.0,
             "val/response_length": 9.0}, {"step": 2, "lr": 1e-4}, {"step": 2, "objective/kl": 0.1, "objective/scores": 0.7,
             "objective/kl_k3": 0.02, "val/response_length": 11.0}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    c = rc.curve(tmp_path / "m.jsonl")
    assert c["step"] == [1, 2] and c["rm_score"] == [0.5, 0.7] and c["gold"] == [2.0, None] and c["length"] == [9.0, 11.0]
    (tmp_path / "dpo.jsonl").write_text(json.dumps({"step": 1, "loss": 0.6}))
    assert rc.curve(tmp_path / "dpo.jsonl") == {} and rc.curve(tmp_path / "missing.jsonl") == {}


def test_reward_model_info_says_who_labelled_and_how_right_it_is(tmp_path):
    import json
    r = Run(load_config(ROOT / "configs" / "toy.yaml", ["feedback.judge=oracle"]), tmp_path, create=False)
    assert rc.reward_model_info(r) == dict(judge="oracle", n_val=None, accuracy=None, truth_accuracy=None)  # not trained yet
    r.dir("reward").mkdir(parents=True, exist_ok=True)
    (r.dir("reward") / "eval.json").write_text(json.dumps(dict(accuracy=0.5, n=100, truth_accuracy=0.5, margins=[0.1])))
    assert rc.reward_model_info(r) == dict(judge="oracle", n_val=100, accuracy=0.5, truth_accuracy=0.5)
