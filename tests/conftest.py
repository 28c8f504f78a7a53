import getpass
import os
import re
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


def _gpu_visible() -> bool:
    import torch  # imports no triton

    return torch.cuda.is_available()


# Triton's CPU interpreter, chosen before anything imports triton (its own library functions are
# built for one mode at import): the tests that run a GPU kernel on the CPU opt in through
# models.decode_kernels.CPU_KERNEL; every other CPU path keeps its torch twin. Not where a GPU is
# visible: there the kernels compile for it (tests/test_cuda.py; interpreted, a CUDA graph could not
# capture them), and the CPU processes the tests launch interpret them (tests/helpers.child_env)
if not _gpu_visible():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def dist1():
    """A one-process world (gloo) with fairscale's groups: TP=1 in the test process."""
    from engine.runtime import distributed

    return distributed.setup(tp_size=1, device="cpu", own=False)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from data.make_tokenizer import default_corpus, train_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return train_tokenizer(path, default_corpus(500))


@pytest.fixture
def inductor_cache(monkeypatch):
    """A persistent inductor cache of this project's tests (one set in the environment wins); inductor's
    caches are keyed by content, so a stale entry is never used."""
    default = os.path.join(tempfile.gettempdir(), f"cot-distill-tests-inductor-{getpass.getuser()}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", default))


def shared_path(*parts):
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not available")
    return path


# ----- the two lanes: `make test` runs everything, `make test-fast` the tests not marked `processes` --
# A test that starts a Python process (torchrun, a launcher, a worker) must carry
# @pytest.mark.processes; one that does so unmarked fails here, in either lane, so the fast lane
# cannot quietly grow slow. Other programs (a compiler, fc-list) are not checked.
_PYTHON = re.compile(r"(^|[\s/])(python[0-9.]*|torchrun)(\s|$)")
_execute_child = subprocess.Popen._execute_child


def starts_python(args) -> bool:
    text = args if isinstance(args, (str, bytes)) else " ".join(map(os.fsdecode, args))
    text = os.fsdecode(text)
    return sys.executable in text or _PYTHON.search(text) is not None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("processes") is not None:
        yield
        return

    def guarded(popen, args, *rest, **kw):
        if starts_python(args):
            pytest.fail(f"{item.nodeid} starts a process ({os.fsdecode(args if isinstance(args, (str, bytes)) else args[0])} "
                        f"...) but is not marked: add @pytest.mark.processes", pytrace=False)
        return _execute_child(popen, args, *rest, **kw)

    subprocess.Popen._execute_child = guarded
    try:
        yield
    finally:
        subprocess.Popen._execute_child = _execute_child
