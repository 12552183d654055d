"""Memories read exactly as their definitions, per head, written out with plain torch."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from levelcheck import SEEDS, Draw, assert_close

from nlgraph.levels import build_memory
from nlgraph.spec.loader import load_level


def _spec(memory):
    return load_level({"memory": memory}).memory


@given(SEEDS, st.integers(1, 3), st.integers(2, 5), st.integers(2, 5), st.integers(1, 4),
       st.sampled_from(["gelu", "silu", "relu", "relu2", "tanh", "swiglu", "geglu"]), st.booleans())
def test_mlp_memory_is_its_definition(seed, depth, d_in, d_out, hidden, activation, bias):
    d = Draw(seed)
    spec = _spec({"kind": "mlp", "depth": depth, "hidden": hidden, "activation": activation, "bias": bias})
    mem = build_memory(spec, d_in, d_out)
    params = {n: d.normal(2, 3, *s) for n, s in mem.shapes().items()}
    x = d.normal(2, 3, 4, d_in)
    act = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "relu2": lambda z: F.relu(z) ** 2, "tanh": torch.tanh,
           "swiglu": F.silu, "geglu": F.gelu}[activation]
    h = x
    for i in range(depth):
        lin = lambda w, b: torch.einsum("bhoi,bhni->bhno", params[w], h) + (params[b].unsqueeze(-2) if bias else 0)  # noqa: E731
        z = lin(f"w{i}", f"b{i}")
        if i < depth - 1:
            z = act(lin(f"g{i}", f"c{i}")) * z if activation in ("swiglu", "geglu") else act(z)
        h = z
    assert_close(mem.forward(params, x), h, "read")


@given(SEEDS, st.integers(1, 3), st.integers(2, 5), st.sampled_from(["none", "layer", "rms"]))
def test_residual_mlp_memory_is_its_definition(seed, depth, dim, norm):
    d = Draw(seed)
    spec = _spec({"kind": "residual_mlp", "depth": depth, "hidden": "2x", "activation": "tanh", "norm": norm})
    mem = build_memory(spec, dim, dim)
    params = {n: d.normal(1, 2, *s) for n, s in mem.shapes().items()}
    x = d.normal(1, 2, 3, dim)
    h = x
    for i in range(depth):
        h = h @ params[f"w{i}"].transpose(-1, -2)
        if i < depth - 1:
            h = torch.tanh(h)
    if norm == "layer":
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)
    elif norm == "rms":
        h = h / torch.sqrt(h.square().mean(-1, keepdim=True) + 1e-6)
    assert_close(mem.forward(params, x), x + h, "read")


def test_zero_init_gives_zero_map_and_identity():
    mlp = build_memory(_spec({"kind": "mlp", "hidden": 4}), 3, 2)
    res = build_memory(_spec({"kind": "residual_mlp", "hidden": 4}), 3, 3)
    x = torch.randn(1, 2, 5, 3)
    for mem, expected in ((mlp, torch.zeros(1, 2, 5, 2)), (res, x)):
        params = {n: p.unsqueeze(0) for n, p in mem.init(2, zeros=True, generator=torch.Generator().manual_seed(0)).items()}
        assert torch.equal(mem.forward(params, x), expected)


def test_memory_groups_stack_same_architectures_only():
    """Slots are solved stacked exactly when their memories are the same function of their
    parameters: same kind, widths, layers, activation and norm (``memory_groups``)."""
    from nlgraph.levels.memories import memory_groups

    mlp = {"kind": "mlp", "depth": 2, "hidden": 8, "activation": "silu"}
    res = {"kind": "residual_mlp", "depth": 2, "hidden": 8, "activation": "silu"}
    mems = {
        "memory": build_memory(_spec(res), 4, 4),
        "keys": build_memory(_spec(res), 4, 4),
        "values": build_memory(_spec({**res, "norm": "layer"}), 4, 4),
        "lr": build_memory(_spec(mlp), 4, 4),
        "alpha": build_memory(_spec({**mlp, "activation": "gelu"}), 4, 4),
        "eta": build_memory(_spec(mlp), 4, 4),
        "extra": build_memory(_spec(mlp), 4, 3),
    }
    assert memory_groups(mems) == (("memory", "keys"), ("values",), ("lr", "eta"), ("alpha",), ("extra",))
    # the signature is a plain value: equal memories built twice compare equal
    assert build_memory(_spec(mlp), 4, 4).signature == mems["lr"].signature
