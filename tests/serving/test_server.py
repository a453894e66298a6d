"""The reward server: a real server on 127.0.0.1 and a real HTTP client (httpx). Scores equal RewardScorer's with one
and with 32 concurrent clients, every bad input gets its status and message (and the server keeps serving), a full
queue answers 503, a timed-out request is dropped, SIGTERM answers what was accepted, the clients and the GRPO reward
function give the same numbers."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import httpx
import pytest
from helpers import REPO, free_port, run_env, tiny_model

from coati.checkpoint.export import export_hf
from coati.serving.client import AsyncRewardClient, RemoteRewardFunction, RewardClient, RewardServerError
from coati.data.template import TEMPLATE_SECONDS, render_prompt
from coati.scoring import RewardScorer, normalize_prompt
from coati.data.packing import prefix_groups
from coati.serving.app import ServeSettings, create_app
from coati.serving.engine import RewardEngine

PROMPTS = ["What is the capital of France?", "Name a prime number.", [
    {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello in Chinese."}]]
RESPONSES = [["Paris.", "Lyon, I think.", "The capital of France is Paris, a city on the Seine."],
             ["2", "4", "Seven is prime.", "None exist."], ["你好", "Hello.", "您好！"]]


@pytest.fixture(scope="module")
def export(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_model")
    export_hf(tiny_model("llama", tokenizer, seed=5), tokenizer, str(path),
              {"model": "llama", "max_len": 48, "chat_template": "auto"})
    return str(path)


@pytest.fixture(scope="module")
def scorer(export):
    return RewardScorer.from_pretrained(export, device="cpu")


def _start(export, *extra):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "coati.serve", "--model_path", export, "--port", str(port),
                             "--device", "cpu", *extra], cwd=REPO, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


@pytest.fixture(scope="module")
def server(export):
    proc, url = _start(export, "--max_wait_ms", "20")
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def _expected(scorer, prompt, responses):
    return scorer.score_texts([prompt] * len(responses), responses)


def _close(a, b, tol=1e-5):
    return len(a) == len(b) and all(abs(x - y) < tol for x, y in zip(a, b))


def test_score_equals_reward_scorer_in_request_order(server, scorer):
    for prompt, responses in zip(PROMPTS, RESPONSES):
        r = httpx.post(server + "/score", json={"prompt": prompt, "responses": responses})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = _expected(scorer, prompt, responses)
        assert _close(body["scores"], expected), (body, expected)
        cut = [e.prompt_truncated or e.answer_truncated for e in scorer.encode_texts([prompt] * len(responses),
                                                                                     responses)]
        assert body["best"] == expected.index(max(expected)) and body["truncated"] == cut
    many = httpx.post(server + "/score", json=[{"prompt": p, "responses": r} for p, r in zip(PROMPTS, RESPONSES)])
    results = many.json()["results"]
    assert [len(x["scores"]) for x in results] == [len(r) for r in RESPONSES]
    for x, p, r in zip(results, PROMPTS, RESPONSES):
        assert _close(x["scores"], _expected(scorer, p, r))


def test_truncation_follows_training_and_is_reported(server, scorer):
    long_prompt = "word " * 200
    r = httpx.post(server + "/score", json={"prompt": long_prompt, "responses": ["short", "x " * 100]}).json()
    enc = scorer.encode_texts([long_prompt] * 2, ["short", "x " * 100])
    assert r["truncated"] == [True, True] and enc[0].prompt_truncated
    assert _close(r["scores"], scorer.score_encoded(enc))


def test_get_reward_reads_policy_texts_as_training_lays_them_out(server, scorer):
    tok = scorer.tokenizer
    queries, expected, ids = [], [], []
    for prompt, responses in zip(PROMPTS, RESPONSES):
        for answer in responses:  # the policy's text: rendered prompt + answer, with or without its EOS
            text = render_prompt(normalize_prompt(prompt), tok, True)
            queries.append(text + answer + (tok.eos_token if len(queries) % 2 else ""))
            expected += _expected(scorer, prompt, [answer])
            ids += scorer.encode([prompt], [answer])
    engine = RewardEngine(scorer)
    # exactly the trainer's token ids, whether the text ended with the EOS or not
    same = [engine.encode_query(q).input_ids == i for q, i in zip(queries, ids)]
    assert all(same), same
    r = httpx.post(server + "/get_reward", json={"query": queries, "prompts": ["ignored"], "labels": [None]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rewards"] == body["scores"] and len(body["truncated"]) == len(queries)
    assert _close(body["rewards"], expected), (body["rewards"], expected)
    long = httpx.post(server + "/get_reward", json={"query": ["a " * 300 + "end"]}).json()
    assert long["truncated"] == [True]


def test_responses_whose_prompt_was_cut_do_not_stop_the_others_sharing_it(scorer):
    """max_len (48 here) cuts the prompt of a long response by what that response needs, so it starts at other tokens
    than the short responses; the short ones still share their prompt (one group each start), scores unchanged."""
    from coati.data.batch import common_prefix_len

    prompt, responses = "one two three four five six seven eight nine ten", ["Yes.", "word " * 30, "No.", "Maybe."]
    enc = scorer.encode_texts([prompt] * len(responses), responses)
    assert [e.prompt_truncated for e in enc] == [False, True, False, False]
    seqs = [e.input_ids for e in enc]
    assert common_prefix_len(seqs) == 0  # the whole item shares no start
    engine = RewardEngine(scorer)
    (got,) = engine.rewards([seqs])
    assert _close(got, scorer.score_encoded(enc))
    short = [seqs[i] for i in (0, 2, 3)]
    assert engine.positions_computed == sum(map(len, seqs)) - 2 * common_prefix_len(short)  # prompt computed once


def test_prefix_groups_cluster_samples_of_one_prompt():
    p = list(range(10, 30))
    seqs = [p + [1, 2], [5, 6, 7], p + [3], p[:4] + [9, 9, 9, 9, 9]]
    assert sorted(map(sorted, prefix_groups(seqs))) == [[0, 2], [1], [3]]


def test_32_concurrent_clients_get_their_own_scores_and_are_batched(server, scorer):
    before = httpx.get(server + "/info").json()
    jobs = []
    for i in range(32):
        prompt = PROMPTS[i % 3] if i % 4 else f"Question number {i}?"
        responses = RESPONSES[i % 3][: 1 + i % 3] + [f"answer {i}"]
        jobs.append((prompt, responses))

    def call(job):
        prompt, responses = job
        if len(responses) % 2:
            text = render_prompt([{"role": "user", "content": prompt}], scorer.tokenizer, True) \
                if isinstance(prompt, str) else None
            if text is not None:
                r = httpx.post(server + "/get_reward", json={"query": [text + x for x in responses]}, timeout=60)
                return r.json()["rewards"]
        r = httpx.post(server + "/score", json={"prompt": prompt, "responses": responses}, timeout=60)
        return r.json()["scores"]

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(call, jobs))
    for (prompt, responses), scores in zip(jobs, got):
        assert _close(scores, _expected(scorer, prompt, responses)), (prompt, scores)
    after = httpx.get(server + "/info").json()
    served = after["requests"] - before["requests"]
    assert served == 32 and after["batches"] - before["batches"] < served  # requests were merged


@pytest.mark.parametrize("body, status, field, message", [
    (b"{not json", 400, "body", "not valid JSON"),
    (b"\xff\xfe{}", 400, "body", "not valid UTF-8"),
    (b"", 400, "body", "empty"),
    (b'{"query": [1.0, NaN]}', 400, "body", "NaN"),
    (b"[1, 2]", 422, "body", "JSON object"),
    (b'{"texts": ["a"]}', 422, "query", "missing field 'query'"),
    (b'{"query": "one text"}', 422, "query", "must be a list"),
    (b'{"query": []}', 422, "query", "is empty"),
    (b'{"query": ["ok", 3]}', 422, "query[1]", "must be a string, got a number"),
    (b'{"query": ["ok", "   "]}', 422, "query[1]", "is empty"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "body", "nested too deeply"),
    (b'{"query": ["ok", "a\\ud800b"]}', 422, "query[1]", "not valid Unicode (a lone surrogate at character 1)"),
])
def test_bad_get_reward_input_is_4xx_naming_the_field(server, body, status, field, message):
    r = httpx.post(server + "/get_reward", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status and r.json()["field"] == field and message in r.json()["error"], r.text
    assert httpx.post(server + "/get_reward", json={"query": ["fine"]}).status_code == 200


@pytest.mark.parametrize("payload, field, message", [
    ({"prompt": "q"}, "responses", "missing field"),
    ({"prompt": "q", "responses": []}, "responses", "is empty"),
    ({"prompt": "q", "responses": ["a", {"x": 1}]}, "responses[1]", "must be a string"),
    ({"prompt": "q", "responses": ["a", ""]}, "responses", "responses[1]"),
    ({"prompt": 5, "responses": ["a"]}, "prompt", "must be a string, a list of messages or null"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "responses": ["a"]}, "prompt", "role"),
    ([{"prompt": "q", "responses": ["a"]}, "nope"], "[1]", "must be an object"),
    ([{"prompt": "q", "responses": ["a"]}, {"prompt": "q", "responses": ["\ud800"]}], "[1].responses[0]",
     "not valid Unicode"),
    ({"prompt": "q", "responses": ["a" * 200_001]}, "responses[0]", "--max_chars"),
    ({"prompt": "q", "responses": ["a"] * 600}, "responses", "--max_texts"),
])
def test_bad_score_input_is_422_naming_the_field(server, payload, field, message):
    r = httpx.post(server + "/score", content=json.dumps(payload).encode(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == field and message in r.json()["error"], r.text
    assert httpx.post(server + "/score", json={"prompt": "q", "responses": ["a", "b"]}).status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_a_body_not_sent_as_json_is_415(server, content_type):
    """What a web page can post to a loopback server without a CORS preflight is never scored."""
    headers = {"content-type": content_type} if content_type else {}
    for path, body in (("/score", b'{"prompt": "q", "responses": ["a"]}'), ("/get_reward", b'{"query": ["a"]}')):
        r = httpx.post(server + path, content=body, headers=headers)
        assert r.status_code == 415 and r.json()["field"] == "content-type", r.text
    r = httpx.post(server + "/get_reward", content=b'{"query": ["a"]}',
                   headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200


def test_connections_that_trickle_their_headers_are_closed(export):
    import socket

    proc, url = _start(export, "--header_timeout", "1", "--max_connections", "8")
    port = int(url.rsplit(":", 1)[1])
    try:
        slow = []
        for _ in range(6):  # a request head sent a byte at a time, never finished
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
            slow.append(sock)
        time.sleep(0.5)
        for sock in slow:
            sock.sendall(b"X")
        time.sleep(2.0)
        for sock in slow:  # closed by the server: reading gives end of file (or a reset)
            sock.settimeout(5)
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
            sock.close()
        assert httpx.post(url + "/get_reward", json={"query": ["fine"]}, timeout=30).status_code == 200
        # more open connections than --max_connections: the next request is answered 503
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        try:
            assert httpx.get(url + "/health", timeout=5).status_code == 503
        finally:
            for sock in idle:
                sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_body_limit_unknown_path_and_info(server):
    r = httpx.post(server + "/score", content=b"x" * (8 * 2**20 + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max_body_bytes" in r.json()["error"]
    assert httpx.get(server + "/nope").status_code == 404
    assert httpx.get(server + "/get_reward").status_code == 405
    info = httpx.get(server + "/info").json()
    assert info["max_len"] == 48 and info["packed"] and info["layout"] == "coati" and info["normalize"] is False
    assert info["reward_token_id"] is not None and info["version"]


class _GatedEngine(RewardEngine):
    """The real engine, each forward pass held at a gate the test opens (a busy model whose progress the test
    controls, so that no outcome depends on how loaded the machine is), counting the groups scored."""

    def __init__(self, scorer):
        super().__init__(scorer)
        self.entered, self.passes, self.groups_scored = threading.Semaphore(0), threading.Semaphore(0), 0

    def rewards(self, groups):
        self.entered.release()
        assert self.passes.acquire(timeout=120), "the test never opened the gate"
        self.groups_scored += len(groups)
        return super().rewards(groups)


def _thread_server(engine, settings):
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def test_full_queue_answers_503_with_retry_after_and_timeouts_drop_requests(scorer):
    engine = _GatedEngine(scorer)
    settings = ServeSettings(max_batch_tokens=8, max_wait_ms=0, max_queue=2, request_timeout=3.0)
    server, thread, url = _thread_server(engine, settings)
    body = {"prompt": "q", "responses": ["a", "b"]}  # more than 8 tokens: every request is a batch of its own
    client = httpx.Client(timeout=60)  # one client for all threads: no TLS set-up per request on the clock
    post = functools.partial(client.post, url + "/score", json=body)
    try:
        with ThreadPoolExecutor(6) as pool:
            first = pool.submit(post)
            assert engine.entered.acquire(timeout=60)  # the first request is in the model
            rest = [pool.submit(post) for _ in range(5)]
            # two of the other five wait in the queue (max_queue 2); three find it full and are answered at once
            done = as_completed(rest, timeout=60)
            busy = [next(done).result() for _ in range(3)]
            assert [r.status_code for r in busy] == [503, 503, 503]
            assert busy[0].headers["retry-after"] == "1" and "busy" in busy[0].json()["error"]
            engine.passes.release()  # the first is scored; one queued request goes into the model and is held there
            assert first.result().status_code == 200
            assert engine.entered.acquire(timeout=60)
            # both time out after 3 s: the one held in the model, and the one still queued behind it
            late = [r for r in (f.result() for f in rest) if r.status_code != 503]
            assert [r.status_code for r in late] == [504, 504]
            assert "--request_timeout" in late[0].json()["error"]
        for _ in range(2):  # the held one finishes (its result is dropped); the last request below is scored
            engine.passes.release()
        assert post().status_code == 200  # still serving
        assert engine.groups_scored == 3  # the first, the one that timed out while in the model, the last
        info = client.get(url + "/info").json()
        assert info["dropped"] == 1 and info["requests"] == 3  # the one that timed out in the queue never ran
    finally:
        for _ in range(4):
            engine.passes.release()
        client.close()
        server.should_exit = True
        thread.join(30)


def test_sigterm_answers_every_accepted_request_then_exits_0(export, scorer):
    proc, url = _start(export, "--max_wait_ms", "1500")
    body = {"prompt": PROMPTS[0], "responses": RESPONSES[0]}
    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
        client.get(url + "/health")
        futures = [pool.submit(client.post, url + "/score", json=body) for _ in range(8)]
        time.sleep(0.75)  # the requests are accepted and waiting in the batcher (up to 1.5 s for more to come)
        proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * 8
    assert all(_close(r.json()["scores"], _expected(scorer, PROMPTS[0], RESPONSES[0])) for r in results)
    assert proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


def test_bad_model_path_fails_with_one_line_before_binding(tmp_path):
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "coati.serve", "--model_path", str(tmp_path / "nope"), "--port",
                           str(port)], cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]


def test_clients_and_grpo_reward_function(server, scorer):
    client = RewardClient(server)
    assert client.health() and client.info()["max_len"] == 48
    assert _close(client.score(PROMPTS[1], RESPONSES[1])["scores"], _expected(scorer, PROMPTS[1], RESPONSES[1]))
    with pytest.raises(RewardServerError, match="422.*responses"):
        client.score("q", [])

    async def run_async():
        async with AsyncRewardClient(server) as aclient:
            return await asyncio.gather(*(aclient.score(p, r) for p, r in zip(PROMPTS, RESPONSES)))

    for res, p, r in zip(asyncio.run(run_async()), PROMPTS, RESPONSES):
        assert _close(res["scores"], _expected(scorer, p, r))
    # GRPO: prompts repeated per generation, completions as strings or as conversational messages
    reward = RemoteRewardFunction(server)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[2]] * 3
    completions = RESPONSES[0] + [[{"role": "assistant", "content": c}] for c in RESPONSES[2]]
    got = reward(prompts=prompts, completions=completions, completion_ids=None)
    assert reward.__name__ == "coati_reward"
    assert _close(got, _expected(scorer, PROMPTS[0], RESPONSES[0]) + _expected(scorer, PROMPTS[2], RESPONSES[2]))


SLOW_TEMPLATE = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x"


@pytest.fixture(scope="module")
def slow_template_export(tokenizer, tmp_path_factory):
    """A model folder whose chat template renders for hours (two nested loops of range(99999))."""
    import copy

    tok = copy.copy(tokenizer)
    tok.chat_template = SLOW_TEMPLATE
    path = tmp_path_factory.mktemp("slow_template")
    export_hf(tiny_model("llama", tok, seed=5), tok, str(path), {"model": "llama", "max_len": 48,
                                                                 "chat_template": "auto"})
    return str(path)


def test_a_slow_chat_template_keeps_health_timeouts_and_sigterm_alive(slow_template_export):
    proc, url = _start(slow_template_export, "--request_timeout", "2")
    body = {"prompt": [{"role": "user", "content": "hi"}], "responses": ["hello"]}
    try:
        with ThreadPoolExecutor(2) as pool:
            t0 = time.monotonic()
            slow = pool.submit(httpx.post, url + "/score", json=body, timeout=60)
            time.sleep(0.5)
            health = httpx.get(url + "/health", timeout=2)  # answered while the template renders
            assert health.status_code == 200 and not slow.done()
            answer = slow.result()
            assert answer.status_code == 504 and "--request_timeout 2" in answer.json()["error"], answer.text
            assert time.monotonic() - t0 < 10
            # the dropped request's render stops itself TEMPLATE_SECONDS after it began; until then its traced loop
            # contends for the GIL, which on a slow host can hold a new request past the 2 s timeout. After it
            # stops, the server must answer as before.
            time.sleep(max(0.0, t0 + TEMPLATE_SECONDS + 0.5 - time.monotonic()))
            assert httpx.post(url + "/get_reward", json={"query": ["hi there"]}, timeout=30).status_code == 200
            pool.submit(httpx.post, url + "/score", json=body, timeout=60)
            time.sleep(0.5)  # a render is running when SIGTERM arrives
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
    finally:
        proc.kill()


def test_a_chat_template_past_its_time_is_a_422_naming_it(slow_template_export, monkeypatch):
    import coati.data.template as template

    monkeypatch.setattr(template, "TEMPLATE_SECONDS", 0.5)
    engine = RewardEngine(RewardScorer.from_pretrained(slow_template_export, device="cpu"))
    server, thread, url = _thread_server(engine, ServeSettings())
    try:
        r = httpx.post(url + "/score", json={"prompt": [{"role": "user", "content": "hi"}], "responses": ["a"]},
                       timeout=30)
        assert r.status_code == 422 and r.json() == {
            "error": f"the chat template of {slow_template_export} took longer than 0.5 s to render a conversation "
                     "of 1 messages; refused", "field": "prompt"}
        assert httpx.get(url + "/health", timeout=2).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
