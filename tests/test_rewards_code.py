"""The code reward's sandbox: tests pass and fail as they should, and the code cannot escape its limits."""

from __future__ import annotations

import os
import time

import pytest

from rewards.code import code_tests, extract_code, run_tests

ADD = "def add(a, b):\n    return a + b\n"


def test_assert_tests_share_passed():
    assert run_tests(ADD, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]).passed == 2
    wrong = run_tests("def add(a, b):\n    return a - b\n", ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    assert (wrong.passed, wrong.total) == (1, 2)
    assert run_tests(ADD, "assert add(2, 2) == 4\nassert add(1, 1) == 2").passed == 1  # one program


def test_stdin_stdout_tests():
    code = "a, b = map(int, input().split())\nprint(a + b)\n"
    result = run_tests(code, [{"input": "1 2\n", "output": "3"}, {"input": "5 5", "output": "11\n"}])
    assert (result.passed, result.total) == (1, 2)


def test_early_exit_does_not_pass():
    for cheat in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n"):
        assert run_tests(ADD + cheat, "assert add(1, 2) == 4").passed == 0


def test_time_limit_kills_the_process_group():
    started = time.perf_counter()
    result = run_tests("import subprocess\nsubprocess.Popen(['sleep', '60'])\nwhile True:\n    pass\n", "assert True", timeout_s=1.5)
    assert result.timed_out and result.passed == 0
    assert time.perf_counter() - started < 5


def test_memory_limit():
    assert run_tests("block = bytearray(3 * 1024 ** 3)\n", "assert True", memory_mb=256).passed == 0
    assert run_tests("block = bytearray(16 * 1024 ** 2)\n", "assert len(block) > 0", memory_mb=256).passed == 1


def test_no_network_and_no_writes_outside_its_directory(tmp_path):
    connect = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n"
    assert run_tests(connect, "assert True").passed == 0
    target = tmp_path / "escaped.txt"
    assert run_tests(f"open({str(target)!r}, 'w').write('x')\n", "assert True").passed == 0
    assert not target.exists()
    local = "open('scratch.txt', 'w').write('ok')\n"
    assert run_tests(local, "assert open('scratch.txt').read() == 'ok'").passed == 1


def test_environment_is_bare():
    os.environ["RFT_TEST_SECRET"] = "hunter2"
    try:
        assert run_tests("import os\n", "assert 'RFT_TEST_SECRET' not in os.environ").passed == 1
    finally:
        del os.environ["RFT_TEST_SECRET"]


def test_code_tests_reward_extracts_fenced_code():
    completions = [
        f"Here is my solution:\n```python\n{ADD}```\nDone.",
        "```python\ndef add(a, b):\n    return 0\n```",
        "I cannot solve this.",
    ]
    tests = ["assert add(1, 2) == 3", "assert add(2, 3) == 5"]
    values = code_tests(completions, tests=[tests, tests, None])
    assert values == [1.0, 0.0, None]
    assert values.components["passed_all"] == [1.0, 0.0, None]
    assert extract_code("no fence") == "no fence"
    with pytest.raises(ValueError, match="tests must be"):
        run_tests(ADD, 42)
