"""The fast lane's guard (tests/conftest.py): an unmarked test cannot start a Python process, a
marked one can."""
import subprocess
import sys

import pytest

from tests.conftest import starts_python


def test_an_unmarked_test_cannot_start_python():
    with pytest.raises(pytest.fail.Exception, match="test_an_unmarked_test_cannot_start_python starts a process "
                                                    r".* but is not marked: add @pytest.mark.processes"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert subprocess.run(["true"]).returncode == 0  # other programs are not checked


@pytest.mark.processes
def test_a_marked_test_can():
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"


@pytest.mark.parametrize("args,expected", [
    ([sys.executable, "-m", "torch.distributed.run", "train.py"], True),
    (["torchrun", "--nproc_per_node", "2", "train.py"], True),
    (["/usr/bin/python3.11", "x.py"], True),
    (["unshare", "--user", "sh", "-c", f"{sys.executable} -c pass"], True),
    ("python -c pass", True),
    (["gcc", "-O2", "python_ext.c"], False),
    (["fc-list", "--format=%{file}"], False),
])
def test_what_counts_as_a_python_process(args, expected):
    assert starts_python(args) == expected
