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


def test_triton_kernels_interpreted_on_cpu_processes_only(monkeypatch):
    """conftest.py interprets Triton kernels in a test process that sees no GPU (and only there: on a
    GPU, interpreted kernels could not be captured in CUDA graphs, so tests/test_cuda.py would test
    the fallback); the CPU processes tests launch interpret them on any machine, GPU ones compile them."""
    import os

    import torch

    from tests.helpers import child_env

    assert (os.environ.get("TRITON_INTERPRET") == "1") == (not torch.cuda.is_available())
    for outside in ("1", None):  # a CPU machine's test process, a GPU machine's
        if outside is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", outside)
        cpu, gpu = child_env(), child_env(gpu=True)
        assert cpu["TRITON_INTERPRET"] == "1" and cpu["CUDA_VISIBLE_DEVICES"] == ""
        assert "TRITON_INTERPRET" not in gpu and gpu.get("CUDA_VISIBLE_DEVICES") != ""
