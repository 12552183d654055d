"""In-context CMS (issue 9): an ``outer`` level with a finite period C commits, at every multiple e
of C, θ ← θ − η Σ_{t=e−C}^{e−1} ∇_θ ℓ_t with every gradient at the period-start θ and ℓ_t the
model's next-token loss.

The oracle below is written independently of :mod:`nlgraph.cms`: it takes the same spec with
``frequency: never`` (the static model, one pass over the whole prefix), makes its MLP links read
position-dependent parameters (period k of link i reads ``schedule[i][k]``), and at every boundary
e recomputes the prefix ``tokens[:, :e]`` from scratch with only the committing link's period-k
parameters as an autograd leaf, sums the C next-token losses and steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nlgraph.cms import MemoryStateError, MultiRateOuter
from nlgraph.errors import GraphError
from nlgraph.graph import build_graph
from nlgraph.levels.optimizers import build_optimizer
from nlgraph.lower import build, plan
from nlgraph.model import StaticMlp
from nlgraph.spec.loader import load_spec

F64 = torch.float64
VOCAB = 13


def link(period, opt=None, **objective):
    return {"memory": {"kind": "mlp", "hidden": "2x", "activation": "gelu"},
            "objective": {"kind": "outer", **objective},
            "optimizer": opt or {"kind": "gd", "lr": 0.5}, "frequency": period}


def tiny(links, repeat=2, **level_extra):
    links = [{**lv, **level_extra} for lv in links]
    return {"name": "tiny_cms",
            "levels": {"attn": {"kind": "attention", "heads": 2},
                       "cms": {"kind": "chain", "levels": links}},
            "model": {"vocab": VOCAB, "d_model": 8, "blocks": [["attn", "cms"]], "repeat": repeat}}


def never(spec):
    out = copy.deepcopy(spec)
    for lv in out["levels"]["cms"]["levels"]:
        lv["frequency"] = "never"
    return out


def make(spec, seed=0):
    torch.manual_seed(seed)
    return build(spec, dtype=F64)


def tokens(b=2, t=16, seed=1):
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the oracle


def _mlp(params, x):
    """The tiny spec's link: gelu MLP of depth 2 without biases, per-row weights [B, out, in]."""
    h = F.gelu(x @ params["layers.0.weight"].transpose(-1, -2))
    return h @ params["layers.1.weight"].transpose(-1, -2)


def oracle(spec, toks, seed=0):
    """(logits [B, T, V], schedules) of the spec's semantics; ``schedules[i][k]``: the parameters
    of link i (model order) for its period k, ``{name: [B, out, in]}``."""
    static = make(never(spec), seed)
    links = [m for m in static.modules() if isinstance(m, StaticMlp)]
    specs = [lv for _ in range(spec["model"]["repeat"]) for lv in spec["levels"]["cms"]["levels"]]
    periods = [lv["frequency"] for lv in specs]
    b, t = toks.shape
    sched = [[{k: p.detach().unsqueeze(0).expand(b, *p.shape).clone() for k, p in m.mlp.named_parameters()}]
             for m in links]
    opts = [build_optimizer(load_spec(spec).levels["cms"].levels[i % len(spec["levels"]["cms"]["levels"])].optimizer)
            for i in range(len(links))]
    bufs = [o.buffers(None, {k: v.unsqueeze(1) for k, v in sched[i][0].items()}) for i, o in enumerate(opts)]

    def run(prefix, override=None):
        def patched(i):
            def forward(x, state):
                outs = []
                for start in range(0, x.shape[1], periods[i]):
                    k = start // periods[i]
                    params = override[1] if override and override[0] == (i, k) else sched[i][min(k, len(sched[i]) - 1)]
                    outs.append(_mlp(params, x[:, start:start + periods[i]]))
                return torch.cat(outs, 1), state
            return forward

        for i, m in enumerate(links):
            m.forward = patched(i)
        try:
            return static(prefix)
        finally:
            for m in links:
                del m.forward

    for e in range(1, t):
        new = {}
        for i, c in enumerate(periods):
            if e % c:
                continue
            k = e // c - 1
            leaf = {n: v.clone().requires_grad_(True) for n, v in sched[i][k].items()}
            logits = run(toks[:, :e], ((i, k), leaf))
            loss = F.cross_entropy(logits[:, e - c:e].flatten(0, 1), toks[:, e - c + 1:e + 1].flatten(), reduction="sum")
            grads = dict(zip(leaf, torch.autograd.grad(loss, list(leaf.values()))))
            if specs[i]["objective"].get("reduce") == "mean":
                grads = {n: g / c for n, g in grads.items()}
            opt = specs[i]["optimizer"]
            rate = torch.full((b, 1), float(opt.get("lr", 1.0)), dtype=F64)
            mom = torch.full((b, 1), float(opt.get("momentum", 0.0)), dtype=F64)
            delta, bufs[i] = opts[i].step(None, {n: v.unsqueeze(1) for n, v in sched[i][k].items()},
                                          {n: g.unsqueeze(1) for n, g in grads.items()},
                                          lr=rate, momentum=mom, buffers=bufs[i])
            new[i] = {n: sched[i][k][n] + delta[n][:, 0] for n in leaf}
        for i, p in new.items():
            sched[i].append(p)
    with torch.no_grad():
        return run(toks), sched


def _values(model, state):
    return [state["in_context"]["values"][s.key] for s in model._slots]


def _check_params(model, state, sched, seen, tol=1e-9):
    """The model's committed parameters after ``seen`` tokens equal the oracle's."""
    for s, vals, periods in zip(model._slots, _values(model, state), sched):
        k = (seen - 1) // s.module.period  # commits happened at C, 2C, ... <= seen − 1
        for n, v in vals.items():
            torch.testing.assert_close(v[:, 0], periods[k][n], atol=tol, rtol=tol)


ONE = tiny([link(4)])
TWO = tiny([link(2), link(4, {"kind": "gd", "lr": 0.3})])
COPRIME = tiny([link(2), link(3, {"kind": "gd", "lr": 0.3})], repeat=1)


@pytest.mark.parametrize("spec", [ONE, TWO, COPRIME], ids=["one_link", "two_links", "periods_2_3"])
def test_matches_the_oracle_in_one_pass_and_in_pieces(spec):
    toks = tokens(t=15)  # 15 tokens: the partial last period of every link is left uncommitted
    want, sched = oracle(spec, toks)
    model = make(spec)
    logits, state = model.stream(toks)
    torch.testing.assert_close(logits, want, atol=1e-9, rtol=1e-9)
    _check_params(model, state, sched, 15)
    # every link committed at least twice, and the partial period at the end was not committed
    for s, periods in zip(model._slots, sched):
        assert len(periods) == 14 // s.module.period + 1 >= 3
    # fed in pieces (boundaries inside and at the edges of pieces), parameters checked after each
    state, outs, seen = None, [], 0
    for n in (1, 3, 4, 2, 5):
        out, state = model.stream(toks[:, seen:seen + n], state)
        outs.append(out)
        seen += n
        _check_params(model, state, sched, seen)
    torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("opt", [{"kind": "momentum", "lr": 0.2, "momentum": 0.7},
                                 {"kind": "adam", "lr": 0.05},
                                 {"kind": "muon", "lr": 0.02, "momentum": 0.9}], ids=["momentum", "adam", "muon"])
def test_inner_optimizers_and_mean_match_the_oracle(opt):
    spec = tiny([link(2, opt), link(4, opt, reduce="mean")], repeat=1)
    toks = tokens(t=13)
    want, sched = oracle(spec, toks)
    model = make(spec)
    logits, state = model.stream(toks)
    torch.testing.assert_close(logits, want, atol=1e-9, rtol=1e-9)
    _check_params(model, state, sched, 13)
    bufs = state["in_context"]["buffers"][model._slots[0].key]
    assert bufs and all(torch.isfinite(v).all() for v in bufs.values())


def test_before_the_first_boundary_it_is_the_static_model_and_after_it_is_not():
    toks = tokens(t=12)
    for spec in (ONE, TWO):
        first = min(lv["frequency"] for lv in spec["levels"]["cms"]["levels"])
        a, b = make(spec)(toks), make(never(spec))(toks)
        torch.testing.assert_close(a[:, :first], b[:, :first], atol=1e-12, rtol=1e-12)
        assert (a[:, first:] - b[:, first:]).abs().amax(-1).min() > 1e-6


def test_causal_and_per_sequence():
    model = make(TWO)
    toks = tokens(t=14)
    base = model(toks)
    for j in (3, 4, 9):
        changed = toks.clone()
        changed[:, j] = (changed[:, j] + 1) % VOCAB
        out = model(changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], atol=1e-12, rtol=1e-12)
        assert (out[:, j:] - base[:, j:]).abs().max() > 1e-6
    # each row has its own trajectory: a row alone gives the same logits as in the batch
    torch.testing.assert_close(model(toks[1:]), base[1:], atol=1e-12, rtol=1e-12)


def test_first_order_outer_gradient_is_the_sum_of_the_per_period_gradients():
    spec = tiny([link(3)], repeat=1)
    toks = tokens(t=11)
    _, sched = oracle(spec, toks)
    # the oracle's outer loss as a function of every period's parameters (each a leaf)
    static = make(never(spec))
    m = next(x for x in static.modules() if isinstance(x, StaticMlp))
    leaves = [{n: v.clone().requires_grad_(True) for n, v in p.items()} for p in sched[0]]

    def forward(x, state):
        return torch.cat([_mlp(leaves[s // 3], x[:, s:s + 3]) for s in range(0, x.shape[1], 3)], 1), state

    m.forward = forward
    F.cross_entropy(static(toks)[:, :-1].flatten(0, 1), toks[:, 1:].flatten()).backward()
    model = make(spec)
    F.cross_entropy(model(toks)[:, :-1].flatten(0, 1), toks[:, 1:].flatten()).backward()
    got = dict(model._slots[0].module.core.named_parameters())
    for n, p in got.items():
        want = sum(leaf[n].grad.sum(0) for leaf in leaves)
        torch.testing.assert_close(p.grad, want, atol=1e-12, rtol=1e-9)
    # the other outer parameters see the in-context trajectory as constants
    torch.testing.assert_close(model.embed.weight.grad, static.embed.weight.grad, atol=1e-12, rtol=1e-9)


def test_persistent_memory_carries_over_and_round_trips(tmp_path):
    spec = tiny([link(2), link(4)], repeat=1, lifetime="persistent")
    model = make(spec)
    first, second = tokens(t=9, seed=2), tokens(t=9, seed=3)
    model(first)
    kept = {k: {n: v.clone() for n, v in e["values"].items()} for k, e in model._persistent.items()}
    assert set(kept) == {s.key for s in model._slots}
    path = model.save_memory(tmp_path / "memory.safetensors")
    again = make(spec)
    fresh = again(second)  # no memory yet: starts from θ_0
    again.reset_memory()
    again.load_memory(path)
    for k, e in again._persistent.items():
        for n, v in e["values"].items():
            assert torch.equal(v, kept[k][n])
    out_a, out_b = model(second), again(second)
    assert torch.equal(out_a, out_b)
    # the carried memory changes what the next sequence reads from its first token on
    assert (out_a[:, 0] - fresh[:, 0]).abs().max() > 1e-6
    # learn=False reads the memory without moving it
    before = {k: {n: v.clone() for n, v in e["values"].items()} for k, e in model._persistent.items()}
    model(second, learn=False)
    for k in before:
        for n in before[k]:
            assert torch.equal(model._persistent[k]["values"][n], before[k][n])


def test_memory_file_errors(tmp_path):
    spec = tiny([link(2)], repeat=1, lifetime="persistent")
    model = make(spec)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MemoryStateError, match="cannot read the memory file") as e:
        model.load_memory(bad)
    assert "\n" not in str(e.value) and str(bad) in str(e.value)
    model(tokens(t=5))
    path = model.save_memory(tmp_path / "m.safetensors")
    other = make(tiny([link(4)], repeat=1, lifetime="persistent"))
    with pytest.raises(MemoryStateError, match="another spec"):
        other.load_memory(path)
    with pytest.raises(MemoryStateError, match="3 rows"):
        model(tokens(b=3, t=5))


def test_learn_false_is_the_static_model():
    toks = tokens(t=12)
    model, static = make(TWO), make(never(TWO))
    torch.testing.assert_close(model(toks, learn=False), static(toks), atol=1e-12, rtol=1e-12)
    model.learn = False
    out, state = model.stream(toks[:, :7])
    out2, state = model.stream(toks[:, 7:], state)
    torch.testing.assert_close(torch.cat([out, out2], 1), static(toks), atol=1e-12, rtol=1e-12)


def test_no_grad_eval_gives_the_same_logits_and_detached_outputs():
    model = make(TWO)
    toks = tokens(t=13)
    want = model(toks)
    with torch.no_grad():
        got, state = model.stream(toks)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach(), atol=1e-12, rtol=1e-12)


def test_inference_mode_is_refused_unless_frozen():
    model, static = make(ONE), make(never(ONE))
    toks = tokens(t=6)
    with torch.inference_mode():
        with pytest.raises(MemoryStateError, match="inference_mode") as e:
            model(toks)
        assert "\n" not in str(e.value)
        torch.testing.assert_close(model(toks, learn=False), static(toks), atol=1e-12, rtol=1e-12)


def test_outer_loop_reading_is_static_in_the_forward_and_steps_every_c_tokens():
    spec = tiny([link(8, updates="outer_loop")], repeat=1)
    model, static = make(spec), make(never(spec))
    assert not model.in_context
    toks = tokens(t=4)
    torch.testing.assert_close(model(toks), static(toks), atol=0, rtol=0)
    multi = MultiRateOuter(model)
    p = multi.groups[0][2][0]
    grads = []
    for step in range(3):  # 2 rows x 4 tokens a step, counted as 4 training tokens: period 8 = 2 steps
        model.zero_grad(set_to_none=True)
        toks = tokens(t=4, seed=10 + step)
        F.cross_entropy(model(toks)[:, :-1].flatten(0, 1), toks[:, 1:].flatten()).backward()
        grads.append(p.grad.clone())
        multi.before_step(4)
        if step == 1:  # the period's steps, summed, reach the optimizer once
            torch.testing.assert_close(p.grad, grads[0] + grads[1], atol=0, rtol=0)
        else:
            assert p.grad is None
    # parameters of ordinary levels are untouched by the wrapper
    assert model.embed.weight.grad is not None


def test_spec_refusals_and_plan_wording():
    # refused by the graph stage, at the link's own YAML path (a level spec alone may read an
    # outer objective per token: the level runtime does)
    with pytest.raises(GraphError, match="defined per event") as err:
        build_graph(load_spec(tiny([link(4, {"kind": "dgd", "lr": 0.1})])))
    assert err.value.path.endswith("optimizer.kind")
    with pytest.raises(GraphError, match="constant lr") as err:
        build_graph(load_spec(tiny([link(4, {"kind": "gd", "lr": {"from": "input"}})])))
    assert err.value.path.endswith("optimizer.lr")
    forms = {lv.node: lv.form for lv in plan(TWO).levels}
    assert forms["b0.cms[0]"] == "in context: commits every 2 tokens (gd, sum)"
    assert forms["b0.cms[1]"] == "in context: commits every 4 tokens (gd, sum)"
    forms = {lv.node: lv.form for lv in plan(tiny([link(8, updates="outer_loop")])).levels}
    assert forms["b0.cms[0]"] == "static mlp; the outer optimizer steps it every 8 training tokens"


def test_second_order_meta_gradient_matches_torch_func():
    spec = tiny([link(3, meta_gradient="second_order")], repeat=1)
    toks = tokens(t=10)
    static = make(never(spec))
    m = next(x for x in static.modules() if isinstance(x, StaticMlp))
    theta0 = {n: p.detach().clone() for n, p in m.mlp.named_parameters()}
    b, t = toks.shape

    def run(prefix, sched):
        def forward(x, state):
            return torch.cat([_mlp(sched[min(s // 3, len(sched) - 1)], x[:, s:s + 3])
                              for s in range(0, x.shape[1], 3)], 1), state
        m.forward = forward
        try:
            return static(prefix)
        finally:
            del m.forward

    def outer_loss(theta):
        sched = [{n: v.unsqueeze(0).expand(b, *v.shape) for n, v in theta.items()}]
        for e in range(3, t, 3):
            def chunk_loss(params, e=e):
                logits = run(toks[:, :e], sched[:-1] + [params])
                return F.cross_entropy(logits[:, e - 3:e].flatten(0, 1), toks[:, e - 2:e + 1].flatten(),
                                       reduction="sum")
            g = torch.func.grad(chunk_loss)(sched[-1])
            sched.append({n: sched[-1][n] - 0.5 * g[n] for n in g})
        return F.cross_entropy(run(toks, sched)[:, :-1].flatten(0, 1), toks[:, 1:].flatten())

    want = torch.func.grad(outer_loss)(theta0)
    model = make(spec)
    F.cross_entropy(model(toks)[:, :-1].flatten(0, 1), toks[:, 1:].flatten()).backward()
    first = make(tiny([link(3)], repeat=1))
    F.cross_entropy(first(toks)[:, :-1].flatten(0, 1), toks[:, 1:].flatten()).backward()
    for n, p in model._slots[0].module.core.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-12, rtol=1e-9)
        # the second-order terms are not negligible here: first order is a different gradient
        q = dict(first._slots[0].module.core.named_parameters())[n]
        assert (q.grad - want[n]).abs().max() > 1e-6 * want[n].abs().max()


def test_compiled_blocks_commit_like_eager():
    """The commits run through ``torch.compile(fullgraph=True)``d blocks (``aot_eager``: the joint
    forward/backward graph, so the inner ``autograd.grad`` goes through compiled backward code)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = make(TWO)
    toks = tokens(t=9)
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        logits = model(toks)
        return logits, torch.autograd.grad(logits.square().sum(), params)

    eager, eager_grads = run()
    counter = CompileCounterWithBackend("aot_eager")
    model.compile_blocks(backend=counter)
    compiled, compiled_grads = run()
    assert counter.frame_count >= 1
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("memory", [
    {"kind": "residual_mlp", "hidden": "2x", "norm": "rms"},
    {"kind": "mlp", "hidden": 12, "activation": "swiglu", "bias": True},
], ids=["residual_mlp", "swiglu_bias"])
def test_other_memories_read_like_the_static_mlp_until_the_first_commit(memory):
    spec = tiny([{**link(3), "memory": memory}], repeat=1)
    toks = tokens(t=8)
    model, static = make(spec), make(never(spec))
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in static.named_parameters()}
    a, b = model(toks), static(toks)
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-12, rtol=1e-12)
    assert (a[:, 3:] - b[:, 3:]).abs().amax(-1).min() > 1e-8
    torch.testing.assert_close(model(toks, learn=False), b, atol=1e-12, rtol=1e-12)


def _titans_like(lifetime):
    return {"name": "tiny_persistent",
            "levels": {"mem": {"memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
                               "optimizer": {"kind": "momentum", "lr": 0.3, "momentum": 0.5},
                               "keys": {"from": "input", "norm": "l2", "conv": 2}, "frequency": 1,
                               "lifetime": lifetime},
                       "cms": {"kind": "chain", "levels": [link(4)]}},
            "model": {"vocab": VOCAB, "d_model": 8, "blocks": [["mem", "cms"]], "repeat": 1}}


def test_a_persistent_runtime_level_starts_the_next_sequence_from_its_committed_state(tmp_path):
    """``lifetime: persistent`` on an ordinary (runtime) level: the next fresh sequence starts from
    the committed memory and optimizer buffers of the last one; position, convolution tails and
    everything else start afresh. Oracle: the same model continued from a hand-built state."""
    first, second = tokens(t=7, seed=4), tokens(t=7, seed=5)
    model = make(_titans_like("persistent"))
    _, state = model.stream(first)
    level = state["blocks"][0]["mem"]["level"]
    carried = {k: v for k, v in level.items() if k.startswith(("memory.", "optimizer."))}
    assert any(k.startswith("optimizer.") for k in carried)  # the momentum buffer travels too
    got = model(second)  # a fresh sequence (this call moves the memory on again)
    want, _ = model.stream(second, {"blocks": [{"mem": {"level": carried}}]})
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # a sequence-lifetime level starts from M_0 instead
    fresh = make(_titans_like("sequence"))(second)
    assert (got - fresh).abs().max() > 1e-6
    # round trip through a file into a fresh model
    path = model.save_memory(tmp_path / "mem.safetensors")
    again = make(_titans_like("persistent"))
    again.load_memory(path)
    torch.testing.assert_close(again(tokens(t=5, seed=6)), model(tokens(t=5, seed=6)), atol=0, rtol=0)


def test_hope_matches_the_oracle():
    """HOPE (self-modifying Titans, then the CMS chain) at tiny size with periods 4 / 8 / 16: the
    gradients reach the CMS through the next block's Titans memory and its state over the period."""
    from nlgraph.spec.loader import dump_spec

    spec = dump_spec(load_spec("hope", ["vars.d_model=16", "vars.heads=2", "vars.layers=2", "vars.chunk=4",
                                        f"model.vocab={VOCAB}",
                                        *(f"levels.cms.levels.{i}.frequency={c}" for i, c in enumerate((4, 8, 16))),
                                        *(f"levels.cms.levels.{i}.optimizer.lr=0.3" for i in range(3))]), as_dict=True)
    toks = tokens(t=18)
    want, sched = oracle(spec, toks)
    model = make(spec)
    state, outs, seen = None, [], 0
    for n in (5, 8, 5):
        out, state = model.stream(toks[:, seen:seen + n], state)
        outs.append(out)
        seen += n
        _check_params(model, state, sched, seen)
    torch.testing.assert_close(torch.cat(outs, 1), want, atol=1e-9, rtol=1e-9)
    assert len(sched[2]) == 2  # the slowest link committed once, at token 16


def test_compiled_hope_commits_and_trains_like_eager():
    """HOPE's blocks compiled (``aot_eager``): the commits' ``autograd.grad`` runs each compiled
    backward before the outer backward does, which a backward that donates its saved buffers (AOT
    autograd's default) refuses. Logits and every gradient equal eager's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(load_spec("hope", ["vars.d_model=16", "vars.heads=2", "vars.layers=1",
                                     "levels.cms.levels.1.frequency=never", "levels.cms.levels.2.frequency=never"]))
    toks = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))  # two commits + 8
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        logits = model(toks)
        return logits, torch.autograd.grad(logits.square().sum(), params, allow_unused=True)

    eager, eager_grads = run()
    model.compile_blocks(backend="aot_eager")
    compiled, compiled_grads = run()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_persistent_mac_memory_carries_into_the_next_sequence(tmp_path):
    """``lifetime: persistent`` on the memory of a Titans MAC ``memory_context``: the next fresh
    sequence answers its first segment from, and keeps writing, the memory the last one left.
    Oracle: the same model continued from a hand-built state holding only that memory."""
    ov = ["levels.memory.lifetime=persistent", "vars.d_model=16", "vars.heads=2", "vars.layers=1",
          f"model.vocab={VOCAB}", "levels.mac.segment=4"]
    model = build(load_spec("titans_mac", ov), dtype=torch.float64)
    first, second = tokens(t=10, seed=4), tokens(t=9, seed=5)
    _, state = model.stream(first)
    level = state["blocks"][0]["mac"]["memory"]["level"]
    carried = {k: v for k, v in level.items() if k.startswith(("memory.", "optimizer."))}
    got = model(second)
    want, _ = model.stream(second, {"blocks": [{"mac": {"memory": {"level": carried}}}]})
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    model.reset_memory()
    fresh = model(second)
    assert (got - fresh).abs().max() > 1e-6


def test_under_autocast_each_period_casts_its_weights_once_and_the_mlp_reads_like_the_static_one():
    """Under bf16 autocast the in-context MLP's weights are cast once a period, not once a segment:
    with periods 4 and 16 read in 4-token segments over 16 tokens, the backward keeps 4 + 1 bf16
    copies of each weight (not 4 + 4), and the result stays within bf16 of float32's. Before any
    commit it computes what the static MLP computes under autocast (``F.linear``: bias in bf16)."""
    spec = tiny([link(4), link(16)], repeat=1)
    torch.manual_seed(0)
    model = build(spec, dtype=torch.float32)
    x = tokens(t=16)
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "cms" in n and p.dim() == 2}
    saved = {}

    def pack(t):
        if t.dtype == torch.bfloat16 and t.dim() == 3 and tuple(t.shape[1:]) in shapes:
            saved[t.untyped_storage().data_ptr()] = tuple(t.shape[1:])
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        low, _ = model.stream(x, None)
    low.float().sum().backward()
    copies = sorted(saved.values())
    assert len(copies) == 5 * 2, copies  # (4 periods of the fast link + 1 of the slow) × 2 layers
    grads_low = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    high, _ = model.stream(x, None)
    high.sum().backward()
    assert (low.float() - high).abs().max() <= 5e-2 * high.abs().max()
    for n, p in model.named_parameters():
        if n in grads_low:
            assert (grads_low[n] - p.grad).norm() <= 5e-2 * p.grad.norm() + 1e-6, n
    # a float64 model under autocast: autocast leaves float64 alone, and so do the casts
    wide = build(spec, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert wide.stream(x, None)[0].dtype == torch.float64
    # a parameter changed in place is cast again, not read from the kept cast
    from nlgraph.cms import _ReadCasts

    with torch.autocast("cpu", dtype=torch.bfloat16):
        casts = _ReadCasts("cpu")
        p = {"w": torch.ones(2, 2)}
        assert casts("k", p)["w"].dtype == torch.bfloat16 and casts("k", p)["w"] is casts("k", p)["w"]
        p["w"].mul_(2)
        assert torch.equal(casts("k", p)["w"], torch.full((2, 2), 2.0, dtype=torch.bfloat16))
    # before the first boundary: the static MLP under autocast
    static = build(never(spec), dtype=torch.float32)
    static.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, _ = model.stream(x[:, :4], None)
        b = static(x[:, :4])
    torch.testing.assert_close(a, b)
