import os
# No network at test time: a missing weight must fail at once, not retry for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import socket
import subprocess
import sys
from pathlib import Path

from vlm_rlaif.model import TOY_LM_CONFIG

# the smallest toy LM the training tests use (1 layer, width 32)
TINY_LM = dict(TOY_LM_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2)


def launch_two_processes(script: str, cfg: dict, out, workdir, timeout: int = 280) -> subprocess.CompletedProcess:
    """Run `script` (Python source; argv: config JSON path, out dir) in 2 CPU processes with
    `accelerate launch --multi_gpu` (gloo); asserts it exits 0 and returns the finished process."""
    import json
    workdir = Path(workdir)
    (workdir / "cfg.json").write_text(json.dumps(cfg))
    (workdir / "run.py").write_text(script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           str(workdir / "run.py"), str(workdir / "cfg.json"), str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:  # the workers' own traceback, not the launcher's that follows it
        err = p.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-2000:]}\n{err[-5000:]}")
    return p
