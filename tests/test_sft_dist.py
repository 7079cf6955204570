"""A 2-process CPU run of SFT (accelerate launch --multi_gpu, gloo): both ranks train, the model is saved once; and the
same run on two simulated machines (two launches, --num_machines 2, one process each) meeting in one run directory."""
import json
import os
import textwrap

import pytest
from conftest import TINY_LM, launch_two_processes

from vlm_rlaif.encoder import toy_encoder_config
from vlm_rlaif.toyworld import ToyWorldConfig, make_dataset

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from vlm_rlaif.sft import SFTConfig, train_sft
    from vlm_rlaif.training import make_accelerator
    cfg, out = SFTConfig.from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2]
    steps = []
    rank = int(os.environ.get("RANK", -1))
    train_sft(cfg, out, on_step=lambda step, row: steps.append(step), progress=False)
    acc = make_accelerator()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, process_index=acc.process_index, num_processes=acc.num_processes,
                       local_rank=acc.local_process_index, node_rank=os.environ.get("GROUP_RANK"),
                       backend=str(acc.state.backend), steps=steps), f)
    # no end_training here: make_accelerator ends the process group at exit, after the stage's DDP wrapper is gone
''')


def sft_cfg(tmp_path) -> dict:
    data = make_dataset(ToyWorldConfig(n_videos=8, seed=5), tmp_path / "data", progress=False)
    return dict(data_dir=str(data), features_dir=str(tmp_path / "features"), tokenizer_vocab_size=300, batch_size=2,
                gradient_accumulation_steps=2, lr=1e-3, save_every=2, log_every=1, seed=0,
                model=dict(lm_config=TINY_LM, encoder=toy_encoder_config().to_dict(), lora=None))


def check_two_rank_run(out):
    "Both ranks took every optimizer step, the main one saved the model and done.json, both wrote their RNG state."
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["steps"] and ranks[0]["steps"] == ranks[1]["steps"]  # both ranks took every optimizer step
    assert (out / "model" / "vlm_config.json").exists() and (out / "done.json").exists()
    done = json.loads((out / "done.json").read_text())
    assert done["num_processes"] == 2 and done["steps"] == ranks[0]["steps"][-1]
    ck = sorted((out / "checkpoints").iterdir())
    assert ck and {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ck[-1].iterdir()}
    return ranks


def test_two_process_cpu_sft(tmp_path):
    out = tmp_path / "run"
    launch_two_processes(SCRIPT, sft_cfg(tmp_path), out, tmp_path)
    check_two_rank_run(out)


def test_two_machine_cpu_sft(tmp_path):
    """Two machines simulated on this one: `accelerate launch --num_machines 2 --machine_rank {0,1}`, one process
    each, started at once and meeting at 127.0.0.1 over gloo; the run directory is the one both see (on real
    machines: a shared filesystem). The SFT stage runs end to end, as in one launch of two processes."""
    out = tmp_path / "run"
    launch_two_processes(SCRIPT, sft_cfg(tmp_path), out, tmp_path, machines=2)
    ranks = check_two_rank_run(out)
    assert [r["local_rank"] for r in ranks] == [0, 0]  # each "machine" runs one process: both are local rank 0
    assert [r["node_rank"] for r in ranks] == ["0", "1"]
