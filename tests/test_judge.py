"""The LLM judge against a real OpenAI-compatible HTTP server on 127.0.0.1 (stdlib http.server).

The server grades like a (very simple) judge model would: a response containing "correct" gets
9/10, "wrong" 2/10, "garbage" an answer without a score; pairwise, the longer response wins. Other
words trigger transport behaviour: "slow" (answers after 3 s), "flaky" (HTTP 500 twice, then an
answer), "limited" (HTTP 429 with Retry-After once), "pause" (0.3 s of latency), "trickle" (the
body, or with "headers" the headers too, a byte every 0.25 s: no read ever waits long), "html" (HTTP
200 with a web page), "truncated" (HTTP 200, application/json, half a JSON object), "loading" (HTTP
200, JSON that is not a chat completion).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from rewards.base import RewardValues
from rewards.judge import JudgeFailure, LLMJudge, parse_score, parse_winner
from rft.config import RewardConfig, ScoringConfig
from rft.scoring import RewardScorer


class JudgeServer:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.seen: Counter[str] = Counter()
        self.authorizations: list[str | None] = []
        self.always_a = False
        self.stopping = threading.Event()
        self.dropped = 0  # trickled replies whose connection the client closed
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.authorizations.append(self.headers.get("Authorization"))
                if server.raw_reply(self, body["messages"][-1]["content"]):
                    with server.lock:
                        server.in_flight -= 1
                    return
                try:
                    status, payload, extra = server.answer(self.path, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in extra.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, path: str, body: dict) -> tuple[int, dict, dict[str, str]]:
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}"}}, {}
        if body["model"] != "judge-model":
            return (
                404,
                {"error": {"message": f"model {body['model']} not found", "type": "invalid_request_error"}},
                {}
            )
        prompt = body["messages"][-1]["content"]
        key = json.dumps(body, sort_keys=True)
        with self.lock:
            self.seen[key] += 1
            attempt = self.seen[key]
        if "slow" in prompt:
            time.sleep(3)
        if "pause" in prompt:
            time.sleep(0.3)
        if "flaky" in prompt and attempt <= 2:
            return 500, {"error": {"message": "overloaded", "type": "server_error"}}, {}
        if "limited" in prompt and attempt == 1:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": "0"}
        if "Response A:" in prompt:
            text = self.pairwise(prompt)
        else:
            response = prompt.split("Response:\n", 1)[1].rsplit("\n\nExplain", 1)[0]
            if "garbage" in response:
                text = "I would rather not grade this."
            elif "correct" in response:
                text = "Accurate and polite.\nScore: 9"
            elif "wrong" in response:
                text = "The total is off.\nScore: 2"
            else:
                text = "Unclear.\nScore: 5"
        return 200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"],
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }, {}

    def raw_reply(self, handler: BaseHTTPRequestHandler, prompt: str) -> bool:
        """Replies no well-behaved endpoint sends; True when one was sent."""
        response = prompt.split("Response:\n", 1)[-1]
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        if "trickle" in response:
            body = b" " * 100000
            if "headers" in response:
                self.trickle(handler, head + body)
            else:
                handler.wfile.write(head)
                handler.wfile.flush()
                self.trickle(handler, body)
            return True
        pages = {"html": ("text/html", b"<html><body><h1>Welcome to nginx!</h1></body></html>"),
                 "truncated": ("application/json", b'{"id": "chatcmpl-test", "choices": [{"mess'),
                 "loading": ("application/json", b'{"object": "error", "message": "model is loading"}')}
        for word, (content_type, page) in pages.items():
            if word in response:
                handler.send_response(200)
                handler.send_header("Content-Type", content_type)
                handler.send_header("Content-Length", str(len(page)))
                handler.end_headers()
                handler.wfile.write(page)
                return True
        return False

    def trickle(self, handler: BaseHTTPRequestHandler, data: bytes) -> None:
        try:
            for index in range(len(data)):
                if self.stopping.wait(0.25):
                    break
                handler.wfile.write(data[index : index + 1])
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            with self.lock:
                self.dropped += 1  # the client gave up and closed the connection: what the tests want
        handler.close_connection = True

    def pairwise(self, prompt: str) -> str:
        if self.always_a:
            return "Winner: A"
        a = re.search(r"Response A:\n(.*?)\n\nResponse B:", prompt, re.S).group(1)
        b = re.search(r"Response B:\n(.*?)\n\nExplain", prompt, re.S).group(1)
        if len(a) == len(b):
            return "Equally good.\nWinner: tie"
        return f"More complete.\nWinner: {'A' if len(a) > len(b) else 'B'}"

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[JudgeServer]:
    instance = JudgeServer()
    yield instance
    instance.close()


def make_judge(server: JudgeServer, **kwargs) -> LLMJudge:
    settings = {"base_url": server.base_url, "model": "judge-model", "rubric": "Correct and polite.",
                "on_failure": 0.0, "backoff_s": 0.01, "timeout_s": 5.0, "api_key_env": None, **kwargs}
    return LLMJudge(**settings)


def test_scores_are_parsed_and_normalised(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-local-test")
    judge = make_judge(server, api_key_env="JUDGE_KEY")
    values = judge(
        ["The total is 12, correct.", "It is 13, wrong.", "Maybe."], prompts=["What is 7 + 5?"] * 3
    )
    assert values == pytest.approx([0.9, 0.2, 0.5])
    assert values.counters["requests"] == 3 and values.counters["failures"] == 0
    assert server.authorizations == ["Bearer sk-local-test"] * 3


def test_cache_and_duplicate_requests(server, tmp_path):
    cache = str(tmp_path / "judge.sqlite")
    judge = make_judge(server, cache_path=cache)
    first = judge(["correct", "correct", "wrong"], prompts=["q", "q", "q"])
    assert server.requests == 2  # the repeated completion was sent once
    again = judge(["correct", "wrong"], prompts=["q", "q"])
    assert server.requests == 2 and again.counters["cache_hits"] == 2
    assert list(first) == pytest.approx([0.9, 0.9, 0.2])
    restarted = make_judge(server, cache_path=cache)  # a new process would read the same file
    assert restarted(["wrong"], prompts=["q"]) == pytest.approx([0.2])
    assert server.requests == 2
    different_prompt = judge(["wrong"], prompts=["another question"])
    assert server.requests == 3 and different_prompt == pytest.approx([0.2])


def test_unparseable_replies_score_what_the_recipe_says(server):
    assert make_judge(server, on_failure=0.0)(["garbage"], prompts=["q"]) == [0.0]
    values = make_judge(server, on_failure=None)(["garbage", "correct"], prompts=["q", "q"])
    assert values[0] is None and values.counters["unparseable"] == 1
    with pytest.raises(JudgeFailure, match="no score"):
        make_judge(server, on_failure="error")(["garbage"], prompts=["q"])
    with pytest.raises(ValueError, match="set `on_failure`"):
        LLMJudge(base_url=server.base_url, model="judge-model", rubric="r")


def test_retries_with_backoff_then_success(server):
    judge = make_judge(server, retries=3)
    values = judge(["flaky but correct", "limited but wrong"], prompts=["q", "q"])
    assert values == pytest.approx([0.9, 0.2])
    assert values.counters["retries"] == 3  # two 500s and one 429
    assert values.counters["requests"] == 5


def test_client_errors_are_not_retried(server):
    judge = make_judge(server, model="no-such-model", retries=3)
    values = judge(["correct"], prompts=["q"])
    assert (
        values == [0.0] and values.counters == {**values.counters, "requests": 1, "failures": 1, "retries": 0}
    )


def test_request_timeout(server):
    judge = make_judge(server, timeout_s=0.5, retries=1)
    started = time.perf_counter()
    values = judge(["slow and correct"], prompts=["q"])
    elapsed = time.perf_counter() - started
    assert values == [0.0] and values.counters["failures"] == 1 and values.counters["requests"] == 2
    assert elapsed < 2.5, elapsed  # two 0.5 s attempts, not the server's 3 s


def test_concurrency_limit(server):
    completions = [f"pause {i}" for i in range(8)]
    make_judge(server, concurrency=2)(completions, prompts=["q"] * 8)
    assert server.max_in_flight == 2
    server.max_in_flight = 0
    started = time.perf_counter()
    make_judge(server, concurrency=8)([f"pause {i} again" for i in range(8)], prompts=["q"] * 8)
    assert server.max_in_flight > 2
    assert time.perf_counter() - started < 8 * 0.3


def test_pairwise_preference_within_groups(server):
    judge = make_judge(server, mode="pairwise")
    completions = ["a", "a longer answer", "mid size", "x", "alone"]
    prompts = ["p1", "p1", "p1", "p2", "p3"]
    values = judge(completions, prompts=prompts)
    # p1: the longest wins all its comparisons, the shortest none; p2 and p3 have no one to compare with.
    assert values[:3] == pytest.approx([0.0, 1.0, 0.5])
    assert values[3] is None and values[4] is None
    assert values.counters["requests"] == 6  # 3 pairs, both orders


def test_pairwise_both_orders_cancel_position_bias(server):
    server.always_a = True
    judge = make_judge(server, mode="pairwise")
    assert judge(["short", "much longer answer"], prompts=["p", "p"]) == pytest.approx([0.5, 0.5])
    one_order = make_judge(server, mode="pairwise", both_orders=False)
    assert one_order(["short", "much longer answer"], prompts=["p", "p"]) == pytest.approx([1.0, 0.0])


def test_judge_through_the_scorer(server):
    config = RewardConfig(
        fn="rewards.judge:LLMJudge",
        kwargs={"base_url": server.base_url, "model": "judge-model", "rubric": "r", "on_failure": None,
                "api_key_env": None},
    )
    scorer = RewardScorer([config], ScoringConfig(concurrency=2))
    output = scorer.score(["q1", "q1", "q2", "q2"], ["correct", "wrong", "correct", "garbage"], [[]] * 4,
                          [{}] * 4,
                          group_size=2)
    assert output.per_function["judge_score"] == pytest.approx([0.9, 0.2, 0.9, None])
    assert output.metrics["reward/judge_score/requests"] == 4.0  # summed over the two group calls
    assert output.metrics["reward/judge_score/unparseable"] == 1.0


def test_parsers():
    assert parse_score("**Score:** 7/10", 0, 10) == 7.0
    assert parse_score("Score: 3\nOn reflection, Score: 4", 0, 10) == 4.0
    assert parse_score('{"score": 8}', 0, 10) == 8.0
    assert parse_score("Score: 11", 0, 10) is None
    assert parse_winner("Winner: b") == "B" and parse_winner("tie") == "tie" and parse_winner("both") is None


# ------------------------------------------------------------------------------------------ hostile endpoints
def _timed_call(judge: LLMJudge, completions: list[str], limit_s: float) -> tuple[RewardValues | None, float]:
    """The judge's values and how long the call took; None if it had not returned within `limit_s`."""
    outcome: dict[str, Any] = {}

    def call() -> None:
        started = time.perf_counter()
        outcome["values"] = judge(completions, prompts=["q"] * len(completions))
        outcome["elapsed"] = time.perf_counter() - started

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=limit_s)
    return outcome.get("values"), outcome.get("elapsed", limit_s)


@pytest.mark.parametrize("completion", ["trickle", "headers trickle"])
def test_a_trickling_reply_is_cut_at_the_whole_request_deadline(server, completion):
    """A byte every 0.25 s never trips a per-read timeout;
    the 2 s deadline covers connect, headers and body."""
    values, elapsed = _timed_call(
        make_judge(server, timeout_s=2.0, retries=0), [completion, "correct"], limit_s=15
    )
    assert values is not None, "the judge call was still waiting 15 s into a 2 s timeout"
    assert 1.9 < elapsed < 2.0 + 1.5, elapsed
    assert values == pytest.approx([0.0, 0.9]) and values.counters["failures"] == 1
    deadline = time.monotonic() + 3
    while server.dropped < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.dropped == 1, "the judge left the trickling connection open"


@pytest.mark.parametrize(("completion", "message"), [("html", "not JSON"), ("truncated", "not JSON"),
                                                     ("loading", "not a chat completion")])
def test_a_200_that_is_not_a_chat_completion_is_that_calls_failure(server, completion, message):
    values = make_judge(server, on_failure=0.0)([completion, "correct"], prompts=["q", "q"])
    assert values == pytest.approx([0.0, 0.9])
    assert (
        values.counters["failures"] == 1 and values.counters["requests"] == 2
        and values.counters["retries"] == 0
    )
    assert list(make_judge(server, on_failure=None)([completion], prompts=["q"])) == [None]
    with pytest.raises(JudgeFailure, match=message):
        make_judge(server, on_failure="error")([completion], prompts=["q"])


def test_a_web_page_from_the_judge_does_not_stop_the_run(server):
    """The judge's own on_failure handles it: under
    scoring.on_error: stop the run goes on, the group counts."""
    config = RewardConfig(
        fn="rewards.judge:LLMJudge",
        kwargs={
            "base_url": server.base_url, "model": "judge-model", "rubric": "r", "on_failure": None,
            "api_key_env": None,
        },
    )
    scorer = RewardScorer([config], ScoringConfig(on_error="stop"))
    output = scorer.score(["q", "q"], ["html", "correct"], [[]] * 2, [{}] * 2, group_size=2)
    assert output.per_function["judge_score"] == pytest.approx([None, 0.9])
    assert output.metrics["reward/judge_score/failures"] == 1.0 and not any(output.failed)
    scorer.close()


def test_close_cancels_requests_and_stops_the_judges_thread(server):
    config = RewardConfig(
        fn="rewards.judge:LLMJudge",
        kwargs={"base_url": server.base_url, "model": "judge-model", "rubric": "r", "on_failure": 0.0,
                "api_key_env": None, "timeout_s": 60.0, "retries": 0},
    )
    scorer = RewardScorer([config])
    judge = scorer.functions[0][2]
    outcome: dict[str, Any] = {}
    caller = threading.Thread(
        target=lambda: outcome.update(values=judge(["trickle"], prompts=["q"])), daemon=True
    )
    caller.start()
    time.sleep(0.5)
    started = time.perf_counter()
    scorer.close()
    caller.join(timeout=5)
    assert outcome["values"] == [0.0] and outcome["values"].counters["failures"] == 1
    assert time.perf_counter() - started < 2.0
    assert judge.client.is_closed()
    assert not judge.requests.thread.is_alive()
    with pytest.raises(RuntimeError, match="after close"):
        judge(["correct"], prompts=["q"])


ABANDONED_CALL = """
import sys, time
from rft.config import RewardConfig, ScoringConfig
from rft.scoring import RewardScorer

kwargs = {"base_url": sys.argv[1], "model": "judge-model", "rubric": "r", "on_failure": 0.0,\
 "api_key_env": None,
          "timeout_s": 30.0, "retries": 0}
# The scorer gives up on the call after 1 s, as training ends with a judge request still in flight (and
# 29 s from its deadline: a process that waited for it would show).
scorer = RewardScorer([RewardConfig(fn="rewards.judge:LLMJudge", timeout_s=1.0, kwargs=kwargs)],
                       ScoringConfig(on_error="zero"))
output = scorer.score(["q"], ["trickle"], [[]], [{}])
print(output.metrics["reward/judge_score/timeouts"], time.monotonic(), flush=True)
"""


def test_the_process_exits_promptly_after_an_abandoned_judge_call(server):
    """Nothing of the judge keeps the process alive: not a worker stuck on a trickling reply."""
    child = subprocess.Popen([sys.executable, "-c", ABANDONED_CALL, server.base_url], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail("the process was still alive 60 s after its judge call")
    exited = time.monotonic()
    assert child.returncode == 0, stderr[-2000:]
    timeouts, scored_at = (float(word) for word in stdout.split())
    assert timeouts == 1.0
    # ~1 s: interpreter teardown
    assert exited - scored_at < 10, f"exited {exited - scored_at:.2f} s after scoring"


LOGGED_CALL = """
import logging, sys
if sys.argv[2] == "cli":
    from rft.cli import configure_logging
    configure_logging()
else:
    logging.basicConfig(level=logging.INFO)
from rewards.judge import LLMJudge

judge = LLMJudge(base_url=sys.argv[1], model="judge-model", rubric="r", on_failure=0.0, api_key_env=None)
print(list(judge(["correct", "wrong"], prompts=["q", "q"])))
logging.getLogger("httpx2").warning("a warning of the HTTP client")
"""


def test_the_cli_logs_no_line_per_judge_request(server):
    def run(setup: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", LOGGED_CALL, server.base_url, setup],
                              capture_output=True,
                              text=True, timeout=60)

    plain, cli = run("plain"), run("cli")
    assert plain.stderr.count("HTTP Request: POST") == 2  # the flood, with logging left as it is
    assert cli.returncode == 0 and cli.stdout.strip() == "[0.9, 0.2]", cli.stderr[-2000:]
    assert "HTTP Request" not in cli.stderr
    assert "a warning of the HTTP client" in cli.stderr  # warnings and errors still show
