"""run_feedback under `accelerate launch` (2 CPU processes): each process samples, captions and judges its share of
the prompts; the main process merges the shares in prompt order, the other waits for the merged files."""
import json
import textwrap

import pytest
import torch
from conftest import TINY_LM, launch_two_processes

from vlm_rlaif.encoder import toy_encoder_config
from vlm_rlaif.feedback import FeedbackConfig, select_prompts
from vlm_rlaif.model import ModelConfig, build_model, train_toy_tokenizer
from vlm_rlaif.toyworld import ToyWorldConfig, corpus_texts, make_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SCRIPT = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from vlm_rlaif.feedback import FeedbackConfig, question_text, run_feedback, truth_judge
    from vlm_rlaif.model import video_question
    from vlm_rlaif.toyworld import load_facts
    cfg, out = FeedbackConfig.from_dict(json.loads(open(sys.argv[1]).read())), sys.argv[2]
    recs = json.loads(open(f"{cfg.data_dir}/{cfg.prompts_file}").read())
    gold = {(video_question(question_text(r)), r["video"]): r["conversations"][1]["value"] for r in recs}
    # candidates: the true answer from even seeds, a wrong one from odd seeds (rank r samples with seeds r and r+1,
    # so the better answer is output_1 on rank 0 and output_2 on rank 1); the model captions, the oracle judges
    sampler = lambda s: lambda qs, vs: [gold[(q, v)] if s % 2 == 0 else "There is nothing." for q, v in zip(qs, vs)]
    run_feedback(cfg, out, judge=truth_judge(load_facts(cfg.data_dir), recs), sampler=sampler)
''')


def test_two_process_feedback(tmp_path):
    data = make_dataset(ToyWorldConfig(n_videos=8, seed=5), tmp_path / "data", progress=False)
    enc = toy_encoder_config()
    torch.manual_seed(0)
    build_model(ModelConfig(lm_config=TINY_LM, encoder=enc, lora=None),
                train_toy_tokenizer(corpus_texts(data), vocab_size=300)).save_pretrained(tmp_path / "sft")
    cfg = dict(sft_model_dir=str(tmp_path / "sft"), data_dir=str(data), features_dir=str(tmp_path / "features"),
               encoder=enc.to_dict(), n_prompts=24, max_new_tokens=6, caption_max_new_tokens=6, judge_max_new_tokens=8,
               batch_size=8, max_clip_frames=7, clip_resample=True, val_count=2, progress=False)
    out = tmp_path / "fb"
    launch_two_processes(SCRIPT, cfg, out, tmp_path)
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "done.json").exists() and stats["generated"] == 24
    prompts = [r["id"] for r in select_prompts(FeedbackConfig.from_dict(cfg))]
    shares = [json.loads((out / "shards" / f"{r}-of-2" / "candidates.json").read_text())["ids"] for r in (0, 1)]
    assert shares == [prompts[0::2], prompts[1::2]]  # disjoint halves, together every prompt
    rm = json.loads((out / "rm_train.json").read_text()) + json.loads((out / "rm_val.json").read_text())
    assert len(rm) == stats["kept"] == stats["n_train"] + stats["n_val"] > 0
    ids = [r["id"][:-len("-pair")] for r in rm]
    assert len(set(ids)) == len(ids) and set(ids) <= set(prompts)
    # the oracle judged every kept pair: a record that lost its own verdict in the merge would disagree with the truth
    assert stats["agreement"] == 1.0
    pref = {rank: {rec["preference"] for rec, i in zip(rm, ids) if prompts.index(i) % 2 == rank} for rank in (0, 1)}
    assert pref == {0: {1}, 1: {2}}  # both shares made it into the merged files, each with its own verdicts
    for f in ("rm_train.json", "rm_val.json"):  # each file in prompt order
        fids = [r["id"][:-len("-pair")] for r in json.loads((out / f).read_text())]
        assert fids == sorted(fids, key=prompts.index)
