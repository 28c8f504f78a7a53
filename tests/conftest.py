import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")


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


def shared_path(*parts):
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not available")
    return path
