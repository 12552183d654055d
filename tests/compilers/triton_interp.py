"""Shared set-up of the kernel tests: without CUDA, Triton kernels run in its interpreter, which
Triton reads from ``TRITON_INTERPRET`` when it is first imported — so it is set only around that
import (and, by the tests' fixtures, while kernel tests run), then put back, leaving other tests
untouched. Importing this module skips the importing test module when triton is absent."""

import os
import sys

import pytest
import torch

INTERPRET = not torch.cuda.is_available()
"""Whether the kernels run in Triton's interpreter (no CUDA here)."""


def set_interpret(value):
    """Set (``"1"``) or clear (``None``) ``TRITON_INTERPRET``; returns the previous value."""
    old = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    return old


if INTERPRET and "triton" not in sys.modules:
    _old = set_interpret("1")
    try:
        pytest.importorskip("triton")
        from nlgraph.compilers.kernels import _delta_rule_triton  # noqa: F401  (decorated now)
    finally:
        set_interpret(_old)
else:
    pytest.importorskip("triton")

from nlgraph.compilers.kernels import _delta_rule_triton  # noqa: E402

if INTERPRET and not _delta_rule_triton.INTERPRETED:  # pragma: no cover - import-order guard
    pytest.fail("triton was imported before the kernel tests could set TRITON_INTERPRET=1, so its "
                "kernels cannot run on CPU here; run these files in their own process", pytrace=False)


@pytest.fixture(scope="module")
def interpreter_while_testing():
    """Triton also reads the setting when a launch first imports parts of itself (gluon), so keep it
    on while a kernel test module's tests run, and put it back afterwards. A kernel test module
    imports this fixture and marks it ``autouse`` with ``pytestmark``."""
    if not INTERPRET:
        yield
        return
    old = set_interpret("1")
    yield
    set_interpret(old)


@pytest.fixture
def kernels_on():
    """Each test with the kernels on: interpreted on CPU (``TRITON_INTERPRET`` kept on while it runs),
    ``auto`` on CUDA; put back afterwards. A test module imports it and marks it ``autouse`` with
    ``pytestmark``."""
    from nlgraph.compilers.kernels import dispatch

    old = set_interpret("1") if INTERPRET else None
    dispatch.set_kernels("interpret" if INTERPRET else "auto")
    yield
    dispatch.set_kernels(None)
    if INTERPRET:
        set_interpret(old)


@pytest.fixture
def channel_offsets(monkeypatch):
    """The per-channel kernels with their own-chunk scores built one key offset at a time
    (``_linear_attention_triton.CHANNEL_TREE`` off; the tree of products is the default). Under
    the interpreter the kernels read the module's value at every call. Compiled, Triton keys its
    cache on the value and refuses a launch after the value changed ("Global variable ... has
    changed"), so on CUDA the test runs as the process was started."""
    import triton.language as tl

    from nlgraph.compilers.kernels import _delta_rule_channel_triton as kda
    from nlgraph.compilers.kernels import _linear_attention_triton as mod

    if INTERPRET:  # KDA's kernels import the switch: both modules' names
        monkeypatch.setattr(mod, "CHANNEL_TREE", tl.constexpr(False))
        monkeypatch.setattr(kda, "CHANNEL_TREE", tl.constexpr(False))
    elif mod.CHANNEL_TREE:
        pytest.skip("on CUDA the compiled kernels keep the switch the process started with: "
                    "run these tests with NLGRAPH_CHANNEL_TREE=0")
    return not mod.CHANNEL_TREE


def rel(a, b) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
