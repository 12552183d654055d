"""``benchmarks/compile_check.py --cold``'s reading of inductor's generated code: kernels counted
once each, and their launches inside loop bodies (which repeat once per chunk) told apart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "benchmarks" / "compile_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


WRAPPER = '''
cpp_fused_add_0 = async_compile.cpp_pybinding(['float*'], r\'\'\'
extern "C" void kernel(float* x) {}
\'\'\')
triton_poi_mul_1 = async_compile.triton('triton_poi_mul_1', \'\'\'
def triton_poi_mul_1(x): pass
\'\'\')
async_compile.wait(globals())

def while_loop_body_graph_0_0(args):
    buf0 = empty()
    cpp_fused_add_0(buf0)
    triton_poi_mul_1.run(buf0)
    cpp_fused_add_0(buf0)
    return [buf0]

def while_loop_cond_graph_0_0(args):
    return [args[0] < 3]

class Runner:
    def call(self, args):
        cpp_fused_add_0(args[0])
        return args
'''


def test_kernel_counts_tell_loop_body_launches_apart(tmp_path):
    (tmp_path / "ab").mkdir()
    (tmp_path / "ab" / "wrapper.py").write_text(WRAPPER)
    (tmp_path / "ab" / "other.py").write_text("x = 1\n")  # no kernels: not counted
    assert _module().kernel_counts(tmp_path) == {"kernels": 2, "cpp_kernels": 1, "launches_in_loop_bodies": 3}
    # a second graph sharing one kernel (renamed) and adding one: 3 distinct kernels
    second = WRAPPER.replace("cpp_fused_add_0", "cpp_fused_add_7").replace("def triton_poi_mul_1(x): pass",
                                                                          "def triton_poi_mul_1(x): return x")
    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / "wrapper.py").write_text(second)
    assert _module().kernel_counts(tmp_path) == {"kernels": 3, "cpp_kernels": 1, "launches_in_loop_bodies": 6}


def test_phases_are_reported_even_when_nothing_compiled():
    mod = _module()
    phases = mod._phases()
    assert set(phases) == set(mod.PHASES) | {"compile_times"}
    assert isinstance(phases.pop("compile_times"), dict)
    assert all(isinstance(v, float) and v >= 0 for v in phases.values())


def test_subprocess_trace_records_children_and_locks(tmp_path):
    import subprocess
    import sys

    from torch.utils._filelock import FileLock

    mod = _module()
    with mod.SubprocessTrace() as trace:
        subprocess.check_call([sys.executable, "-c", "import time; time.sleep(0.05)"])
        with FileLock(str(tmp_path / "x.lock")):
            subprocess.run([sys.executable, "-c", "pass"], check=True)
    summary = trace.summary()
    assert summary["children"] == 2 and summary["children_s"] >= 0.05
    assert summary["slowest_children"][0]["cmd"].startswith(sys.executable)
    assert [w["lock"] for w in summary["slowest_locks"]] == ["x.lock"] and summary["lock_held_s"] > 0
    # outside the block nothing is recorded
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert trace.summary()["children"] == 2


def test_subprocess_trace_records_triton_compiles(monkeypatch):
    from types import SimpleNamespace

    from triton.runtime.jit import JITFunction

    def compiled(fn, key, signature, device, constexprs, options, attrs, warmup):
        return "kernel"  # stands in for Triton's compile (no GPU here)

    monkeypatch.setattr(JITFunction, "_do_compile", compiled)
    fake = SimpleNamespace(fn=SimpleNamespace(__name__="_state_fwd"))
    with _module().SubprocessTrace() as trace:
        assert JITFunction._do_compile(fake, 0, {}, 0, {}, SimpleNamespace(num_warps=4), None, False) == "kernel"
    assert JITFunction._do_compile is compiled  # restored
    summary = trace.summary()
    assert summary["triton_compiles"] == 1
    assert summary["slowest_triton_compiles"][0]["kernel"] == "_state_fwd"
    assert summary["slowest_triton_compiles"][0]["warps"] == 4
