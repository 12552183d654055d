"""Every Triton kernel compiled for sm_90 (Hopper) on this machine, without a GPU, at the key widths
the plan sends to it on CUDA: each fits the H200's shared memory (``benchmarks/kernel_resources.py``).

A kernel over that limit compiles, passes its checks under the CPU interpreter, and only fails at its
first launch on the GPU: the per-channel delta rule's backward at chunk 64 did, and the
linear-attention backward at a key width of 256 would have. The compile is a subprocess without
``TRITON_INTERPRET`` (this process's triton may be set up to interpret)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "benchmarks" / "kernel_resources.py"


def _binaries() -> bool:
    """triton with its bundled ptxas and cuobjdump, found without importing triton: the kernel
    tests beside this file set triton up for its interpreter first."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return False
    bindir = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin"
    return (bindir / "ptxas").exists() and (bindir / "cuobjdump").exists()


pytestmark = pytest.mark.skipif(not _binaries(), reason="needs triton with its ptxas and cuobjdump")


def _resources(tmp_path: Path, *args: str) -> tuple[int, list[dict], str]:
    out = tmp_path / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(TOOL), *args, "--json", str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    return done.returncode, rows, done.stdout + done.stderr


def test_the_per_channel_kernels_fit_at_key_width_128(tmp_path):
    """GLA's and KDA's kernels, the closest to the H100's shared memory, at the library's widest
    heads (their backward's own kernels launch on 8 warps): each compiles for sm_90 and fits. The
    other ops' kernels: the ``slow`` test below (two minutes)."""
    rc, rows, log = _resources(tmp_path, "--dim", "128", "--cases", "kda", "gla")
    assert rc == 0, log
    warps = {(r["case"], r["kernel"]): r["warps"] for r in rows}
    assert warps[("kda", "grads")] == warps[("kda", "dv_local")] == warps[("gla", "grads_channel")] == 8, warps
    assert warps[("kda", "prepare")] == 4, warps
    assert all(r["fits"] and "error" not in r for r in rows), log


@pytest.mark.slow
def test_every_kernel_fits_at_key_width_128(tmp_path):
    """The widths of the library's models (64–128): every kernel of the eight ops (delta rule plain
    and gated, linear attention per head, GLA, KDA, Titans' MLP memory, the online recurrence, the
    short convolution) compiles for sm_90 and fits in shared memory."""
    rc, rows, log = _resources(tmp_path, "--dim", "128")
    assert rc == 0, log
    seen = {(r["case"], r["kernel"]) for r in rows}
    for case, kernel in [("delta_rule", "wy_bwd"), ("gated_delta_rule", "qkw_bwd"), ("linear_attention", "grads"),
                         ("gla", "grads_channel"), ("kda", "grads"), ("kda", "prepare"), ("gla", "state_bwd"),
                         ("mlp_memory", "bwd"), ("mlp_memory", "bwd_step"), ("mlp_memory", "fwd_step"),
                         ("recurrence", "bwd"), ("short_conv", "da")]:
        assert (case, kernel) in seen, (case, kernel, sorted(seen))
    assert all(r["fits"] and "error" not in r for r in rows), log
    # the per-channel kernels run 32 tokens a chunk, whatever the level asks for
    assert {r["C"] for r in rows if r["case"] in ("gla", "kda") and r["kernel"] != "state_fwd"} == {32}


def test_it_finds_the_launch_failure_the_h200_found(tmp_path):
    """Before ``CHANNEL_CHUNK``, KDA's backward at Dk=128 and chunk 64 in bfloat16 asked the H200 for
    262,144 bytes of shared memory (``OutOfResources`` at its first launch; 232,448 there): the tool
    computed that same figure on this machine with triton 3.6 (the GPU's version), and exits 1. The
    kernel has changed since (its scores' three uses in one walk: 245,760 bytes), and still does not
    fit at chunk 64."""
    rc, rows, log = _resources(tmp_path, "--cases", "kda", "--channel-chunk", "64")
    grads = [r for r in rows if r["kernel"] == "grads"]
    assert rc == 1 and len(grads) == 1, log
    assert grads[0]["C"] == 64 and not grads[0]["fits"], grads
    from importlib.metadata import version

    if version("triton").startswith("3.6."):  # another triton lays out shared memory its own way
        assert grads[0]["smem"] == 245760, grads


@pytest.mark.slow
def test_every_kernel_fits_at_key_width_256(tmp_path):
    """The delta-rule and linear-attention kernels, per head and per key channel, take keys up to 256
    wide on CUDA (Titans' MLP memory and the recurrence stop at 128), and fit there too."""
    rc, rows, log = _resources(tmp_path, "--dim", "256", "--cases", "delta_rule", "gated_delta_rule",
                               "linear_attention", "gla", "kda")
    assert rc == 0 and rows and all(r["fits"] and "error" not in r for r in rows), log
