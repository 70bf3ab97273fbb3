"""The README's test command ends with a summary whatever a test does: a test that hangs
in native code fails at the time limit, a test that crashes its process fails, and the
others still run. (pytest-xdist's file-grouping modes can hang or replay a crashing test
when a worker dies; the README's mode does neither.)"""
import os
import re
import shlex
import subprocess
import sys
import time

from helpers import ENV, REPO

HOSTILE = '''
import ctypes, os, signal
def test_before(): pass
def test_hangs_in_native_code(): ctypes.CDLL(None).sleep(600)  # no Python signal reaches it
def test_crashes_its_process(): os.kill(os.getpid(), signal.SIGSEGV)
def test_after(): pass
'''


def readme_test_command():
    with open(os.path.join(REPO, "README.md")) as f:
        found = re.search(r"^(python -m pytest [^#\n]*?)\s*#", f.read(), re.M)
    assert found, "the README gives no test command"
    return shlex.split(found.group(1))


def test_a_hanging_and_a_crashing_test_fail_and_the_run_ends_with_a_summary(tmp_path):
    command = readme_test_command()
    assert command[-1] == "tests"
    (tmp_path / "test_hostile.py").write_text(HOSTILE)
    (tmp_path / "test_others.py").write_text("def test_one(): pass\ndef test_two(): pass\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # this folder is the root, not the repository
    began = time.monotonic()
    run = subprocess.run([sys.executable, *command[1:-1], "-p", "no:cacheprovider", "-o", "timeout=5",
                          "-o", "timeout_method=thread", str(tmp_path)],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - began < 240
    summary = run.stdout.strip().splitlines()[-1]
    assert re.search(r"\b2 failed, 4 passed\b", summary), run.stdout[-3000:]
    assert "test_hangs_in_native_code" in run.stdout and "test_crashes_its_process" in run.stdout


def test_the_repository_sets_a_time_limit_for_every_test():
    """The limit and its method live in pyproject.toml, where pytest reads them whatever the
    command line."""
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        text = f.read()
    assert re.search(r"^timeout = \d+$", text, re.M) and 'timeout_method = "thread"' in text


BROKEN_TORCHVISION = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def test_a_torchvision_of_another_torch_is_one_line_for_main_and_for_the_suite(tmp_path):
    """The failure pip leaves where torch's index cannot be reached: a torchvision built for
    another torch fails on import. main.py (the demo included, which needs no torchvision)
    and the test suite each say so in one line, naming both versions and what to install."""
    (tmp_path / "torchvision").mkdir()
    (tmp_path / "torchvision" / "__init__.py").write_text(BROKEN_TORCHVISION)
    env = dict(ENV, PYTHONPATH=str(tmp_path))
    demo = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--demo", "--results_dir",
                           str(tmp_path / "results")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 1 and demo.stdout == ""
    line, = demo.stderr.strip().splitlines()
    assert re.fullmatch(r"error: torch \S+ and torchvision \S+ do not work together \(operator torchvision::nms does "
                        r"not exist\): install a matching pair, e\.g\. pip install torch==\S+ torchvision==\S+ .*", line)
    assert not (tmp_path / "results").exists()
    suite = subprocess.run([sys.executable, *readme_test_command()[1:-1], "-p", "no:cacheprovider",
                            os.path.join(REPO, "tests", "test_house.py")], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
    assert suite.returncode == 4, suite.stdout + suite.stderr
    assert (suite.stdout + suite.stderr).strip().splitlines() == [f"Exit: {line}"]
