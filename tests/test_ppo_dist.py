"A 2-process CPU run of PPO (accelerate launch, gloo): each rank makes its share of the rollouts, LoRA stays in sync."
import json
import os
import textwrap

import pytest
from conftest import TINY_LM, launch_two_processes
import torch

from vlm_rlaif.encoder import toy_encoder_config
from vlm_rlaif.model import ModelConfig, build_model, train_toy_tokenizer
from vlm_rlaif.toyworld import ToyWorldConfig, corpus_texts, make_dataset

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from vlm_rlaif.model import LoraSettings
    from vlm_rlaif.ppo import PPOConfig, load_policy, train_ppo
    cfg, out = PPOConfig.from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2]
    pol = load_policy(cfg.sft_model_dir, LoraSettings(r=4, alpha=8, dropout=0.0, train_projector=False))
    train_ppo(cfg, out, policy=pol)
    from accelerate import PartialState
    st = PartialState()
    lora = {n: p.detach().double().sum().item() for n, p in pol.named_parameters() if "lora_" in n}
    # whitening over the full batch: each rank whitens its half of one batch, gathering the statistics
    from accelerate.utils import reduce
    from vlm_rlaif.ppo import whiten
    class Acc:  # the two things whiten asks of an accelerator
        num_processes = st.num_processes
        def reduce(self, t, op): return reduce(t, op)
    g = torch.Generator().manual_seed(3)
    x, m = torch.randn(6, 5, generator=g) * 3 + 1, (torch.rand(6, 5, generator=g) > 0.3).long()
    half = slice(3 * st.process_index, 3 * st.process_index + 3)
    w = whiten(x[half], m[half], accelerator=Acc()).tolist()
    with open(os.path.join(out, f"rank{st.process_index}.json"), "w") as f:
        json.dump(dict(process_index=st.process_index, num_processes=st.num_processes, lora=lora, whitened=w,
                       reference=whiten(x, m)[half].tolist()), f)
''')


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_two_process_cpu_ppo(tmp_path):
    from vlm_rlaif.reward import RewardModel
    data = make_dataset(ToyWorldConfig(n_videos=8, seed=5), tmp_path / "data", progress=False)
    enc = toy_encoder_config()
    lm = TINY_LM
    torch.manual_seed(0)
    build_model(ModelConfig(lm_config=lm, encoder=enc, lora=None),
                train_toy_tokenizer(corpus_texts(data), vocab_size=300)).save_pretrained(tmp_path / "sft")
    RewardModel.from_sft(tmp_path / "sft", lora=None, seed=1).save_pretrained(tmp_path / "rm" / "model")
    cfg = dict(sft_model_dir=str(tmp_path / "sft"), reward_model_dir=str(tmp_path / "rm" / "model"),
               prompts=str(data / "train_sft.json"), features_dir=str(tmp_path / "features"), data_root=str(data),
               encoder=enc.to_dict(), lora=dict(r=4, alpha=8, dropout=0.0), num_steps=2, rollout_batch_size=4,
               generation_batch_size=2, minibatch_size=2, max_new_tokens=6, max_prompt_length=512, length_coef=0.0,
               no_eos_penalty=None, lr=1e-3, value_lr=1e-2, save_every=1, progress=False)
    out = tmp_path / "run"
    launch_two_processes(SCRIPT, cfg, out, tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["num_processes"] for r in ranks] == [2, 2]
    for r in ranks:  # the full batch's whitening statistics, not each half's
        torch.testing.assert_close(torch.tensor(r["whitened"]), torch.tensor(r["reference"]), atol=1e-6, rtol=0)
    assert ranks[0]["lora"] == ranks[1]["lora"]  # gradients were averaged: the adapters are identical
    assert any(v != 0 for k, v in ranks[0]["lora"].items() if "lora_B" in k)  # and they trained
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and abs(rows[0]["val/ratio_first"] - 1) < 1e-5
    # global batch sizes: 4 rollouts in minibatches of 2 (1 per process) = 2 updates per epoch, 2 epochs
    assert [r["policy/num_updates"] for r in rows] == [4, 4]
    assert (out / "policy" / "vlm_config.json").exists() and (out / "done.json").exists()
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
