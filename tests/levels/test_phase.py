"""``run_level(..., phase=)``: a caller that knows a continued sequence's position on the host gives
its phase (position modulo the level's cycle) instead of the level reading ``state["position"]``,
a host read that ``torch.compile`` sees as data-dependent (compiled HOPE failed on it with torch
2.13: "could not guard on data-dependent expression ... PythonMod(u1, 16)"). The model gives the
phases itself (``NLModel.phases``), for plain streams, in-context CMS segments and MAC segments."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlgraph.levels.run import cycle
from nlgraph.lower import build
from nlgraph.runtime import level_form, run_level
from nlgraph.spec.loader import load_level


def _level(frequency: int, chunk: int):
    return load_level({"memory": {"kind": "mlp", "heads": 2, "hidden": "2x"}, "objective": {"kind": "l2"},
                       "optimizer": {"kind": "momentum", "lr": 0.1, "momentum": 0.5},
                       "retention": {"kind": "weight_decay", "gate": 0.95},
                       "frequency": frequency, "gradient_point": {"chunk": chunk}, "read": "chunk_start"})


def _inputs(seed: int, t: int):
    g = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(2, t, 2, 4, generator=g, dtype=torch.float64), dim=-1)
    return k, torch.randn(2, t, 2, 4, generator=g, dtype=torch.float64), torch.randn(2, t, 2, 4, generator=g,
                                                                                      dtype=torch.float64)


@settings(max_examples=12, deadline=None)
@given(frequency=st.sampled_from([1, 2, 4]), times=st.sampled_from([1, 2, 3]), first=st.integers(1, 11),
       more=st.integers(1, 9), seed=st.integers(0, 3))
def test_the_phase_continues_a_level_as_its_position_does(frequency, times, first, more, seed):
    """Continuing with the phase (or the whole position) gives the outputs and state of continuing
    from the position tensor, and of one pass (a chunk is a multiple of the period)."""
    level = _level(frequency, frequency * times if frequency * times > 1 else 3)
    form = level_form(level)  # chunked, or the per-token form for a chunk longer than the period
    k, v, q = _inputs(seed, first + more)
    y_all, s_all = run_level(level, keys=k, values=v, queries=q, form=form)
    y1, s1 = run_level(level, keys=k[:, :first], values=v[:, :first], queries=q[:, :first], form=form)
    rest = dict(keys=k[:, first:], values=v[:, first:], queries=q[:, first:], form=form)
    y_read, s_read = run_level(level, state=dict(s1), **rest)
    for phase in (first % cycle(level), first):
        y_phase, s_phase = run_level(level, state=dict(s1), phase=phase, **rest)
        torch.testing.assert_close(y_phase, y_read, rtol=0, atol=0)
        assert s_phase.keys() == s_read.keys()
        for key in s_read:
            torch.testing.assert_close(s_phase[key], s_read[key], rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([y1, y_read], 1), y_all, rtol=1e-10, atol=1e-10)


def test_with_a_phase_the_position_tensor_is_not_read():
    """The position is only carried forward (a meta tensor cannot be read: int() of it raises)."""
    level = _level(4, 4)
    k, v, q = _inputs(0, 11)
    _, s1 = run_level(level, keys=k[:, :5], values=v[:, :5], queries=q[:, :5], form="chunked")
    unread = {**s1, "position": torch.empty((), dtype=torch.int64, device="meta")}
    with pytest.raises(RuntimeError, match="meta tensors"):
        run_level(level, keys=k[:, 5:], values=v[:, 5:], queries=q[:, 5:], state=dict(unread), form="chunked")
    y, s = run_level(level, keys=k[:, 5:], values=v[:, 5:], queries=q[:, 5:], state=dict(unread), phase=1,
                     form="chunked")
    y_ref, _ = run_level(level, keys=k[:, 5:], values=v[:, 5:], queries=q[:, 5:], state=dict(s1), form="chunked")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    assert s["position"].device.type == "meta"
    with pytest.raises(ValueError, match="phase must be a non-negative int"):
        run_level(level, keys=k, values=v, queries=q, phase=-1, form="chunked")


@pytest.mark.parametrize("name", ["hope", "titans", "titans_mac"])
def test_the_model_gives_its_levels_their_phases(name, monkeypatch):
    """Every continued call of a scheduled level inside a model is given its phase (so no level
    reads its position), and the logits are those of the levels reading it: one pass and a
    stream in pieces."""
    import nlgraph.runtime as runtime

    over = ["vars.d_model=16", "vars.heads=2", "vars.layers=1", "model.vocab=32"]
    torch.manual_seed(0)
    model = build(name, overrides=over, dtype=torch.float64)
    tokens = torch.randint(0, 32, (2, 41), generator=torch.Generator().manual_seed(1))
    calls = []
    real = runtime.run_level

    def spy(level, **kw):
        state = kw.get("state")
        if state is not None and "position" in state and cycle(level) > 1:
            calls.append(kw.get("phase"))
        return real(level, **kw)

    with torch.no_grad():
        monkeypatch.setattr(runtime, "run_level", spy)
        one = model(tokens)
        a, st_a = model.stream(tokens[:, :19])
        b, _ = model.stream(tokens[:, 19:], st_a)
        monkeypatch.undo()
        for m in model._phased:  # the levels reading their position tensors instead
            assert m.phase is None
        reference = model(tokens)
    assert calls and None not in calls, calls
    torch.testing.assert_close(one, reference, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([a, b], 1), one, rtol=1e-9, atol=1e-9)
    assert st_a["position"] == 19 if "in_context" not in st_a else st_a["in_context"]["position"] == 19


@pytest.mark.slow
def test_hope_compiles_with_inductor_and_equals_eager():
    """The failure the phases fix: HOPE's blocks compiled by inductor over three 16-token CMS
    segments (CPU: about 3 minutes) give eager's logits and gradients."""
    torch.manual_seed(0)
    model = build("hope", overrides=["vars.d_model=32", "vars.heads=2", "vars.layers=1", "model.vocab=64"])
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = model(tokens)
    ref.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.compile_blocks()
    out = model(tokens)
    out.float().logsumexp(-1).mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-5, msg=n)
