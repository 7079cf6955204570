"Tests of vlm_rlaif.evaluate: readers, prompts, reply parsing, the three judges, resumable evaluation, comparison."
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from vlm_rlaif import evaluate as ev
from vlm_rlaif import toyworld as tw

torch.set_num_threads(1)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    cfg = tw.ToyWorldConfig(n_videos=12, splits={"train": 0.5, "val": 0.25, "test": 0.25})
    return tw.make_dataset(cfg, tmp_path_factory.mktemp("toy"), progress=False)


@pytest.fixture(scope="session")
def toy_items(toy_data):
    return ev.toy_items(toy_data, "test")


SWAP = {"red": "blue", "blue": "green", "green": "yellow", "yellow": "white", "white": "red", "left": "right",
        "right": "left", "up": "down", "down": "up", "first": "second", "second": "first", "yes": "no", "no": "yes"}


def corrupt(text): return re.sub(r"\b(\w+)\b", lambda m: SWAP.get(m.group(1).lower(), m.group(1)), text)


def answerer(items, fn=lambda it: it["answer"], calls=None):
    "A stand-in model: answers each question record with fn(item) (the item found from the record id)."
    ref = {x["id"]: x for x in items}
    def answer(recs):
        if calls is not None: calls.append([r["id"] for r in recs])
        return [fn(ref[r["id"].rsplit("#", 1)[0]]) for r in recs]
    return answer


class Chat(BaseHTTPRequestHandler):
    "A chat-completions endpoint replaying `script`: (status, content) or ('sleep', seconds) per request."
    script, seen, lock = [], [], threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with Chat.lock:
            Chat.seen.append(dict(path=self.path, auth=self.headers.get("Authorization"), body=body))
            step = Chat.script.pop(0) if Chat.script else None
        if step is None:  # default: a good reply; QA prompts get a yes/no too
            user = body["messages"][1]["content"]
            step = (200, "{'pred': 'yes', 'score': 5}" if "'pred'" in user else "{'score': 3}")
        if step[0] == "sleep": time.sleep(step[1]); step = (200, "{'score': 2}")
        status, content = step
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}) if status == 200 else "err"
        self.send_response(status); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out.encode())

    def log_message(self, *a): pass


@pytest.fixture()
def chat_server(monkeypatch):
    Chat.script, Chat.seen = [], []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Chat)
    th = threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True); th.start()
    monkeypatch.setenv("EVAL_TEST_KEY", "sk-local")
    yield f"http://127.0.0.1:{srv.server_port}/v1"
    srv.shutdown(); srv.server_close()


def oj(url, **kw):
    return ev.OpenAIJudge(url, model="judge-x", api_key_env="EVAL_TEST_KEY", backoff=0.01, **kw)


GEN = ev.make_item("v_a_0", "generic", "v_a", "What is the man doing?", "Juggling three balls.")
QA = ev.make_item("7", "qa", "video7", "what is running?", "dog")


# ---------------------------------------------------------------- readers
def dump(path, obj): path.write_text(json.dumps(obj)); return path


def test_vcgbench_readers(tmp_path):
    g = dump(tmp_path / "generic_qa.json", [{"video_name": "v_1", "Q": "q1", "A": "a1"}, {"video_name": "v_1", "Q": "q2", "A": "a2"},
                                            {"video_name": "v_2", "Q": "q3", "A": "a3"}])
    items = ev.read_vcgbench(g)
    assert [x["id"] for x in items] == ["v_1_0", "v_1_1", "v_2_0"]
    assert {x["kind"] for x in items} == {"generic"} and items[1]["question"] == "q2" and items[1]["video"] == "v_1"
    assert ev.read_vcgbench(g, "temporal")[0]["kind"] == "temporal"
    c = dump(tmp_path / "consistency_qa.json", [{"video_name": "v_1", "Q1": "what?", "Q2": "which?", "A": "a"}])
    (it,) = ev.read_vcgbench(c, "consistency")
    assert (it["question"], it["question_2"], it["answer"], it["kind"]) == ("what?", "which?", "a", "consistency")
    with pytest.raises(ev.BenchmarkError, match=r"bad.json record 1: missing key 'Q2'"):
        ev.read_vcgbench(dump(tmp_path / "bad.json", [{"video_name": "v", "Q1": "a", "Q2": "b", "A": "c"},
                                                     {"video_name": "v", "Q1": "a", "A": "c"}]), "consistency")
    with pytest.raises(ev.BenchmarkError, match="not valid JSON"):
        (tmp_path / "broken.json").write_text("[{"); ev.read_vcgbench(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError): ev.read_vcgbench(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="generic, temporal or consistency"): ev.read_vcgbench(g, "qa")


def test_qa_readers(tmp_path):
    msvd = dump(tmp_path / "msvd.json", [{"video_id": "vid1", "question": "who sings?", "answer": "man", "id": 0}])
    msrvtt = dump(tmp_path / "msrvtt.json", [{"video_id": 7010, "question": "what runs?", "answer": "dog", "id": 3}])
    video_key = dump(tmp_path / "v.json", [{"video": "clip9", "question": "q", "answer": "a"}])
    assert [(x["id"], x["video"], x["kind"]) for x in ev.read_qa(msvd)] == [("0", "vid1", "qa")]
    assert ev.read_qa(msrvtt, "video{video}")[0]["video"] == "video7010"
    assert ev.read_qa(video_key)[0]["id"] == "0"  # no id field: the position
    with pytest.raises(ev.BenchmarkError, match="duplicate question id"):
        ev.read_qa(dump(tmp_path / "d.json", [{"video_id": 1, "question": "q", "answer": "a", "id": 1}] * 2))
    with pytest.raises(ev.BenchmarkError, match="record 0: missing key 'answer'"):
        ev.read_qa(dump(tmp_path / "na.json", [{"video_id": 1, "question": "q", "id": 1}]))
    q = dump(tmp_path / "test_q.json", [{"video_name": "abc", "question": "is it day", "question_id": "abc_0"},
                                        {"video_name": "xyz", "question": "what color", "question_id": "xyz_1"}])
    a = dump(tmp_path / "test_a.json", [{"answer": "red", "type": 4, "question_id": "xyz_1"},
                                        {"answer": "yes", "type": 3, "question_id": "abc_0"}])
    items = ev.read_activitynet_qa(q, a)
    assert [(x["id"], x["video"], x["answer"], x["meta"]["type"]) for x in items] == [("abc_0", "v_abc", "yes", 3), ("xyz_1", "v_xyz", "red", 4)]
    assert ev.read_activitynet_qa(q, a, video_pattern="{video}")[0]["video"] == "abc"
    with pytest.raises(ev.BenchmarkError, match="'xyz_1' has no answer"):
        ev.read_activitynet_qa(q, dump(tmp_path / "a2.json", [{"answer": "yes", "question_id": "abc_0"}]))


def test_toy_items(toy_items):
    kinds = [x["kind"] for x in toy_items]
    assert set(kinds) == {"generic", "temporal", "consistency", "qa"}
    assert len({x["id"] for x in toy_items}) == len(toy_items)
    assert all(x["meta"]["record"]["temporal"] for x in toy_items if x["kind"] == "temporal")
    assert all(x["meta"]["truth"] in ("yes", "no") for x in toy_items if x["kind"] == "qa")
    assert all(x["question"] != x["question_2"] and "<image>" not in x["question"] for x in toy_items if x["kind"] == "consistency")


def test_resolve_video(tmp_path):
    (tmp_path / "v_abc.mkv").write_bytes(b"x")
    assert ev.resolve_video("v_abc", tmp_path) == tmp_path / "v_abc.mkv"
    with pytest.raises(FileNotFoundError, match="v_zzz"): ev.resolve_video("v_zzz", tmp_path)


# ---------------------------------------------------------------- prompts and parsing
def test_prompts_follow_video_chatgpt():
    for crit in ev.CRITERIA[:4]:
        sys_, user = ev.judge_messages(GEN, "He juggles.", crit)
        assert sys_["role"] == "system" and user["role"] == "user"
        assert "Question: What is the man doing?\nCorrect Answer: Juggling three balls.\nPredicted Answer: He juggles.\n\n" in user["content"]
        assert "Python dictionary string with keys 'score'" in user["content"] and "{''score': 4.8}" in user["content"]
    c = ev.make_item("c", "consistency", "v", "Q one?", "A.", question_2="Q two?")
    u = ev.judge_messages(c, ("p1", "p2"), "consistency")[1]["content"]
    assert "Question 1: Q one?\nQuestion 2: Q two?\nCorrect Answer: A.\nPredicted Answer to Question 1: p1\nPredicted Answer to Question 2: p2" in u
    u = ev.judge_messages(QA, "a dog", "qa")[1]["content"]
    assert "keys 'pred' and 'score'" in u and "{'pred': 'yes', 'score': 4.8}" in u


@pytest.mark.parametrize("reply,qa,want", [
    ("{'score': 4}", False, (4.0, None)), ("{'score': 4.9}", False, (4.0, None)), (" {'score': '2'} ", False, (2.0, None)),
    ("```python\n{'pred': 'yes', 'score': 5}\n```", True, (5.0, "yes")), ('{"pred": "No", "score": 0}', True, (0.0, "no")),
    ("Here you go: {'score': 3}.", False, (3.0, None)), ("{''score': 4.8}", False, (4.0, None))])
def test_parse_good(reply, qa, want):
    r = ev.parse_judge_reply(reply, qa=qa)
    assert (r["score"], r["pred"]) == want


@pytest.mark.parametrize("reply,qa", [("", False), ("Score: 4", False), ("{'score': 6}", False), ("{'score': -1}", False),
                                      ("{'score': 'five'}", False), ("{'score': 4}", True), ("{'pred': 'maybe', 'score': 1}", True),
                                      ("{'score': nan}", False), (None, False)])
def test_parse_malformed(reply, qa):
    with pytest.raises(ev.MalformedReply): ev.parse_judge_reply(reply, qa=qa)


# ---------------------------------------------------------------- toy judge
def test_toy_judge_truth_vs_corrupted(toy_data, toy_items):
    j = ev.ToyJudge(toy_data)
    def run(fn):
        out = {}
        for it in toy_items:
            for c in ev.KIND_CRITERIA[it["kind"]]:
                p = (fn(it["answer"]), fn(it["answer"])) if c == "consistency" else fn(it["answer"])
                out.setdefault(c, []).append(j.judge(it, p, c))
        return {c: sum(r["score"] for r in rs) / len(rs) for c, rs in out.items()}
    gt, bad = run(lambda a: a), run(corrupt)
    assert gt == {c: 5.0 for c in gt}
    for c in ("correctness", "temporal", "consistency", "qa"): assert bad[c] < gt[c] - 1, (c, bad[c])
    qa = next(x for x in toy_items if x["kind"] == "qa")
    assert j.judge(qa, qa["meta"]["truth"].capitalize() + ".")["pred"] == "yes"
    with pytest.raises(ValueError, match="not judged on 'temporal'"): j.judge(qa, "yes", "temporal")
    with pytest.raises(ev.JudgeError, match="no toy-world facts"): j.judge(GEN, "x")


# ---------------------------------------------------------------- OpenAI-compatible judge over HTTP
def test_http_good_replies(chat_server):
    j = oj(chat_server, concurrency=3, temperature=0.0)
    tasks = [(GEN, f"answer {k}", c) for k, c in enumerate(("correctness", "detail", "context"))] + [(QA, "a dog", "qa")]
    res = j.judge_many(tasks)
    assert [(r["ok"], r["score"], r["pred"], r["attempts"]) for r in res] == [(True, 3.0, None, 1)] * 3 + [(True, 5.0, "yes", 1)]
    assert len(Chat.seen) == 4 and all(s["path"] == "/v1/chat/completions" for s in Chat.seen)
    assert {s["auth"] for s in Chat.seen} == {"Bearer sk-local"}
    assert all(s["body"]["model"] == "judge-x" and s["body"]["temperature"] == 0.0 for s in Chat.seen)
    prompts = sorted(s["body"]["messages"][1]["content"].split("Predicted Answer: ")[1].split("\n")[0] for s in Chat.seen)
    assert prompts == ["a dog", "answer 0", "answer 1", "answer 2"]
    assert j.describe() == dict(kind="openai", base_url=chat_server, model="judge-x", temperature=0.0)


def test_http_malformed_then_good(chat_server):
    Chat.script = [(200, "I think it's quite good."), (200, "{'score': 4}")]
    r = oj(chat_server, concurrency=1).judge(GEN, "x", "detail")
    assert (r["ok"], r["score"], r["attempts"]) == (True, 4.0, 2)
    assert "temperature" not in Chat.seen[0]["body"]  # None: the server's default, as the original


def test_http_always_malformed_is_counted(chat_server):
    Chat.script = [(200, "good answer")] * 3
    r = oj(chat_server, max_retries=2).judge(GEN, "x", "correctness")
    assert r["ok"] is False and r["score"] is None and r["attempts"] == 3 and r["raw"] == "good answer"
    assert "after 3 attempts" in r["error"] and len(Chat.seen) == 3


def test_http_500_is_retried(chat_server):
    Chat.script = [(500, ""), (503, ""), (200, "{'score': 5}")]
    r = oj(chat_server).judge(GEN, "x", "context")
    assert (r["ok"], r["score"], r["attempts"]) == (True, 5.0, 1) and len(Chat.seen) == 3
    Chat.script = [(500, "")] * 3
    with pytest.raises(ev.JudgeError, match="no answer after 3 tries"):
        oj(chat_server, http_retries=2).judge(GEN, "x", "context")


def test_http_timeout_is_retried(chat_server):
    Chat.script = [("sleep", 1.0)]
    r = oj(chat_server, timeout=0.3).judge(GEN, "x", "context")
    assert r["ok"] and len(Chat.seen) == 2


def test_http_errors(chat_server, monkeypatch):
    Chat.script = [(401, "")]
    with pytest.raises(ev.JudgeError, match="HTTP 401"): oj(chat_server).judge(GEN, "x", "context")
    Chat.script = [(400, "")] * 4
    r = oj(chat_server).judge(GEN, "x", "context")  # rejected for this item: a counted failure, the run goes on
    assert not r["ok"] and "HTTP 400" in r["error"]
    monkeypatch.delenv("EVAL_TEST_KEY")
    with pytest.raises(ev.JudgeError, match="EVAL_TEST_KEY is not set"): oj(chat_server)
    j = ev.OpenAIJudge("http://127.0.0.1:1/v1", api_key_env=None, http_retries=1, backoff=0.01, timeout=1)
    with pytest.raises(ev.JudgeError, match="no answer after 2 tries"): j.judge(GEN, "x", "context")


# ---------------------------------------------------------------- local HF judge
@pytest.fixture(scope="module")
def tiny_hf_judge_dir(toy_data, tmp_path_factory):
    from vlm_rlaif.model import TOY_LM_CONFIG, build_toy_lm, train_toy_tokenizer
    msgs = ev.judge_messages(GEN, "x", "correctness") + ev.judge_messages(QA, "x", "qa")
    tok = train_toy_tokenizer(tw.corpus_texts(toy_data) + [m["content"] for m in msgs] + ["{'pred': 'yes', 'score': 3}"] * 3)
    d = tmp_path_factory.mktemp("hf_judge")
    torch.manual_seed(0)
    build_toy_lm({**TOY_LM_CONFIG, "num_hidden_layers": 1}, tok).save_pretrained(d); tok.save_pretrained(d)
    return d


def test_hf_judge_untrained_fails_counted(tiny_hf_judge_dir):
    j = ev.make_judge("hf", dict(model_name_or_path=str(tiny_hf_judge_dir), max_new_tokens=6, max_retries=1, batch_size=2))
    res = j.judge_many([(GEN, "x", "correctness"), (QA, "a dog", "qa"), (GEN, "y", "detail")])
    assert [r["ok"] for r in res] == [False] * 3 and all(r["attempts"] == 2 for r in res)
    assert j.describe()["model"] == str(tiny_hf_judge_dir)
    assert j.prompt(ev.judge_messages(GEN, "x", "detail")).endswith("ASSISTANT:")  # no chat template: Vicuna v1


def test_hf_judge_parses_generated_reply(tiny_hf_judge_dir, monkeypatch):
    j = ev.HFJudge(str(tiny_hf_judge_dir), max_new_tokens=16, max_retries=0)
    reply = j.tok(" {'pred': 'yes', 'score': 3}", add_special_tokens=False, return_tensors="pt")["input_ids"]
    def fake_generate(input_ids, attention_mask, **kw):  # the LM "says" the reply after each (left-padded) prompt
        assert j.tok.padding_side == "left" and (attention_mask[:, -1] == 1).all()
        return torch.cat([input_ids, reply.expand(len(input_ids), -1)], 1)
    monkeypatch.setattr(j.model, "generate", fake_generate)
    res = j.judge_many([(QA, "a dog", "qa"), (GEN, "x", "temporal" if False else "correctness")])
    assert [(r["ok"], r["score"], r["pred"]) for r in res] == [(True, 3.0, "yes"), (True, 3.0, None)]


def test_make_judge_settings(toy_data, tiny_hf_judge_dir):
    with pytest.raises(ValueError, match="unknown hf judge settings"): ev.make_judge("hf", {"model_path": "x"})
    with pytest.raises(ValueError, match="no settings"): ev.make_judge("toy", {"x": 1}, toy_data)
    with pytest.raises(ev.JudgeError, match="cannot load"): ev.make_judge("hf", {"model_name_or_path": str(toy_data)})
    assert ev.make_judge("openai", {"model": "m", "api_key_env": None, "base_url": "https://h/v1"}).model == "m"
    with pytest.raises(ev.JudgeError, match="plain http"):  # to another machine: only with allow_http
        ev.make_judge("openai", {"model": "m", "api_key_env": None, "base_url": "http://h/v1"})


# ---------------------------------------------------------------- the stage
def test_evaluate_model_toy_resume(toy_data, toy_items, tmp_path):
    cfg = ev.EvalConfig(data_dir=str(toy_data), split="test", batch_size=4, judge_batch_size=5, progress=False)
    calls = []
    ans = answerer(toy_items, calls=calls)
    def dying(recs):
        if len(calls) == 2: raise KeyboardInterrupt
        return ans(recs)
    with pytest.raises(KeyboardInterrupt): ev.evaluate_model(cfg, tmp_path / "run", answer_fn=dying)
    assert len(ev.read_jsonl(tmp_path / "run" / "predictions.jsonl")) == 8
    with open(tmp_path / "run" / "predictions.jsonl", "a") as f: f.write('{"id": "half a li')  # a torn write
    out = ev.evaluate_model(cfg, tmp_path / "run", answer_fn=ans)
    answered = [i for c in calls for i in c]
    assert len(answered) == len(set(answered))  # nothing answered twice
    preds = ev.read_jsonl(out / "predictions.jsonl")
    assert sorted(p["id"] for p in preds) == sorted(x["id"] for x in toy_items)
    assert all(p["pred1"] and p["pred2"] for p in preds if p["kind"] == "consistency")
    s = json.loads((out / "scores.json").read_text())
    assert s["criteria"] == {c: 5.0 for c in ev.CRITERIA} and s["qa"]["accuracy"] == 1.0 and s["qa"]["score"] == 5.0
    assert s["counts"]["failed_total"] == 0 and s["judge"] == {"kind": "toy"} and s["config"]["split"] == "test"
    n_j = len(ev.read_jsonl(out / "judgements.jsonl"))
    assert n_j == sum(len(ev.KIND_CRITERIA[x["kind"]]) for x in toy_items)
    assert json.loads((out / "done.json").read_text())["n_items"] == len(toy_items)
    n = len(calls)
    ev.evaluate_model(cfg, out, answer_fn=ans); assert len(calls) == n  # done.json: nothing to do
    (out / "done.json").unlink()
    ev.evaluate_model(cfg, out, answer_fn=ans)  # no done.json: everything is already answered and judged
    assert len(calls) == n and len(ev.read_jsonl(out / "judgements.jsonl")) == n_j
    (out / "done.json").unlink()
    with pytest.raises(ValueError, match=r"differs in \['split'\]"):
        ev.evaluate_model(ev.EvalConfig(data_dir=str(toy_data), split="val", progress=False), out, answer_fn=ans)


class Flaky(ev.Judge):
    "Fails every judgement of item ids in `bad` the first time it is asked."
    name = "flaky"
    def __init__(self, bad): self.bad, self.asked = set(bad), []
    def judge(self, item, prediction, criterion=None):
        self.asked.append(item["id"])
        if item["id"] in self.bad: self.bad.discard(item["id"]); return ev.judgement(ok=False, error="malformed", attempts=3)
        return ev.judgement(4.0, "yes" if item["kind"] == "qa" else None)


def test_failed_judgements_counted_and_rejudged(toy_data, toy_items, tmp_path):
    qa = [x["id"] for x in toy_items if x["kind"] == "qa"][:2]
    cfg = ev.EvalConfig(data_dir=str(toy_data), progress=False)
    out = ev.evaluate_model(cfg, tmp_path / "r", answer_fn=answerer(toy_items), judge=Flaky(qa))
    s = json.loads((out / "scores.json").read_text())
    n_qa = sum(x["kind"] == "qa" for x in toy_items)
    assert s["counts"]["failed"]["qa"] == 2 and s["counts"]["judged"]["qa"] == n_qa - 2 and s["qa"]["score"] == 4.0
    (out / "done.json").unlink()
    j = Flaky([])
    out = ev.evaluate_model(ev.EvalConfig(data_dir=str(toy_data), progress=False, rejudge_failed=True), out,
                            answer_fn=answerer(toy_items), judge=j)
    assert sorted(j.asked) == sorted(qa)
    s = json.loads((out / "scores.json").read_text())
    assert s["counts"]["failed_total"] == 0 and s["counts"]["judged"]["qa"] == n_qa


def test_evaluate_vcgbench_with_http_judge(tmp_path, chat_server):
    for v in ("v_1", "v_2"): (tmp_path / f"{v}.mp4").write_bytes(b"")
    ann = {"generic": dump(tmp_path / "g.json", [{"video_name": "v_1", "Q": "What happens?", "A": "A dog runs."}]),
           "temporal": dump(tmp_path / "t.json", [{"video_name": "v_2", "Q": "What first?", "A": "It sits, then runs."}]),
           "consistency": dump(tmp_path / "c.json", [{"video_name": "v_1", "Q1": "Animal?", "Q2": "Which animal?", "A": "A dog."}])}
    cfg = ev.EvalConfig.from_dict(dict(benchmark="vcgbench", annotations={k: str(v) for k, v in ann.items()},
                                       video_dir=str(tmp_path), judge="openai", progress=False,
                                       judge_settings=dict(base_url=chat_server, model="judge-x", api_key_env="EVAL_TEST_KEY", backoff=0.01,
                                                          concurrency=1)))
    seen = []
    def fn(recs):
        seen.extend(recs); return ["A dog."] * len(recs)
    Chat.script = [(200, "{'score': 4}"), (200, "bad"), (200, "{'score': 2}")]
    out = ev.evaluate_model(cfg, tmp_path / "out", answer_fn=fn)
    assert [r["video"] for r in seen] == [str(tmp_path / "v_1.mp4"), str(tmp_path / "v_2.mp4"), str(tmp_path / "v_1.mp4"), str(tmp_path / "v_1.mp4")]
    s = json.loads((out / "scores.json").read_text())
    assert s["counts"]["items"] == {"generic": 1, "temporal": 1, "consistency": 1, "qa": 0}
    assert s["criteria"]["correctness"] == 4.0 and s["counts"]["failed_total"] == 0 and s["qa"]["accuracy"] is None
    assert s["judge"]["kind"] == "openai" and s["judge"]["model"] == "judge-x"
    rows = ev.read_jsonl(out / "judgements.jsonl")
    assert {r["criterion"] for r in rows} == set(ev.CRITERIA) and max(r["attempts"] for r in rows) == 2
    cons = [s_["body"]["messages"][1]["content"] for s_ in Chat.seen if "Question 2:" in s_["body"]["messages"][1]["content"]]
    assert "Question 2: Which animal?" in cons[0]
    (out / "done.json").unlink()  # resume: transport settings may change, the judge may not
    n = len(Chat.seen)
    ev.evaluate_model(ev.EvalConfig.from_dict({**cfg.to_dict(), "judge_settings": {**cfg.judge_settings, "concurrency": 3}}), out, answer_fn=fn)
    assert len(Chat.seen) == n and len(seen) == 4
    (out / "done.json").unlink()
    with pytest.raises(ValueError, match=r"differs in \['judge_settings'\]"):
        ev.evaluate_model(ev.EvalConfig.from_dict({**cfg.to_dict(), "judge_settings": {**cfg.judge_settings, "model": "gpt-4"}}), out, answer_fn=fn)


def test_judge_agreement(toy_data, toy_items, tmp_path):
    cfg = ev.EvalConfig(data_dir=str(toy_data), progress=False)
    out = ev.evaluate_model(cfg, tmp_path / "r", answer_fn=answerer(toy_items, lambda it: corrupt(it["answer"])))
    rows = ev.read_jsonl(out / "judgements.jsonl")
    same = ev.judge_agreement(out, out / "judgements.jsonl")
    assert all(v["mean_abs_diff"] == 0 for v in same.values()) and same["qa"]["pred_agreement"] == 1.0
    flipped = [{**r, "pred": {"yes": "no", "no": "yes"}[r["pred"]]} if r["criterion"] == "qa" else
               {**r, "score": 5.0 - r["score"]} for r in rows]
    flipped[0] = {**flipped[0], "ok": False, "score": None}  # failed judgements are left out
    ag = ev.judge_agreement(flipped, rows)
    assert ag["qa"]["pred_agreement"] == 0.0 and ag["correctness"]["n"] == sum(x["kind"] == "generic" for x in toy_items) - 1
    assert ag["temporal"]["pearson"] is None or ag["temporal"]["pearson"] < -0.99


def test_config(toy_data):
    with pytest.raises(ValueError, match=r"unknown keys \['n_items'\]"): ev.EvalConfig.from_dict({"data_dir": "d", "n_items": 3})
    with pytest.raises(ValueError, match="needs data_dir"): ev.EvalConfig()
    with pytest.raises(ValueError, match="benchmark must be one of"): ev.EvalConfig(benchmark="mvbench")
    with pytest.raises(ValueError, match="judge must be"): ev.EvalConfig(data_dir="d", judge="gpt4")
    with pytest.raises(ValueError, match="needs annotations"): ev.EvalConfig(benchmark="msvd")
    with pytest.raises(ValueError, match="unknown for benchmark .activitynet."): ev.EvalConfig(benchmark="activitynet", annotations={"qa": "x"})
    with pytest.raises(ValueError, match="needs annotations"): ev.EvalConfig(benchmark="msrvtt", annotations={"questions": "x"})
    with pytest.raises(ValueError, match="needs annotations"): ev.EvalConfig(benchmark="vcgbench")
    assert ev.EvalConfig(benchmark="msrvtt", annotations={"qa": "x"}).judge_kind == "openai"
    c = ev.EvalConfig(data_dir=str(toy_data), max_items=2, seed=1)
    assert ev.EvalConfig.from_dict(c.to_dict()) == c
    items = ev.load_benchmark(c)
    kinds = [x["kind"] for x in items]
    assert {k: kinds.count(k) for k in ev.KIND_CRITERIA} == {k: 2 for k in ev.KIND_CRITERIA}
    assert [x["id"] for x in ev.load_benchmark(c)] == [x["id"] for x in items]  # seeded


def test_load_qa_benchmarks(tmp_path):
    q = dump(tmp_path / "q.json", [{"video_name": "abc", "question": "is it day", "question_id": "abc_0"}])
    a = dump(tmp_path / "a.json", [{"answer": "yes", "type": 3, "question_id": "abc_0"}])
    anet = ev.load_benchmark(ev.EvalConfig(benchmark="activitynet", annotations={"questions": str(q), "answers": str(a)}))
    assert [(x["id"], x["video"], x["kind"]) for x in anet] == [("abc_0", "v_abc", "qa")]
    split = ev.load_benchmark(ev.EvalConfig(benchmark="msvd", annotations={"questions": str(q), "answers": str(a)}))
    assert split[0]["video"] == "abc"
    m = dump(tmp_path / "m.json", [{"video_id": 7010, "question": "what runs?", "answer": "dog", "id": 3}])
    assert ev.load_benchmark(ev.EvalConfig(benchmark="msrvtt", annotations={"qa": str(m)}))[0]["video"] == "video7010"
    assert ev.load_benchmark(ev.EvalConfig(benchmark="msrvtt", annotations={"qa": str(m)}, video_pattern="{video}.mp4"))[0]["video"] == "7010.mp4"
    d = dump(tmp_path / "d.json", [{"video_name": "v", "Q": "q", "A": "a"}])
    ids = [x["id"] for x in ev.load_benchmark(ev.EvalConfig(benchmark="vcgbench", annotations={"generic": str(d), "temporal": str(d)}))]
    assert ids == ["generic/v_0", "temporal/v_0"]


def test_read_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert ev.read_jsonl(p) == [{"a": 1}, {"a": 2}]
    ev._append_jsonl(p, [{"a": 3}])
    assert ev.read_jsonl(p) == [{"a": 1}, {"a": 2}, {"a": 3}]
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(ev.BenchmarkError, match="line 2"): ev.read_jsonl(p)
    assert ev.read_jsonl(tmp_path / "none.jsonl") == []


def test_compare(toy_data, toy_items, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    cfg = ev.EvalConfig(data_dir=str(toy_data), progress=False)
    a = ev.evaluate_model(cfg, tmp_path / "gt", answer_fn=answerer(toy_items))
    b = ev.evaluate_model(cfg, tmp_path / "bad", answer_fn=answerer(toy_items, lambda it: corrupt(it["answer"])))
    table, fig = ev.compare_scores({"truth": a, "corrupted": b / "scores.json"})
    lines = table.splitlines()
    assert lines[0].startswith("| system | correctness | detail | context | temporal | consistency | QA acc % |")
    assert lines[2].startswith("| truth | 5.00 | 5.00 | 5.00 | 5.00 | 5.00 | 100.0 | 5.00 | 0 |")
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 6 and [t.get_text() for t in ax.get_legend().get_texts()] == ["truth", "corrupted"]
    other = {**ev.load_scores(b), "judge": {"kind": "openai", "model": "gpt-3.5-turbo"}}
    with pytest.raises(ValueError, match="different judges"): ev.scores_table({"a": a, "b": other})
    assert "| b |" in ev.scores_table({"a": a, "b": other}, allow_mixed_judges=True)


@pytest.fixture(scope="module")
def tiny_vlm(toy_data, tmp_path_factory):
    pytest.importorskip("vlm_rlaif.training")
    from vlm_rlaif.encoder import toy_encoder_config
    from vlm_rlaif.model import TOY_LM_CONFIG, ModelConfig, build_model, train_toy_tokenizer
    torch.manual_seed(0)
    m = build_model(ModelConfig(lm_config={**TOY_LM_CONFIG, "num_hidden_layers": 1}, encoder=toy_encoder_config(), lora=None),
                    train_toy_tokenizer(tw.corpus_texts(toy_data)))
    return m.save_pretrained(tmp_path_factory.mktemp("vlm") / "model")


def test_evaluate_with_model(toy_data, tiny_vlm, tmp_path):
    "The default answerer: a VideoLMM dir + FeatureCache through training.generate_answers."
    cfg = ev.EvalConfig(model_dir=str(tiny_vlm), data_dir=str(toy_data), features_dir=str(tmp_path / "feats"),
                        max_items=1, max_new_tokens=6, batch_size=8, progress=False)
    out = ev.evaluate_model(cfg, tmp_path / "out")
    preds = ev.read_jsonl(out / "predictions.jsonl")
    assert len(preds) == 4 and all(isinstance(p.get("pred", p.get("pred1")), str) for p in preds)
    s = json.loads((out / "scores.json").read_text())
    assert s["model_dir"] == str(tiny_vlm) and set(s["criteria"]) == set(ev.CRITERIA)
    with pytest.raises(ValueError, match="needs model_dir and features_dir"):
        ev.evaluate_model(ev.EvalConfig(data_dir=str(toy_data), progress=False), tmp_path / "o2")
