import os
# No network at test time: a missing weight must fail at once, not retry for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vlm_rlaif.model import TOY_LM_CONFIG

# the smallest toy LM the training tests use (1 layer, width 32)
TINY_LM = dict(TOY_LM_CONFIG, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2)


def rl_world(root) -> dict:
    """A tiny policy-training world under `root` (PPO / GRPO tests): 12 toy videos, the toy tower's feature cache, a
    1-layer SFT model and a reward model built from it (seeded). Returns dict(root, data, enc)."""
    from vlm_rlaif.encoder import FeatureCache, toy_encoder_config
    from vlm_rlaif.model import ModelConfig, build_model, train_toy_tokenizer
    from vlm_rlaif.reward import RewardModel
    from vlm_rlaif.toyworld import ToyWorldConfig, corpus_texts, make_dataset
    import torch
    data = make_dataset(ToyWorldConfig(n_videos=12, seed=5), root / "data", progress=False)
    enc = toy_encoder_config()
    FeatureCache(root / "features", enc)
    tok = train_toy_tokenizer(corpus_texts(data), vocab_size=400)
    torch.manual_seed(0)
    build_model(ModelConfig(lm_config=TINY_LM, encoder=enc, lora=None), tok).save_pretrained(root / "sft")
    RewardModel.from_sft(root / "sft", lora=None, seed=1).save_pretrained(root / "rm" / "model")
    return dict(root=root, data=data, enc=enc)


def rewind_run(full, dest, step: int, model: str = "model"):
    """A copy of the finished run `full` at `dest`, rewound to its step-`step` checkpoint as if killed there: the saved
    model, `done.json` and every later checkpoint removed (resume tests). Returns `dest`."""
    import shutil
    shutil.copytree(full, dest)
    (dest / "done.json").unlink(); shutil.rmtree(dest / model)
    for c in (dest / "checkpoints").iterdir():
        if int(c.name.rsplit("_", 1)[1]) > step: shutil.rmtree(c)
    return dest


def launch_two_processes(script: str, cfg: dict, out, workdir, timeout: int = 280,
                         machines: int = 1) -> subprocess.CompletedProcess:
    """Run `script` (Python source; argv: config JSON path, out dir) in 2 CPU processes with
    `accelerate launch --multi_gpu` (gloo); asserts it exits 0 and returns the finished process (machine 0's).
    `machines=2` simulates two machines on this one: two `accelerate launch` commands started at once,
    `--num_machines 2 --machine_rank {0,1}` with one process each, meeting at 127.0.0.1:<free port> (gloo on the
    loopback interface); `out` is the run directory both "machines" share, as a shared filesystem would be."""
    import json
    assert machines in (1, 2), machines
    workdir = Path(workdir)
    (workdir / "cfg.json").write_text(json.dumps(cfg))
    (workdir / "run.py").write_text(script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", str(machines), "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port)]
    args = [str(workdir / "run.py"), str(workdir / "cfg.json"), str(out)]
    if machines == 1:
        cmds = [cmd + args]
    else:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # the "network" between the two machines is the loopback interface
        cmds = [cmd + ["--machine_rank", str(r), "--main_process_ip", "127.0.0.1"] + args for r in range(machines)]
    logs = [(open(workdir / f"launch{m}.out", "w+"), open(workdir / f"launch{m}.err", "w+")) for m in range(len(cmds))]
    # each launcher leads a process group of its own: ending the group ends its workers too
    procs = [subprocess.Popen(c, env=env, stdout=o, stderr=e, text=True, start_new_session=True)
             for c, (o, e) in zip(cmds, logs)]
    deadline, timed_out, failed = time.time() + timeout, False, []
    try:  # until all have ended; a failed launch ends the other one (it would wait for its peer until the timeout)
        while any(p.poll() is None for p in procs):
            failed = [m for m, p in enumerate(procs) if p.poll() not in (None, 0)]
            timed_out = time.time() > deadline
            if failed or timed_out: break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None: os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers
            p.wait()
    done = []
    for c, p, (o, e) in zip(cmds, procs, logs):
        o.seek(0); e.seek(0)
        done.append(subprocess.CompletedProcess(c, p.returncode, o.read(), e.read()))
        o.close(); e.close()
    for m in failed + [m for m in range(len(done)) if m not in failed]:  # the first to fail first
        p = done[m]
        if p.returncode != 0 or timed_out:  # the workers' own traceback, not the launcher's that follows it
            err = p.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0]
            where = f" (machine {m})" if machines > 1 else ""
            why = f"timed out after {timeout} s" if timed_out else f"exit {p.returncode}"
            raise AssertionError(f"{why}{where}\n{p.stdout[-2000:]}\n{err[-5000:]}")
    return done[0]
