"""The plan drives lowering (issue 10, item 1): every level the runtime runs is built with the
execution form its plan chose through the form registry, a forced form changes what the model
runs, and a form the registry refuses is one clear error naming the level."""

import dataclasses
import re

import pytest
import torch

import nlgraph.compilers as registry
from nlgraph import library_specs, load_spec
from nlgraph.errors import NLGraphError
from nlgraph.lower import PlanError, build, plan
from nlgraph.memory import ClosedFormLevel, MemoryLevel
from nlgraph.model import NLModel
from nlgraph.runtime import level_form
from tinyspecs import tiny

LIBRARY = sorted(library_specs())
TITANS = ["vars.d_model=32", "vars.layers=1", "vars.heads=2", "model.vocab=64"]


def level_spec(spec, key: str):
    """The level spec a plan key names: ``name`` or ``<chain>.levels[j]``."""
    m = re.fullmatch(r"(.+)\.levels\[(\d+)\]", key)
    return spec.levels[m[1]].levels[int(m[2])] if m else spec.levels[key]


def runtime_levels(model: NLModel) -> list:
    return [m for m in model.modules() if isinstance(m, (MemoryLevel, ClosedFormLevel))]


@pytest.mark.parametrize("name", LIBRARY)
def test_model_forms_are_the_plans(name):
    """Each runtime level module runs the form its plan node chose, which is the registry's own
    choice for that level; every planned level is built, and nothing the plan did not decide."""
    model = build(name, overrides=tiny(name))
    executions = model.plan.executions()
    by_spec = {id(level_spec(model.spec, key)): key for key in executions}
    modules = runtime_levels(model)
    built = set()
    for module in modules:
        key = by_spec[id(module.spec)]  # KeyError: a runtime level the plan never decided
        assert module.form == executions[key], (name, key)
        assert module.form == level_form(module.spec), (name, key)
        built.add(key)
    assert built == set(executions)
    nodes = [lv for lv in model.plan.levels if lv.execution is not None]
    # a label is its execution, annotated at most (token by token, chunk at a time)
    assert all(lv.form.startswith(lv.execution) for lv in nodes)
    assert len(nodes) >= len(executions)


def test_library_reaches_every_kind_of_runtime_level():
    """The parametrised check above covers plain levels, closed-form kinds and group members."""
    cases = {"titans": "level", "titans_mac": "memory_context", "titans_mag": "parallel",
             "equiv/deltanet_rule": "delta_rule", "equiv/linear_attention_kind": "linear_attention"}
    for name, kind in cases.items():
        spec = load_spec(name)
        assert kind in {entry.kind for entry in spec.levels.values()}, name
        assert set(plan(name).executions().values()) == {"chunked"}, name
    model = build("titans_mac", overrides=tiny("titans_mac"))
    assert [type(m).__name__ for m in runtime_levels(model)] == ["MemoryLevel"]
    model = build("equiv/deltanet_rule", overrides=tiny("equiv/deltanet_rule"))
    assert [type(m).__name__ for m in runtime_levels(model)] == ["ClosedFormLevel"]


class _Counting:
    """Counts the calls of each form of the ``memory`` family (wrapped in the registry)."""

    def __init__(self, monkeypatch):
        self.calls = {"chunked": 0, "reference": 0}
        table = registry._REGISTRY["memory"]
        for name in self.calls:
            form = table[name]
            monkeypatch.setitem(table, name, dataclasses.replace(form, run=self._wrap(name, form.run)))

    def _wrap(self, name, run):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return run(*args, **kwargs)

        return counted


def test_forced_reference_form_runs_and_matches_chunked(monkeypatch):
    """``build(..., forms={"memory": "reference"})`` builds Titans' memory in the per-token
    reference form; with the default model's weights it gives the chunked model's logits and
    gradients (float64)."""
    torch.manual_seed(0)
    fast = build("titans", overrides=TITANS, dtype=torch.float64)
    slow = build("titans", overrides=TITANS, dtype=torch.float64, forms={"memory": "reference"})
    assert [m.form for m in runtime_levels(fast)] == ["chunked"]
    assert [m.form for m in runtime_levels(slow)] == ["reference"]
    assert slow.plan.executions() == {"memory": "reference"}
    assert {lv.node: lv.form for lv in slow.plan.levels}["b0.memory"] == "reference"
    slow.load_state_dict(fast.state_dict())

    counting = _Counting(monkeypatch)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    outs = {}
    for label, model in (("chunked", fast), ("reference", slow)):
        before = dict(counting.calls)
        logits = model(tokens)
        grads = torch.autograd.grad(logits.square().mean(), [p for p in model.parameters() if p.requires_grad])
        ran = {k: counting.calls[k] - before[k] for k in before}
        assert ran[label] > 0 and sum(ran.values()) == ran[label], (label, ran)
        outs[label] = (logits, grads)
    torch.testing.assert_close(outs["reference"][0], outs["chunked"][0], rtol=1e-9, atol=1e-10)
    for a, b in zip(outs["reference"][1], outs["chunked"][1]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_build_from_a_plan_and_model_from_a_spec():
    """``build(plan)`` builds that plan; ``NLModel(spec)`` plans for itself (the same decision);
    a plan of another spec is refused."""
    p = plan("titans", TITANS, forms={"memory": "reference"})
    model = build(p)
    assert model.plan is p and [m.form for m in runtime_levels(model)] == ["reference"]
    direct = NLModel(p.spec)
    assert direct.plan.executions() == plan(p.spec).executions() == {"memory": "chunked"}
    assert [m.form for m in runtime_levels(direct)] == ["chunked"]
    with pytest.raises(ValueError, match="another spec"):
        NLModel(load_spec("titans", TITANS + ["vars.d_model=64"]), plan=p)
    with pytest.raises(ValueError, match="as it is"):
        build(p, forms={"memory": "chunked"})


def test_a_level_used_twice_has_one_form():
    """A level in every block of a repeated model is decided once: all its modules share it."""
    model = build("titans", overrides=["vars.d_model=16", "vars.layers=3", "vars.heads=2", "model.vocab=64"],
                  forms={"memory": "reference"})
    forms = [m.form for m in runtime_levels(model)]
    assert forms == ["reference"] * 3
    assert [lv.execution for lv in model.plan.levels if lv.level == "memory"] == ["reference"]


def test_device_plan_labels_the_chosen_form():
    """The plan for a device labels the same registry decision it records (``nlgraph compile
    --device cuda``), and a model built from it runs that decision."""
    from nlgraph.compilers.kernels import dispatch

    # the Triton form where triton imports (a CUDA plan needs no GPU to be made), else chunked
    want = "triton" if dispatch.why_no_kernel("cuda") is None else "chunked"
    p = plan("gated_deltanet", tiny("gated_deltanet"), device="cuda")
    node = next(lv for lv in p.levels if lv.level == "mixer")
    assert node.execution == want and node.form == want and (p.device, p.dtype) == ("cuda", None)
    with torch.device("meta"):
        model = NLModel(p.spec, plan=p)
    assert [m.form for m in runtime_levels(model)] == [want]
    # float64 is no kernel's: the plan for it keeps the PyTorch form
    p64 = plan("gated_deltanet", tiny("gated_deltanet"), device="cuda", dtype=torch.float64)
    assert p64.executions() == {"mixer": "chunked"}


def test_refused_form_is_one_line_naming_the_level():
    exact = TITANS + ["levels.memory.gradient_point=token"]  # exact-online deep memory: no parallel form
    assert plan("titans", exact).executions() == {"memory": "reference"}
    with pytest.raises(PlanError) as err:
        build("titans", overrides=exact, forms={"memory": "chunked"})
    text = str(err.value)
    assert isinstance(err.value, NLGraphError) and "\n" not in text
    assert text.startswith("forms.memory: level 'memory' cannot run in form 'chunked'")
    assert "no parallel form" in text  # the registry's reason

    with pytest.raises(PlanError, match=r"^forms\.memory: .*has no form 'chunky' \(available: triton, chunked, reference\)"):
        plan("titans", TITANS, forms={"memory": "chunky"})
    with pytest.raises(PlanError, match=r"^forms\.memry: no level 'memry' .*levels that are: memory\); "
                                        r"did you mean 'memory'\?$"):
        plan("titans", TITANS, forms={"memry": "reference"})
    # a level that exists but is not run by the runtime (an outer-loop MLP) has no execution form
    with pytest.raises(PlanError, match=r"^forms\.mlp: no level 'mlp'"):
        plan("titans", TITANS, forms={"mlp": "reference"})


def test_chain_link_keys():
    """A chain link of a runtime level is keyed ``<chain>.levels[j]`` and can be forced."""
    chain = {
        "name": "linked",
        "model": {"d_model": 16, "vocab": 32, "blocks": [["stack"]]},
        "levels": {"stack": {"kind": "chain", "levels": [
            {"kind": "level", "memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "l2"},
             "optimizer": {"kind": "gd", "lr": 0.5}},
            {"kind": "level", "memory": {"kind": "linear", "heads": 2}, "objective": {"kind": "dot"},
             "optimizer": {"kind": "gd", "lr": 0.5}},
        ]}},
    }
    assert plan(chain).executions() == {"stack.levels[0]": "chunked", "stack.levels[1]": "chunked"}
    model = build(chain, forms={"stack.levels[1]": "reference"})
    assert [m.form for m in runtime_levels(model)] == ["chunked", "reference"]


def test_a_registered_backend_form_plugs_in_by_registering_alone():
    """A backend registers a form (here a per-token form that counts its calls and declares no
    ``chunk_size``); forcing it through the plan builds and runs the model with it, on the device
    its ``supports`` names, and its results equal the reference form's. Nothing else changes."""
    from nlgraph.compilers.reference import run_reference

    calls = []

    def supports(level, device):
        return None if device == "cpu" else f"this test backend runs on cpu, not {device}"

    @registry.register_form("memory", "test_backend", priority=-100, supports=supports)
    def run_test_backend(run):
        calls.append(run.shape)
        return run_reference(run)

    try:
        assert registry.select_form("memory", load_spec("titans", TITANS).levels["memory"]).name != "test_backend"
        torch.manual_seed(0)
        ref = build("titans", overrides=TITANS, dtype=torch.float64, forms={"memory": "reference"})
        new = build("titans", overrides=TITANS, dtype=torch.float64, forms={"memory": "test_backend"})
        new.load_state_dict(ref.state_dict())
        assert [m.form for m in runtime_levels(new)] == ["test_backend"]
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(new(tokens), ref(tokens), rtol=0, atol=0)
        assert calls, "the registered form was never run"
        with pytest.raises(PlanError, match="this test backend runs on cpu, not cuda"):
            plan("titans", TITANS, device="cuda", forms={"memory": "test_backend"})
    finally:
        registry._REGISTRY["memory"].pop("test_backend")


def test_a_form_registered_not_to_compile_runs_eagerly_inside_compiled_blocks():
    """Issue 10: a form measured slower under inductor registers ``compiles=False``. The plan says
    so (``LevelPlan.compiles``, the label), and a compiled block runs that level eagerly between its
    graphs (``torch.compile`` without fullgraph for that block alone): the form's every call in the
    compiled model is outside Dynamo's trace, and the logits equal eager's."""
    over = ["vars.d_model=32", "vars.layers=1", "vars.heads=2", "model.vocab=64"]
    calls = []

    (chunked,) = [f for f in registry.forms("memory") if f.name == "chunked"]

    @registry.register_form("memory", "test_eager", priority=-100, compiles=False)
    def run_test_eager(run, chunk_size=64):
        calls.append(torch.compiler.is_compiling())
        return chunked.run(run, chunk_size=chunk_size)

    try:
        p = plan("deltanet", over, forms={"mixer": "test_eager"})
        (mixer,) = [lv for lv in p.levels if lv.execution is not None]
        assert not mixer.compiles and mixer.form == "test_eager, eager in a compiled block"
        assert all(lv.compiles for lv in plan("deltanet", over).levels)
        torch.manual_seed(0)
        model = build(p)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
        want = model(tokens)
        calls.clear()
        model.compile_blocks(backend="eager")
        torch.testing.assert_close(model(tokens), want, rtol=0, atol=0)
        assert calls == [False], calls  # run, and run outside the trace
    finally:
        registry._REGISTRY["memory"].pop("test_eager")
        torch._dynamo.reset()


def test_the_plan_says_what_of_a_level_a_kernel_form_leaves_to_pytorch():
    """A form's ``describe`` note joins its label: the ``triton`` form of a linear memory with
    momentum runs only the state recurrence in a kernel, and HOPE's DGD chunks only their walk;
    a delta rule or Titans' MLP memory is the kernel's whole (no note)."""
    linear = ["levels.memory.memory={kind: linear, heads: 2}", "levels.memory.gradient_point=token"]
    momentum = next(lv.form for lv in plan("titans", TITANS + linear, device="cuda").levels if lv.execution)
    assert momentum == "triton (the state recurrence in a kernel; the chunks' products, solves and reads in PyTorch)"
    hope = [lv.form for lv in plan("hope", tiny("hope"), device="cuda").levels if lv.execution == "triton"]
    assert any(f.startswith("triton (each chunk's recurrences walked in a kernel") for f in hope), hope
    # heads of 32 (the MLP memory's kernel leaves heads of 16 or fewer to the PyTorch form on CUDA)
    wide = TITANS + ["vars.d_model=64"]
    assert [lv.form for lv in plan("titans", wide, device="cuda").levels if lv.execution] == ["triton"]
    narrow = plan("titans", TITANS, device="cuda")
    assert [lv.execution for lv in narrow.levels if lv.execution] == ["chunked"]
    assert any(name == "memory" and form == "triton" and "16-wide tile" in why for name, form, why in narrow.declined())
    assert [lv.form for lv in plan("deltanet", tiny("deltanet"), device="cuda").levels if lv.execution] == ["triton"]


def test_declined_says_which_faster_form_a_level_does_not_get_and_why(capsys, monkeypatch):
    """``Plan.declined()`` lists the registered forms ranked above a level's form that refused it on
    the plan's target; ``nlgraph compile --device cuda`` prints them as notes."""
    from nlgraph.cli import main
    from nlgraph.compilers.kernels import dispatch
    from nlgraph.lower import plan

    monkeypatch.setattr(dispatch, "MLP_MEMORY_ON_GPU", False)
    p = plan("titans", device="cuda")
    assert p.executions() == {"memory": "chunked"}
    ((key, form, why),) = p.declined()
    assert (key, form) == ("memory", "triton") and "switched off on CUDA" in why
    assert plan("gated_deltanet", device="cuda").declined() == []  # it gets the best form
    assert plan("titans", device="cuda", forms={"memory": "chunked"}).declined() == []  # forced
    assert main(["compile", "titans", "--device", "cuda"]) == 0
    assert "note: level 'memory' does not run in form 'triton': Titans' MLP memory" in capsys.readouterr().out
