"""torch.compile with a way back.

`CompiledCall(fn, what)` calls the torch.compile'd fn; if compiling fails (a feature Dynamo or
inductor cannot handle on this machine), it says so in one line and runs fn eagerly from then on.
Errors of the computation itself (a shape mismatch, out of memory) are never hidden: only
compiler exceptions switch to eager.
"""
from __future__ import annotations

import os
import sys

_SAID = set()


def say_once(message: str) -> None:
    """One line on stderr from the first rank, once per process."""
    if message not in _SAID and os.environ.get("RANK", "0") == "0":
        _SAID.add(message)
        print(message, file=sys.stderr, flush=True)


def _compiler_errors() -> tuple:
    import torch._dynamo.exc as dynamo_exc

    errors = [dynamo_exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


class CompiledCall:
    def __init__(self, fn, what: str, **compile_kwargs):
        import torch._dynamo

        # one compiled graph per shape family; layers share the code, so allow many entries
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.fn, self.what = fn, what
        self.compiled = torch.compile(fn, **compile_kwargs)

    @property
    def active(self) -> bool:
        return self.compiled is not None

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except _compiler_errors() as e:
                self.compiled = None
                say_once(f"{self.what}: torch.compile failed ({' '.join(str(e).split())[:200]}); running eagerly")
        return self.fn(*args, **kwargs)
