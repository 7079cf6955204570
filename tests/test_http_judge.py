"""The HTTP judge's transport: the API key never leaves its origin (redirects are not followed), plain http only to
this machine unless allowed, and a total deadline per request (a trickling server cannot hold it)."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from vlm_rlaif import evaluate as ev

GEN = ev.make_item("v_a_0", "generic", "v_a", "What is the man doing?", "Juggling three balls.")


def serve(handler):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    return srv


@pytest.fixture
def servers(monkeypatch):
    seen = {"good": [], "redirect": []}

    class Good(BaseHTTPRequestHandler):  # the other origin: answers anything, and records who sent what
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen["good"].append(self.headers.get("Authorization"))
            out = json.dumps({"choices": [{"message": {"content": "{'score': 5}"}}]}).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(out))); self.end_headers(); self.wfile.write(out)
        def log_message(self, *a): pass

    good = serve(Good)

    class Redirect(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen["redirect"].append(self.headers.get("Authorization"))
            self.send_response(307); self.send_header("Location", f"http://127.0.0.1:{good.server_port}/v1/chat/completions")
            self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a): pass

    redirect = serve(Redirect)
    monkeypatch.setenv("HTTP_JUDGE_KEY", "sk-secret")
    yield seen, f"http://127.0.0.1:{redirect.server_port}/v1", f"http://127.0.0.1:{good.server_port}/v1"
    for s in (good, redirect): s.shutdown(); s.server_close()


def test_redirect_to_another_origin_is_not_followed(servers):
    seen, redirecting, good = servers
    j = ev.OpenAIJudge(redirecting, model="m", api_key_env="HTTP_JUDGE_KEY", backoff=0.01)
    with pytest.raises(ev.JudgeError, match="HTTP 307 redirect to .* not followed"):
        j.judge(GEN, "x", "correctness")
    assert seen["redirect"] == ["Bearer sk-secret"] and seen["good"] == []  # the key stayed with its origin
    # the other server itself works, so it is the redirect that was refused
    assert ev.OpenAIJudge(good, model="m", api_key_env="HTTP_JUDGE_KEY").judge(GEN, "x", "correctness")["score"] == 5.0


def test_plain_http_only_to_loopback_unless_allowed(monkeypatch):
    monkeypatch.setenv("HTTP_JUDGE_KEY", "sk-secret")
    for url in ("http://judge.example.com/v1", "http://10.0.0.5:8000/v1"):
        with pytest.raises(ev.JudgeError, match="plain http to another machine"):
            ev.OpenAIJudge(url, api_key_env="HTTP_JUDGE_KEY")
        ev.OpenAIJudge(url, api_key_env="HTTP_JUDGE_KEY", allow_http=True)  # the user's explicit choice
    for url in ("http://localhost:8000/v1", "http://127.0.0.1:8000/v1", "http://[::1]:8000/v1", "https://judge.example.com/v1"):
        ev.OpenAIJudge(url, api_key_env="HTTP_JUDGE_KEY")
    with pytest.raises(ev.JudgeError, match="must be an http"): ev.OpenAIJudge("ftp://x/v1", api_key_env=None)
    # the flag is a judge setting of the config
    assert ev.make_judge("openai", {"base_url": "http://10.0.0.5/v1", "api_key_env": None, "allow_http": True}).url


@pytest.mark.parametrize("phase", ["headers", "body"])
def test_a_trickling_server_is_cut_at_the_total_deadline(phase):
    lsock = socket.socket(); lsock.bind(("127.0.0.1", 0)); lsock.listen(4)
    stop = threading.Event()

    def trickle():
        lsock.settimeout(0.2)
        while not stop.is_set():
            try: c, _ = lsock.accept()
            except OSError: continue
            c.recv(65536)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
            data = head + b"x" * 100000 if phase == "headers" else head
            try:
                if phase == "body": c.sendall(head); data = b"x" * 100000
                for i in range(len(data)):  # one byte every 50 ms: each read is quick, the whole never ends
                    if stop.is_set(): break
                    c.sendall(data[i:i + 1]); time.sleep(0.05)
            except OSError: pass
            finally: c.close()

    th = threading.Thread(target=trickle, daemon=True); th.start()
    j = ev.OpenAIJudge(f"http://127.0.0.1:{lsock.getsockname()[1]}/v1", api_key_env=None, timeout=1.0, http_retries=1,
                       backoff=0.01)
    t0 = time.monotonic()
    try:
        with pytest.raises(ev.JudgeError, match="no answer after 2 tries .*TimeoutError"):
            j.judge(GEN, "x", "correctness")
        assert time.monotonic() - t0 < 6  # two tries of at most 1 s each (and a short backoff), not forever
    finally:
        stop.set(); th.join(5); lsock.close()
