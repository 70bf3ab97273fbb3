"""The installed pair, said in one line: torch and torchvision that work together, or what
is wrong and the command that installs the tested pair; the README, constraints.txt and
the check name the same pair."""
import os
import re
import subprocess
import sys

from helpers import ENV, REPO, assert_clear_error
from utils.environment import TESTED


def environment(env=ENV):
    return subprocess.run([sys.executable, "-m", "utils.environment"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_working_pair_is_one_line():
    import torch
    import torchvision
    result = environment()
    assert result.returncode == 0, result.stderr
    line, = result.stdout.splitlines()
    said = re.fullmatch(r"torch (\S+) and torchvision (\S+) work together", line)
    assert said, line
    assert [v.split("+")[0] for v in said.groups()] == [torch.__version__.split("+")[0],
                                                        torchvision.__version__.split("+")[0]]


def test_a_torchvision_built_for_another_torch_is_one_line_with_the_command_that_mends_it(tmp_path):
    """What pip leaves when it takes torchvision from one index and torch from another."""
    broken = tmp_path / "torchvision"
    broken.mkdir()
    (broken / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    result = environment(dict(ENV, PYTHONPATH=str(tmp_path)))
    assert_clear_error(result, "do not work together", "operator torchvision::nms does not exist",
                       f"pip install torch=={TESTED[0]} torchvision=={TESTED[1]}")


def test_the_readme_constraints_and_the_check_name_one_pair():
    with open(os.path.join(REPO, "constraints.txt")) as f:
        pinned = dict(re.findall(r"^([\w-]+)==(\S+)$", f.read(), re.M))
    assert (pinned["torch"], pinned["torchvision"]) == TESTED
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    installs = set(re.findall(r"pip install torch==(\S+) torchvision==(\S+)", readme))
    assert installs == {TESTED}, installs
