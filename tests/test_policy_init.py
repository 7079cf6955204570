"""The original's PPO initialisation and models (issue 15, item 7): the policy-init stage (a new LoRA on the SFT model,
PPO's start and reference), a reward model whose backbone is not the policy's, the tokenizer check between them, and
paper_7b.yaml's settings for both."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_LM, rl_world

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
REPO = Path(__file__).resolve().parent.parent
LORA = dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear", train_projector=False)
BIG_LM = dict(TINY_LM, hidden_size=48, intermediate_size=96, num_hidden_layers=2)  # the policy: width 32, 1 layer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return rl_world(tmp_path_factory.mktemp("policy_init"))


def make_run(world, root: Path, **sections):
    """A pipeline run directory over the tiny world: its data, features, SFT model and reward model, as the earlier
    stages would have left them."""
    from vlm_rlaif.pipeline import PipelineConfig, Run
    root.mkdir(parents=True, exist_ok=True)
    for name in ("data", "features"): (root / name).symlink_to(world["root"] / name)
    shutil.copytree(world["root"] / "sft", root / "sft" / "model")
    shutil.copytree(world["root"] / "rm" / "model", root / "reward" / "model")
    cfg = PipelineConfig.from_dict(dict(
        name="t", toyworld=dict(n_videos=12, seed=5), encoder=world["enc"].to_dict(),
        feedback=dict(n_prompts=20), **sections))
    return Run(cfg, root)


PI = dict(lora=LORA, batch_size=4, gradient_accumulation_steps=1, lr=2e-2, max_steps=4, save_every=0, log_every=1,
          mixed_precision="no", max_length=512, warmup_ratio=0.0)
PPO = dict(lora=dict(r=4, alpha=8, dropout=0.0), num_steps=1, rollout_batch_size=4, generation_batch_size=4,
           minibatch_size=2, max_new_tokens=6, max_prompt_length=512, length_coef=0.0, no_eos_penalty=None,
           rm_prompt="none", lr=1e-3, save_every=1, progress=False)


def test_sft_config_lora_needs_a_model_to_put_it_on():
    from vlm_rlaif.sft import SFTConfig
    with pytest.raises(ValueError, match="needs `init_model_dir`"): SFTConfig(lora=LORA)


def test_policy_init_stage_writes_a_peft_adapter_that_ppo_starts_from(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from vlm_rlaif.data import Collator, PromptDataset
    from vlm_rlaif.encoder import FeatureCache
    from vlm_rlaif.feedback import select_prompts
    from vlm_rlaif.model import LoraSettings, VideoLMM
    from vlm_rlaif.pipeline import feedback_config, grpo_config, ppo_config, run_stage, stage_ppo
    from vlm_rlaif.ppo import ValueHead, load_policy, make_rollouts, response_logprobs
    from vlm_rlaif.reward import RewardModel
    run = make_run(world, tmp_path / "run", policy_init=PI, ppo=PPO, grpo=dict(lora=LORA))
    # configured but not run: PPO refuses to start from the SFT model silently
    with pytest.raises(RuntimeError, match="policy_init"): stage_ppo(run, progress=False)

    info = run_stage(run, "policy_init", progress=False)
    out = run.dir("policy_init")
    assert info["steps"] == 4 and (out / "done.json").exists()
    # the toy world has no PPO_init split: records of the training split that no feedback prompt uses
    recs = json.loads((out / "ppo_init.json").read_text())
    used = {r["id"] for r in select_prompts(feedback_config(run))}
    test_ids = {r["id"] for r in json.loads((run.data_dir / "test_sft.json").read_text())}
    train_ids = {r["id"] for r in json.loads((run.data_dir / "train_sft.json").read_text())}
    assert recs and len(used) == 20 and not ({r["id"] for r in recs} & (used | test_ids))
    assert {r["id"] for r in recs} == train_ids - used

    # the artifact: the SFT weights whole (lm/) and the new LoRA as a PEFT adapter, loadable without this library
    model_dir = out / "model"
    ad = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    assert ad["r"] == 4 and ad["peft_type"] == "LORA"
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir / "lm"), model_dir / "adapter")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in plain.named_parameters())  # the adapter trained
    sft = VideoLMM.from_pretrained(run.dir("sft") / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir / "lm").state_dict()
    assert all(torch.equal(base[k], v) for k, v in sft.lm.state_dict().items() if k in base)  # the LM under it: SFT's

    # PPO and GRPO start from it, and it is their reference
    assert ppo_config(run).sft_model_dir == grpo_config(run).sft_model_dir == str(model_dir)
    init = VideoLMM.from_pretrained(model_dir)
    cfg = ppo_config(run)
    pol = load_policy(cfg.sft_model_dir, LoraSettings(**{**cfg.lora, "train_projector": False}))
    rm = RewardModel.from_pretrained(run.dir("reward") / "model")
    feats = FeatureCache(run.features_dir, world["enc"])
    ds = PromptDataset(json.loads((run.data_dir / "train_sft.json").read_text())[:4], pol.tokenizer, feats,
                       root=run.data_dir, max_length=512)
    batch = Collator(pol.tokenizer.pad_token_id, padding_side="left")([ds[i] for i in range(4)])
    torch.manual_seed(0)
    roll = make_rollouts(pol, rm, ValueHead(rm.config.hidden_size), batch, [[]] * 4, cfg)
    args = (roll["prompt_ids"], roll["prompt_mask"], roll["video_feats"], roll["responses"], roll["mask"])
    with torch.no_grad():
        lp_init, lp_sft = response_logprobs(init, *args), response_logprobs(sft, *args)
    m = roll["mask"].bool()
    torch.testing.assert_close(roll["logp"][m], lp_init[m], atol=1e-5, rtol=0)      # the first rollout's policy ...
    torch.testing.assert_close(roll["ref_logp"][m], lp_init[m], atol=1e-5, rtol=0)  # ... and reference: policy-init
    assert (lp_init - lp_sft)[m].abs().max() > 1e-3  # which is not the SFT model

    stage_ppo(run, progress=False)  # the stage itself runs from it
    row = json.loads((run.dir("ppo") / "metrics.jsonl").read_text().splitlines()[0])
    assert row["objective/kl"] == 0.0 and abs(row["val/ratio_first"] - 1) < 1e-5


def test_without_a_policy_init_section_ppo_starts_from_sft(world, tmp_path):
    from vlm_rlaif.pipeline import ppo_config, run_stage
    run = make_run(world, tmp_path / "run")
    assert ppo_config(run).sft_model_dir == str(run.dir("sft") / "model")
    assert run_stage(run, "policy_init", progress=False) == dict(skipped="no policy_init section")


def rm_records(world, path):
    from vlm_rlaif.data import save_records
    from vlm_rlaif.reward import toy_preference_records
    return save_records(toy_preference_records(world["data"], "train", n=8, seed=0), path)


def rm_cfg(world, tmp_path, **kw):
    from vlm_rlaif.reward import RewardConfig
    f = rm_records(world, tmp_path / "pairs.json")
    return RewardConfig(**{**dict(sft_model_dir=str(world["root"] / "sft"), train_file=str(f), val_file=str(f),
                                  data_root=str(world["data"]), features_dir=str(world["root"] / "features"),
                                  encoder=world["enc"].to_dict(), lora=None, lr=5e-3, warmup_ratio=0.0, batch_size=4,
                                  epochs=50, max_steps=12, save_every=0, reward_prompt=" Rate it:{context}",
                                  progress=False), **kw})


def test_reward_model_with_its_own_backbone_trains_scores_and_sizes_the_value_head(world, tmp_path):
    from vlm_rlaif.model import VideoLMM
    from vlm_rlaif.ppo import PPOConfig, train_ppo
    from vlm_rlaif.reward import RewardModel, check_same_tokenizer
    from vlm_rlaif.training import read_metrics
    out = rm_cfg(world, tmp_path, model=dict(lm_config=BIG_LM))
    from vlm_rlaif.reward import train_reward
    train_reward(out, tmp_path / "rm")
    rm = RewardModel.from_pretrained(tmp_path / "rm" / "model")
    pol = VideoLMM.from_pretrained(world["root"] / "sft")
    assert (rm.config.hidden_size, rm.config.num_hidden_layers) == (48, 2) != (pol.config.hidden_size, pol.config.num_hidden_layers)
    check_same_tokenizer(pol.tokenizer, rm.tokenizer)
    bt = [r["bt"] for r in read_metrics(tmp_path / "rm") if "bt" in r]
    assert len(bt) == 12 and bt[-1] < bt[0]  # it trains
    assert json.loads((tmp_path / "rm" / "eval.json").read_text())["n"] == 8  # and scores
    # PPO against it: the value head is sized by the RM, not the policy
    cfg = PPOConfig.from_dict(dict(PPO, sft_model_dir=str(world["root"] / "sft"), reward_model_dir=str(tmp_path / "rm" / "model"),
                                   prompts=str(world["data"] / "train_sft.json"), features_dir=str(world["root"] / "features"),
                                   data_root=str(world["data"]), encoder=world["enc"].to_dict()))
    ppo = train_ppo(cfg, tmp_path / "ppo")
    assert load_file(ppo / "value_head.safetensors")["linear.weight"].shape == (1, 48)


def test_reward_model_backbone_settings_are_checked():
    from vlm_rlaif.reward import RewardConfig
    from vlm_rlaif.encoder import toy_encoder_config
    with pytest.raises(ValueError, match="model.lora"): RewardConfig(model=dict(lm_config=BIG_LM, lora=LORA))
    with pytest.raises(ValueError, match="unknown keys"): RewardConfig(model=dict(lm_cfg=BIG_LM))
    with pytest.raises(ValueError, match="model.encoder differs"):
        RewardConfig(model=dict(lm_config=BIG_LM, encoder=toy_encoder_config().to_dict()))  # RewardConfig.encoder: CLIP's


def alien_lm(root: Path) -> Path:
    "A tiny pretrained-style LM directory whose tokenizer is not the policy's."
    from transformers import AutoModelForCausalLM, LlamaConfig
    from vlm_rlaif.model import train_toy_tokenizer
    tok = train_toy_tokenizer(["A green triangle moves up.", "How many squares are there?"] * 3, vocab_size=300)
    AutoModelForCausalLM.from_config(LlamaConfig(**{**TINY_LM, "vocab_size": len(tok)})).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_tokenizer_mismatch_is_a_clear_error(world, tmp_path):
    from vlm_rlaif.model import ModelConfig
    from vlm_rlaif.ppo import PPOConfig, train_ppo
    from vlm_rlaif.reward import RewardModel, train_reward
    lm = alien_lm(tmp_path / "alien")
    with pytest.raises(ValueError, match=r"the reward model \(.*alien\)'s tokenizer differs from the SFT model"):
        train_reward(rm_cfg(world, tmp_path, model=dict(lm_name_or_path=str(lm))), tmp_path / "rm")
    assert not (tmp_path / "rm" / "model").exists()
    # an RM made elsewhere with another tokenizer: PPO refuses it before any rollout
    RewardModel.from_config(ModelConfig(lm_name_or_path=str(lm), encoder=world["enc"], lora=None)).save_pretrained(tmp_path / "arm")
    cfg = PPOConfig.from_dict(dict(PPO, sft_model_dir=str(world["root"] / "sft"), reward_model_dir=str(tmp_path / "arm"),
                                   prompts=str(world["data"] / "train_sft.json"), features_dir=str(world["root"] / "features"),
                                   data_root=str(world["data"]), encoder=world["enc"].to_dict()))
    with pytest.raises(ValueError, match=r"the reward model \(.*arm\)'s tokenizer differs from the policy \(.*sft\)'s"):
        train_ppo(cfg, tmp_path / "ppo")


def test_ppo_refuses_a_reward_model_of_other_video_features(world, tmp_path):
    from transformers import AutoTokenizer
    from vlm_rlaif.encoder import toy_encoder_config
    from vlm_rlaif.model import ModelConfig
    from vlm_rlaif.ppo import PPOConfig, train_ppo
    from vlm_rlaif.reward import RewardModel
    tok = AutoTokenizer.from_pretrained(world["root"] / "sft")
    RewardModel.from_config(ModelConfig(lm_config=TINY_LM, encoder=toy_encoder_config(n_frames=8), lora=None),
                            tok).save_pretrained(tmp_path / "rm8")
    cfg = PPOConfig.from_dict(dict(PPO, sft_model_dir=str(world["root"] / "sft"), reward_model_dir=str(tmp_path / "rm8"),
                                   prompts=str(world["data"] / "train_sft.json"), features_dir=str(world["root"] / "features"),
                                   data_root=str(world["data"]), encoder=world["enc"].to_dict()))
    with pytest.raises(ValueError, match=r"other video features .*'n_frames': \(8, 16\)"): train_ppo(cfg, tmp_path / "ppo")


def test_paper_config_names_the_original_init_and_models():
    from vlm_rlaif.pipeline import check_config, load_config
    cfg = load_config(REPO / "configs" / "paper_7b.yaml")
    c = check_config(cfg)
    assert cfg.stages.index("policy_init") < cfg.stages.index("ppo")
    pi = c["policy_init"]
    assert (pi.lora["r"], pi.curriculum, Path(pi.train_files[0]).name) == (64, False, "PPO_init.json")
    assert pi.init_model_dir.endswith("sft/model")
    assert c["ppo"].sft_model_dir == c["grpo"].sft_model_dir == str(Path(c["policy_init"].features_dir).parent / "policy_init" / "model")
    rm = c["reward"]
    assert "13b" in rm.backbone_config().lm_name_or_path and "7b" in cfg.model["lm_name_or_path"]
    assert rm.backbone_config().encoder.to_dict() == rm.encoder  # the RM reads the run's features
    assert rm.lr_scheduler == "constant_with_warmup" and rm.lora.dropout == 0.0
    # the toy demo does not run it: PPO starts from SFT there
    toy = load_config(REPO / "configs" / "toy.yaml")
    assert toy.policy_init is None and "policy_init" not in toy.stages
    assert check_config(toy)["ppo"].sft_model_dir.endswith("sft/model")


def test_runs_made_before_the_policy_init_section_stay_resumable(tmp_path):
    import yaml
    from vlm_rlaif.pipeline import check_run_config, load_config
    cfg = load_config(REPO / "configs" / "toy.yaml")
    old = cfg.to_dict(); old.pop("policy_init")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    check_run_config(cfg, tmp_path)  # no "changed keys" error
