"""Code: run the completion's Python against the row's tests in a sandbox.

Each completion runs in the sandbox of `rewards.sandbox` (bubblewrap: no network, no view of the
trainer, read-only files, CPU, memory, process and output limits, a wall-clock limit).

The first call checks, once per process, that the sandbox starts (a trivial solution must pass) and
that forking past the process limit fails. If not (bwrap missing, user namespaces forbidden, as in
containers without CAP_SYS_ADMIN or the right seccomp or AppArmor profile; root without a writable
pids cgroup), the reward raises `RewardContractError`: the run and `rft reward check` stop with
one line naming what is missing, instead of scoring every completion 0. `isolation: none` runs the
code as a plain subprocess with the same limits except the process count, and without any of the
sandbox's namespaces: code that forks, calls `setsid` or signals other processes escapes it. Use it
only for code you trust.

Tests (column `tests` by default), in one of three forms:

- a string: a test program run after the solution (e.g. MBPP/HumanEval asserts); 1 or 0;
- a list of strings: separate test snippets (asserts), each passing or failing alone; the score is
  the share passed;
- a list of `{"input": str, "output": str}`: the solution reads stdin and must print the output
  (compared line by line, trailing spaces ignored); the score is the share passed.

Assert tests count only if the harness reaches its end and prints a per-run secret it read from
stdin before the solution ran: a solution that calls `sys.exit(0)` early fails instead of passing.
This guards against accidents, not against code written to attack the harness.

Recipe::

    rewards:
      - fn: rewards.code:code_tests
        kwargs: {timeout_s: 5, memory_mb: 512}
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rewards.base import RewardContractError, RewardValues, column, completion_text
from rewards.sandbox import ISOLATIONS, MAX_PROCESSES, prepare, run_sandboxed

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Runs the solution, then the asserts, each in its own try; prints the secret and the result last.
_ASSERT_HARNESS = r"""
import json, sys
secret = sys.stdin.readline().strip()
cases = json.load(open(sys.argv[1] + "/cases.json"))
source = open(sys.argv[1] + "/solution.py").read()
namespace = {"__name__": "__main__"}
try:
    exec(compile(source, "solution.py", "exec"), namespace)
    loaded = True
except BaseException as exc:
    loaded = False
    sys.stderr.write("solution raised %s: %s\n" % (type(exc).__name__, exc))
passed = 0
if loaded:
    for case in cases:
        scope = dict(namespace)
        try:
            exec(compile(case, "test.py", "exec"), scope)
            passed += 1
        except BaseException as exc:
            sys.stderr.write("test failed: %s: %s\n" % (type(exc).__name__, exc))
sys.stdout.write("\n" + secret + " " + str(passed) + "\n")
"""

_STDIO_HARNESS = r"""
import sys
source = open(sys.argv[1] + "/solution.py").read()
exec(compile(source, "solution.py", "exec"), {"__name__": "__main__"})
"""


def extract_code(text: str) -> str:
    """The last fenced Python block of a completion, or the whole completion when it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _same_output(actual: str, expected: str) -> bool:
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.strip().splitlines()]

    return lines(actual) == lines(expected)


@dataclass
class CaseResult:
    passed: int
    total: int
    timed_out: bool


_probe_lock = threading.Lock()
# (isolation, bwrap, memory_mb) -> "" when the sandbox starts, else why not
_probed: dict[tuple[str, str, int], str] = {}


def check_sandbox(isolation: str = "bwrap", memory_mb: int = 512) -> None:
    """Raise `RewardContractError` in one line when the sandbox cannot start here, naming what is
    missing and the choices. Probes once per process and setting: a trivial solution must pass."""
    if isolation not in ISOLATIONS:
        raise RewardContractError(
            f"code_tests: isolation must be one of {list(ISOLATIONS)}, got {isolation!r}"
        )
    tool = (shutil.which("bwrap") or "") if isolation == "bwrap" else ""
    key = (isolation, tool, memory_mb)
    with _probe_lock:
        if key not in _probed:
            _probed[key] = _probe(isolation, tool, memory_mb)
    if _probed[key]:
        raise RewardContractError(_probed[key])


# The probe's solution: forks past the process limit; its children sleep until the sandbox is killed.
_PROBE_FORKS = f"""
import os, time
forked = 0
for _ in range({MAX_PROCESSES + 8}):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    forked += 1
"""


def _probe(isolation: str, tool: str, memory_mb: int) -> str:
    """Run a trivial solution, and under bwrap one forking past the limit: "" when all holds, else why not."""
    if isolation == "bwrap" and not tool:
        return (
            "code_tests cannot sandbox the completions' code: bubblewrap (bwrap) is not on PATH; install it "
            "(apt-get install bubblewrap, dnf install bubblewrap), or set `isolation: none` in the reward's "
            "kwargs for trusted code only"
        )
    solution, test = ("", "assert True") if isolation == "none" else (_PROBE_FORKS, "print('forked', forked)")
    directory = prepare(solution, _ASSERT_HARNESS)
    (directory / "cases.json").write_text(json.dumps([test]))
    try:
        run = run_sandboxed(directory, "probe\n", 60.0, memory_mb, isolation)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if run.returncode != 0 or not run.stdout.rstrip("\n").endswith("probe 1"):
        why = " ".join(run.stderr.split()) or f"exit code {run.returncode}, no message"
        if isolation == "none":
            return f"code_tests cannot run Python under its limits (memory_mb: {memory_mb}): {why}"
        return (
            f"code_tests cannot sandbox the completions' code: {tool} failed: {why}; bubblewrap needs "
            "user namespaces: allow them (sysctl kernel.unprivileged_userns_clone=1 and "
            "user.max_user_namespaces > 0; Ubuntu 24.04: kernel.apparmor_restrict_unprivileged_userns=0; "
            "in a container, a seccomp profile that allows them, e.g. docker run --security-opt "
            "seccomp=unconfined), run the trainer as a non-root user (root without CAP_SYS_ADMIN cannot map "
            "its own uid), or set `isolation: none` in the reward's kwargs for trusted code only"
        )
    if isolation == "bwrap" and f"forked {MAX_PROCESSES + 8}" in run.stdout:
        return (
            f"code_tests cannot limit the sandbox to {MAX_PROCESSES} processes: RLIMIT_NPROC does not bind "
            "a trainer run as root, and no pids cgroup is writable here (/sys/fs/cgroup/pids, or cgroup v2 "
            "with pids delegated); run the trainer as a non-root user, or give it a writable pids cgroup, "
            "or set `isolation: none` in the reward's kwargs for trusted code only"
        )
    return ""


def run_tests(
    code: str, tests: Any, timeout_s: float = 5.0, memory_mb: int = 512, isolation: str = "bwrap"
) -> CaseResult:
    """Run `code` against `tests` (see the module docstring) in the sandbox; `RewardContractError`
    when the sandbox cannot start (see `check_sandbox`)."""
    check_sandbox(isolation, memory_mb)
    if isinstance(tests, list) and tests and all(isinstance(t, Mapping) for t in tests):
        passed = 0
        timed_out = False
        for case in tests:
            directory = prepare(code, _STDIO_HARNESS)
            try:
                run = run_sandboxed(directory, str(case["input"]), timeout_s, memory_mb, isolation)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            timed_out |= run.timed_out
            passed += int(run.returncode == 0 and _same_output(run.stdout, str(case["output"])))
        return CaseResult(passed, len(tests), timed_out)
    if isinstance(tests, str):
        cases = [tests]
    elif isinstance(tests, list) and all(isinstance(t, str) for t in tests):
        cases = list(tests)
    else:
        raise ValueError("tests must be a string, a list of strings, or a list of {input, output} objects")
    directory = prepare(code, _ASSERT_HARNESS)
    (directory / "cases.json").write_text(json.dumps(cases))
    secret = secrets.token_hex(16)
    try:
        run = run_sandboxed(directory, secret + "\n", timeout_s, memory_mb, isolation)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    passed = 0
    if run.returncode == 0:
        last = run.stdout.rstrip("\n").rsplit("\n", 1)[-1].split(" ")
        if len(last) == 2 and last[0] == secret and last[1].isdigit():
            passed = int(last[1])
    return CaseResult(passed, len(cases), run.timed_out)


def code_tests(
    completions: list[Any],
    *,
    tests_column: str = "tests",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    workers: int = 2,
    isolation: str = "bwrap",
    **columns: Any,
) -> RewardValues:
    """Share of the row's tests the completion's code passes (see the module docstring); None for
    rows without tests. Component `passed_all`; counter `timeouts`. `isolation`: `bwrap` (default) or
    `none` (no namespaces: trusted code only). Raises `RewardContractError`, which stops the run, when
    the sandbox cannot start."""
    all_tests = column(columns, tests_column, len(completions), "code_tests")
    check_sandbox(isolation, memory_mb)  # before the pool: one error, not one per completion

    def score(index: int) -> CaseResult | None:
        tests = all_tests[index]
        if tests is None or tests == []:
            return None
        code = extract_code(completion_text(completions[index]))
        return run_tests(code, tests, timeout_s, memory_mb, isolation)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(score, range(len(completions))))
    scores = [None if r is None else r.passed / r.total for r in results]
    passed_all = [None if r is None else float(r.passed == r.total) for r in results]
    timeouts = sum(1 for r in results if r is not None and r.timed_out)
    return RewardValues(scores, components={"passed_all": passed_all}, counters={"timeouts": timeouts})


code_tests.reward_range = (0.0, 1.0)  # type: ignore[attr-defined]
# Run by the scorer when it is built, with the recipe's kwargs: a sandbox that cannot start stops
# `rft train` and `rft reward check` before any model loads (see rft.scoring).
code_tests.preflight = check_sandbox  # type: ignore[attr-defined]
