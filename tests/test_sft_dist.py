"A 2-process CPU run of SFT (accelerate launch --multi_gpu, gloo): both ranks train, the model is saved once."
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
    from vlm_rlaif.sft import SFTConfig, make_accelerator, train_sft
    cfg, out = SFTConfig.from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2]
    steps = []
    rank = int(os.environ.get("RANK", -1))
    train_sft(cfg, out, on_step=lambda step, row: steps.append(step), progress=False)
    acc = make_accelerator()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(dict(rank=rank, process_index=acc.process_index, num_processes=acc.num_processes,
                       backend=str(acc.state.backend), steps=steps), f)
    acc.end_training()
''')


def test_two_process_cpu_sft(tmp_path):
    data = make_dataset(ToyWorldConfig(n_videos=8, seed=5), tmp_path / "data", progress=False)
    lm = TINY_LM
    cfg = dict(data_dir=str(data), features_dir=str(tmp_path / "features"), tokenizer_vocab_size=300, batch_size=2,
               gradient_accumulation_steps=2, lr=1e-3, save_every=2, log_every=1, seed=0,
               model=dict(lm_config=lm, encoder=toy_encoder_config().to_dict(), lora=None))
    out = tmp_path / "run"
    launch_two_processes(SCRIPT, cfg, out, tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert ranks[0]["steps"] and ranks[0]["steps"] == ranks[1]["steps"]  # both ranks took every optimizer step
    assert (out / "model" / "vlm_config.json").exists() and (out / "done.json").exists()
    done = json.loads((out / "done.json").read_text())
    assert done["num_processes"] == 2 and done["steps"] == ranks[0]["steps"][-1]
    ck = sorted((out / "checkpoints").iterdir())
    assert ck and {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in ck[-1].iterdir()}
