"""The CLI under `accelerate launch` (2 CPU processes, DeepSpeed ZeRO-2 for SFT): shared stages run in both
processes, the others once in the main process; one writer for markers and timings."""
import json
import textwrap
from pathlib import Path

import pytest
from conftest import launch_two_processes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from vlm_rlaif.cli import main
    args = json.loads(open(sys.argv[1]).read())
    main(["sft", "--config", args["config"], "--out", sys.argv[2], "--quiet", "--set", *args["set"]])
    with open(os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.done"), "w") as f: f.write("ok")
''')


def test_cli_stages_under_accelerate_launch(tmp_path):
    sets = ["toyworld.n_videos=8", "toyworld.qa_per_video=2", "tower_pretrain.steps=4", "sft.max_steps=2",
            "sft.batch_size=2", "sft.save_every=1", "sft.judge_records.pairwise=4", "sft.judge_records.claims=4", "sft.tokenizer_vocab_size=300",
            "model.lm_config.hidden_size=32", "model.lm_config.intermediate_size=64",
            "model.lm_config.num_hidden_layers=1", "model.lm_config.num_attention_heads=2",
            "model.lm_config.num_key_value_heads=2", f"sft.deepspeed_config={REPO / 'configs/deepspeed/zero2.json'}"]
    out = tmp_path / "run"
    launch_two_processes(SCRIPT, {"config": str(REPO / "configs/toy.yaml"), "set": sets}, out, tmp_path, timeout=400)
    assert (out / "rank0.done").exists() and (out / "rank1.done").exists()
    for stage in ("toyworld", "tower", "features", "sft"):
        assert (out / "stages" / f"{stage}.json").exists(), stage
    feats = json.loads((out / "stages" / "features.json").read_text())["summary"]
    assert feats["computed"] + feats["cached"] + feats["failed"] == feats["videos"] == 8  # two shares, all videos
    assert not list((out / "stages").glob(".features.part*"))
    assert set(json.loads((out / "timings.json").read_text())) == {"toyworld", "tower", "features", "sft"}
    done = json.loads((out / "sft" / "done.json").read_text())
    assert done["num_processes"] == 2 and done["steps"] == 2
    ck = sorted((out / "sft" / "checkpoints").iterdir())[-1]
    assert (ck / "pytorch_model").is_dir()  # DeepSpeed's checkpoint layout: ZeRO-2 really ran
