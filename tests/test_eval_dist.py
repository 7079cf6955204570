"""evaluate_model under `accelerate launch` (2 CPU processes): each process answers its share of the questions, the
main process merges and judges; the scores equal those of a single-process run with the same answers."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import launch_two_processes

from vlm_rlaif import evaluate as ev
from vlm_rlaif import toyworld as tw

SCRIPT = textwrap.dedent('''
    import json, os, sys
    from vlm_rlaif import evaluate as ev
    args, out = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    cfg = ev.EvalConfig(data_dir=args["data"], split="test", batch_size=3, progress=False)
    items = {x["id"]: x for x in ev.toy_items(args["data"], "test")}
    seen = []
    def answer(recs):  # right on even-numbered items, a fixed wrong answer on the others
        seen.extend(r["id"] for r in recs)
        return [items[r["id"].rsplit("#", 1)[0]]["answer"] if sorted(items).index(r["id"].rsplit("#", 1)[0]) % 2 == 0
                else "There is nothing here." for r in recs]
    ev.evaluate_model(cfg, out, answer_fn=answer)
    with open(os.path.join(out, f"asked{os.environ.get('RANK', 0)}.json"), "w") as f: json.dump(seen, f)
''')


def test_two_process_eval_matches_one(tmp_path):
    data = tw.make_dataset(tw.ToyWorldConfig(n_videos=12, splits={"train": 0.5, "val": 0.25, "test": 0.25}),
                           tmp_path / "toy", progress=False)
    out = tmp_path / "two"
    launch_two_processes(SCRIPT, {"data": str(data)}, out, tmp_path)
    items = ev.toy_items(data, "test")
    asked = [json.loads((out / f"asked{r}.json").read_text()) for r in (0, 1)]
    assert asked[0] and asked[1] and not set(asked[0]) & set(asked[1])  # each question asked once, by one process
    preds = ev.read_jsonl(out / "predictions.jsonl")
    assert sorted(p["id"] for p in preds) == sorted(x["id"] for x in items)
    assert not list(out.glob("predictions.*-of-2.*"))  # shares merged and removed
    # the same script in one plain process: the same scores
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "cfg.json"), str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    two, one = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("two", "one"))
    assert two["criteria"] == one["criteria"] and two["qa"] == one["qa"] and 0 < two["qa"]["accuracy"] < 1
