"""When nlgraph's execution forms hand a level to the Triton kernels, and how its maths maps onto them.

The ``triton`` forms (:mod:`nlgraph.compilers.kernels.forms`) route here, each keeping the PyTorch
code of the ``chunked`` form as the exact fallback:

* the closed-form ``delta_rule`` kind (:mod:`nlgraph.compilers.delta_rule`);
* memory levels of the online driver (:mod:`nlgraph.compilers.chunked`) that are a (gated) delta
  rule in disguise (:func:`why_no_online_kernel` lists them; with a decay per head or per key
  channel, Kimi Delta Attention's) or linear attention with at most a per-head or per-key-channel
  decay (:func:`why_no_online_linear_attention`);
* mini-batch levels with Titans' two-layer MLP memory (:func:`why_no_mlp_memory_kernel`), through
  :mod:`nlgraph.compilers.kernels.mlp_memory`.

nlgraph's rule ``S_t = α_t S_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ``, ``y_t = S_t q_t`` with
``memory [B, H, D_v, D_k]`` is the kernel's with ``h = memoryᵀ``, ``g = log α`` and ``scale = 1``.
The online driver writes ``W_r = W_{r−1} D_r − e_r x_rᵀ`` with ``e_r = b_r W_{r−1} ḱ_r + f_r``; with
``retention: decay`` (``ḱ_r = α_r x_r``, ``D_r = α_r``) that is
``W_r = α_r W_{r−1} (I − b_r x_r x_rᵀ) − f_r x_rᵀ``: the delta rule with ``β = b`` and values
``−f / b``. For gd + l2, ``b = η``, ``f = −η v`` (``β = η``, values ``v``); for DGD + l2,
``b = 2η'``, ``f = −η' v`` (``β = 2η'``, values ``v / 2``); for DGD + dot, ``b = η'`` (values ``v``).
With ``retention: weight_decay`` (Titans' order, the gradient at the undecayed memory: ``ḱ_r = x_r``)
it is ``W_r = W_{r−1} (α_r I − b_r x_r x_rᵀ) − f_r x_rᵀ``, which is the same rule with ``β = b / α``
and values ``−f α / b``: ``α W (I − (b/α) x xᵀ) = W (α I − b x xᵀ)``. Inside the kernel β only meets
α as ``β_r Γ_{r,s}`` with ``Γ`` the decay from s to r, which holds ``α_r``, so the products stay
bounded however small α is. α is clamped at 1e-30 there (``_WD_FLOOR``): at float32's smallest
normal, β / α times the backward's sums overflowed.
Retention toward the initial state (``W ← W_0 + α (W − W_0)``) is the same rule in the deviation
``U = W − W_0``: the erase reads ``(W_0 + U) k``, so ``U`` takes the values ``v − W_0 k`` (linear
attention's writes do not read the memory and keep theirs), starts at ``W − W_0``, and every read
adds ``W_0 q``. A read before the write, ``W_{t−1} q_t``, is the kernel's read after the write at
``t − 1`` with the query of ``t``: the queries move one token earlier and the first token reads the
start state. Both are exact rewrites around the same kernels; autograd carries the gradients
through them (to ``W_0`` too).
Linear levels that neither takes but whose gates are per head (momentum, DGD with momentum, the
``outer`` objective, ``read: chunk_start``) run the
chunked form's all-chunks-at-once solve with its state recurrence in a kernel of its own
(:func:`online_recurrence_for`; on CUDA once ``ONLINE_RECURRENCE_ON_GPU`` is on). Other online
levels (per-channel gates with momentum or in Titans' order) and the mini-batch driver's other levels keep
their PyTorch forms.

Which tensors run kernels (``NLGRAPH_KERNELS``, or :func:`set_kernels`, which wins over it):

* ``auto`` (default): CUDA tensors, when triton imports;
* ``off``: never (the PyTorch forms everywhere; for A/B checks and as an escape hatch);
* ``interpret``: CUDA tensors, and CPU tensors through Triton's interpreter (slow; for tests at small
  shapes). The interpreter is chosen when triton is first imported: this mode sets
  ``TRITON_INTERPRET=1`` if triton is not imported yet.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from nlgraph.errors import NLGraphError

from ._load import CHANNEL_MAX_KEY_CUDA
from ._load import switch as _switch

__all__ = ["DELTA_RULE_CHANNEL_ON_GPU", "LINEAR_ATTENTION_CHANNEL_ON_GPU", "LINEAR_ATTENTION_ON_GPU", "MLP_MEMORY_ON_GPU", "ONLINE_RECURRENCE_ON_GPU", "CHUNK_WALK_ON_GPU", "CHUNK_WALK_AUTO_CHUNK",
           "online_recurrence_for", "why_no_online_recurrence", "MODES", "closed_form_fits", "delta_rule", "kernel_mode",
           "online_delta_rule", "online_linear_attention", "set_kernels", "why_no_kernel",
           "why_no_online_kernel", "why_no_online_linear_attention", "why_no_mlp_memory_kernel",
           "minibatch_mlp_memory"]

MODES = ("auto", "off", "interpret")
ENV = "NLGRAPH_KERNELS"
#: chunk sizes the kernels take (the forms' default is 64; results do not depend on it)
CHUNKS = (16, 32, 64)
MAX_HEAD_DIM = 256
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# log α for α = 0: exp(−87.3) is float32's smallest normal, ~1e-38 from the exact 0, and clamping α
# (not log α) keeps the gradient finite (0 instead of 0 · ∞)
_TINY = torch.finfo(torch.float32).tiny
# the Titans order's α floor: β / α times the backward's O(1) sums must stay finite in float32
# (at α = 1.2e-38, β / α is 8e37 and DGD's 2η′ / α overflowed); α W at 1e-30 is far below rounding
_WD_FLOOR = 1e-30

_override: str | None = None
# the environment is read once (and again by set_kernels(None)), not on every call: compiled blocks
# call into this module, and the mode must not be a per-call environment lookup inside their graphs
_env: str = os.environ.get(ENV, "")


def _check_mode(mode: str, where: str) -> str:
    if mode not in MODES:
        raise NLGraphError(f"unknown kernel mode {mode!r}; use one of {', '.join(MODES)}", path=where)
    return mode


def set_kernels(mode: str | None) -> None:
    """Choose the kernel mode for this process (``auto``, ``off``, ``interpret``), over
    ``NLGRAPH_KERNELS``; ``None`` goes back to the environment variable."""
    global _override, _env
    _override = None if mode is None else _check_mode(mode, "set_kernels(mode)")
    if mode is None:
        _env = os.environ.get(ENV, "")


def kernel_mode() -> str:
    """The mode in force: :func:`set_kernels`'s, else ``NLGRAPH_KERNELS``'s (as the process started,
    or as :func:`set_kernels(None) <set_kernels>` last read it), else ``auto``."""
    if _override is not None:
        return _override
    return _check_mode(_env.strip().lower() or "auto", ENV)


def _triton_module():
    """The kernels' Triton module, or the reason it cannot load (a string)."""
    if kernel_mode() == "interpret" and not torch.compiler.is_compiling() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from . import _delta_rule_triton
    except ImportError as e:
        return f"triton is not installed ({e})"
    return _delta_rule_triton


def why_no_kernel(device: torch.device | str) -> str | None:
    """``None`` when tensors on ``device`` run the Triton kernels in the current mode, else why not."""
    mode = kernel_mode()
    if mode == "off":
        return f"kernels are off ({ENV}=off or set_kernels('off'))"
    dev = torch.device(device).type
    if dev != "cuda" and not (mode == "interpret" and dev == "cpu"):
        return f"the Triton kernels run on CUDA (here: {dev}; {ENV}=interpret runs CPU tensors interpreted)"
    mod = _triton_module()
    if isinstance(mod, str):
        return mod
    if dev == "cpu" and not mod.INTERPRETED:
        return "triton was imported without TRITON_INTERPRET=1, so it cannot interpret kernels on CPU"
    return None


#: The widest key the per-head delta-rule and linear-attention kernels take in float32. Compiled for
#: sm_90 on CPU (``benchmarks/kernel_resources.py --cases delta_rule linear_attention --dim 256
#: --dtype float32``), at 256 the delta rule's state kernels ask for 278,528–393,216 bytes of shared
#: memory with ``tf32x3`` (its float32 default) and its backward's 303,104–344,064 with ``ieee``, linear
#: attention's backward 376,832 with ``ieee``; an H100 has 232,448. 16-bit keys fit up to
#: :data:`MAX_HEAD_DIM`. Wider float32 keys run the PyTorch form.
FLOAT32_MAX_KEY = 128


def _fits(q: torch.Tensor, v: torch.Tensor, chunk: int) -> bool:
    if torch.float32 in (q.dtype, v.dtype) and q.shape[-1] > FLOAT32_MAX_KEY:
        return False
    if q.device.type == "cpu" and torch.bfloat16 in (q.dtype, v.dtype):
        # Triton 3.6's interpreter computes bfloat16 kernels wrongly (numpy has no bfloat16;
        # errors of 1e9 against float32 where float16 gives 6e-4), so CPU bf16 stays in PyTorch
        return False
    return (chunk in CHUNKS and q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM
            and q.dtype in _DTYPES and v.dtype in _DTYPES and why_no_kernel(q.device) is None)


def _work_dtype(*xs: torch.Tensor) -> torch.dtype:
    """One dtype for q, k, v (the kernel takes one): under autocast its dtype, else theirs, or float32
    when they differ.

    Under CUDA autocast, L2-normalised keys and queries come out in float32 (``norm`` is on
    autocast's float32 list) while values are bfloat16; running those in float32 made the kernel's
    products IEEE float32, 10x slower than bfloat16 (the backward of a Gated DeltaNet layer took
    9 ms at B=8, T=2048, d_model 512 on an H200). The PyTorch path multiplies in the autocast dtype
    too, and the kernel keeps its state and accumulations in float32 either way. (CPU autocast is
    left out: Triton's interpreter computes bfloat16 wrongly, see :func:`_fits`.)"""
    if xs[0].device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    dtypes = {x.dtype for x in xs}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def delta_rule(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor,
               alpha: torch.Tensor | None, memory: torch.Tensor, chunk: int, *,
               log_alpha: torch.Tensor | None = None, work: torch.dtype | None = None,
               value_beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """nlgraph's (gated) delta rule through the kernel.

    Args:
        queries, keys: ``[B, T, H, D_k]``; values ``[B, T, H, D_v]``.
        beta, alpha: ``[B, T, H]`` (``alpha`` the activated decay, also ``[B, T, H, D_k]`` per key
            channel; ``None`` for none).
        memory: ``[B, H, D_v, D_k]`` the state at the start.
        log_alpha: ``[B, T, H]``, ``log α`` instead of ``alpha`` (float32).
        work: the dtype q, k and v enter the kernel in (default :func:`_work_dtype`).
        value_beta: ``[B, T, H]``, the values' own write strength (``chunk_delta_rule``'s).

    Returns:
        ``(y [B, T, H, D_v] in values' dtype, memory [B, H, D_v, D_k] in memory's dtype)``; the
        state is carried in float32 inside.
    """
    from .delta_rule import chunk_delta_rule

    out_dtype = values.dtype
    work = work or _work_dtype(queries, keys, values)
    g = log_alpha
    if alpha is not None:
        g = torch.log(alpha.float().clamp_min(_TINY))
    h0 = memory.transpose(-1, -2).float()
    y, ht = chunk_delta_rule(queries.to(work), keys.to(work), values.to(work), beta.float(), g,
                             initial_state=h0, output_final_state=True, scale=1.0, chunk=chunk,
                             value_beta=value_beta.float() if value_beta is not None else None)
    return y.to(out_dtype), ht.transpose(-1, -2).to(memory.dtype)


def closed_form_fits(keys: torch.Tensor, values: torch.Tensor, chunk: int) -> bool:
    """Whether the closed-form ``delta_rule`` kind's chunked form hands these inputs to the kernel."""
    return _fits(keys, values, chunk)


# --------------------------------------------------------------------------- the online driver


def why_no_online_kernel(spec: Any) -> str | None:
    """``None`` when a memory level (``LevelSpec``) run online by the chunked form is a (gated) delta
    rule the kernel computes exactly, else why not (the level then keeps the PyTorch form)."""
    why = _why_not_online_linear(spec)
    if why is not None:
        return why
    opt, obj = spec.optimizer.kind, spec.objective.kind
    if opt == "gd" and obj != "l2":
        return f"gd on the {obj} objective does not read the memory in its update (b = 0: linear attention)"
    if opt == "dgd" and obj not in ("l2", "dot"):
        return f"dgd on the {obj} objective"
    if opt not in ("gd", "dgd"):
        return f"the {opt} optimizer (momentum has no kernel yet)"
    if opt == "dgd" and spec.optimizer.momentum is not None:
        return "dgd with momentum"
    if _channel_decay(spec) and spec.retention.kind == "weight_decay":
        # W (diag(α) − b x xᵀ) is not a delta rule once α differs between channels (the per-head
        # rewrite β = b / α needs one α)
        return "a per-channel retention gate in Titans' order (weight_decay)"
    return _why_not_read_and_decay(spec, channel=True)


def _why_not_online_linear(spec: Any) -> str | None:
    """What both kernels need of the level's shape: a linear memory run exactly online, not
    self-modifying."""
    if spec.memory.kind != "linear":
        return f"no kernel for a {spec.memory.kind} memory (linear memories; the MLP of Titans)"
    from nlgraph.levels.run import periods

    if spec.frequency == "never" or periods(spec) != (1, 1):
        return "not an exact-online level (frequency 1, gradient point token)"
    if spec.adaptive or spec.values.self_target:
        return "a self-modifying level"
    return None


def _why_not_read_and_decay(spec: Any, channel: bool = False) -> str | None:
    """What both linear kernels need of the read and the retention: read after or before the write,
    no retention or a decay (before or after the write, toward zero or the initial state) with at
    most one gate per head, or per key channel with ``channel``."""
    if spec.read not in ("after_write", "before_write"):
        return f"read: {spec.read}"
    # weight_decay (Titans' order) maps onto the decay before the write, and the retention toward
    # W_0 onto the rule of the deviation W − W_0 (see the module docstring)
    why = _why_not_retention(spec.retention, ("decay", "weight_decay"), "", initial=True, channel=channel)
    return why or (_why_not_positive(spec.retention.gate) if spec.retention is not None else None)


def _why_not_retention(ret: Any, kinds: tuple[str, ...], order: str, initial: bool = False,
                       channel: bool = False) -> str | None:
    """What every kernel needs of a level's retention: none, or one of ``kinds`` (``order`` says why
    those) with at most one gate per head (or per key channel, with ``channel``), and not toward the
    initial state unless ``initial``."""
    if ret is None:
        return None
    if ret.kind not in kinds:
        return f"retention {ret.kind} ({order}kind {' or '.join(kinds)})"
    if ret.toward == "initial" and not initial:
        return "retention toward the initial state"
    if getattr(ret.gate, "per", "head") == "channel" and not channel:
        return f"a per-channel {'decay' if ret.kind == 'decay' else 'retention gate'}"
    return None


#: Gate activations whose value can be negative (or, scaled, zero): the linear kernels take log α
NOT_POSITIVE = ("identity", "tanh", "silu")


def _why_not_positive(gate: Any) -> str | None:
    """The delta-rule and linear-attention kernels take a retention factor through ``log α`` (clamped
    at a tiny positive value), so a gate that can be negative would silently become a near-total
    decay there: such a level keeps the PyTorch form (or the recurrence kernel), which takes α as it
    is."""
    if isinstance(gate, (int, float)):
        return None if gate > 0 else f"a retention factor {gate} ≤ 0"
    act, scale = getattr(gate, "act", None), getattr(gate, "scale", 1.0)
    if act in NOT_POSITIVE or scale <= 0:
        return f"a retention gate that can be ≤ 0 (act {act}, scale {scale})"
    return None


def _online_inputs(run: Any, chunk: int, *, broadcast_decay: bool) -> tuple | None:
    """``(q, k, v, lr, alpha)`` of a run whose tensors a kernel takes (no momentum, no slots, an
    ``lr`` tensor, a ``[B, T, H]`` decay or, with ``broadcast_decay``, one that broadcasts to it or
    to ``[B, T, H, D_k]``, one per key channel; shapes and dtypes that fit), else ``None``."""
    if run.optimizer.uses_momentum or run.retention not in (None, "decay", "weight_decay"):
        return None
    k, v, q = run.keys.data, run.values.data, run.queries.data
    if k.shape[1] == 0:
        return None
    lr, alpha = run.lr, run.alpha
    per_channel = isinstance(alpha, torch.Tensor) and alpha.dim() == 4 and alpha.shape[-1] in (1, k.shape[-1])
    bad_decay = alpha is not None and (not isinstance(alpha, torch.Tensor)
                                       or (alpha.dim() > 3 and not per_channel if broadcast_decay
                                           else alpha.dim() != 3))
    if not isinstance(lr, torch.Tensor) or bad_decay:
        return None
    if any(s.slot is not None for s in (run.keys, run.values, run.queries)) or not _fits(k, v, chunk):
        return None
    return q, k, v, lr, alpha


def _apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``W x`` per token: ``w [B, H, D_v, D_k]``, ``x [B, T, H, D_k]`` → ``[B, T, H, D_v]`` (in the
    wider of the two dtypes; under autocast, autocast's)."""
    dtype = torch.promote_types(w.dtype, x.dtype)
    return torch.einsum("bhvk,bthk->bthv", w.to(dtype), x.to(dtype))


def _deviation_values(values: torch.Tensor, keys: torch.Tensor, origin: torch.Tensor | None) -> torch.Tensor:
    """The kernel's values for the rule of the deviation ``U = W − W_0`` (retention toward the initial
    state): a delta rule that erases ``(W_0 + U) k`` writes ``v − W_0 k`` into ``U``."""
    if origin is None:
        return values
    return (values - _apply(origin, keys)).to(values.dtype)


def _kernel_queries(q: torch.Tensor, before: bool) -> torch.Tensor:
    """The queries the kernel reads with. A read before the write, ``W_{t−1} q_t``, is the kernel's
    read after the write at ``t − 1`` with the next token's query: the queries move one token
    earlier (the last slot reads nothing)."""
    if not before:
        return q
    return torch.cat([q[:, 1:], torch.zeros_like(q[:, :1])], dim=1)


def _level_reads(y: torch.Tensor, u0: torch.Tensor, q: torch.Tensor, origin: torch.Tensor | None,
                 before: bool) -> torch.Tensor:
    """The level's reads ``[B, T, H, D_v]`` from the kernel's ``y`` (reads of the state, or of the
    deviation ``U``, with :func:`_kernel_queries`): before the write the first token reads the start
    state ``u0`` and the kernel's last read is dropped; toward the initial state ``W_0 q`` is added."""
    if before:
        first = _apply(u0, q[:, :1]).to(y.dtype)
        y = torch.cat([first, y[:, :-1]], dim=1)
    if origin is not None:
        y = y + _apply(origin, q).to(y.dtype)
    return y


def online_delta_rule(run: Any, chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Run a ``LevelRun`` of the online driver through the kernel, or ``None`` when it does not
    qualify (:func:`why_no_online_kernel`, tensors, chunk size, dtypes), so the caller falls back.

    Returns ``(outputs [B, T, H, D_v], state)`` as the online driver does."""
    inputs = _online_inputs(run, chunk, broadcast_decay=True) if why_no_online_kernel(run.spec) is None else None
    if inputs is None:
        return None
    q, k, v, lr, alpha = inputs
    b, t, h = run.shape
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 4:
        if alpha.shape[-1] == 1:
            alpha = alpha[..., 0]
        elif run.retention == "weight_decay" or why_no_channel_kernel(
                q.device.type, k.shape[-1], DELTA_RULE_CHANNEL_ON_GPU, "NLGRAPH_DELTA_RULE_CHANNEL_GPU"):
            # Titans' order with a per-channel tensor (given to a spec that gates per head) is no
            # delta rule
            return None
        else:  # a decay per key channel (Kimi Delta Attention's gate)
            alpha = alpha.expand(b, t, h, k.shape[-1])
    lr = lr.expand(b, t, h)
    origin = run.state["origin.memory.w0"] if run.has_origin else None
    if run.optimizer.kind == "dgd":
        eta = lr / (1.0 + lr * k.square().sum(-1)) if run.optimizer.proximal else lr
        if run.objective.kind == "l2":
            beta, v = 2.0 * eta, v * 0.5  # b = 2η', f = −η' v: values −f / b = v / 2
        else:
            beta = eta
    else:
        beta = lr
    v = _deviation_values(v, k, origin)
    g, work, value_beta = None, None, None
    if alpha is not None and run.retention == "weight_decay":
        # β = b / α, values α v (the module docstring), written with log α: every path of the
        # gradient meets at g, where its O(1) terms cancel before the division by α, so no term
        # of order 1/α² (inf below α ≈ 1e-19) forms. With the values' own write strength the
        # values never pass through α at all (b / α · α v = b v): only the keys' β = b / α does
        g = torch.log(alpha.float().clamp_min(_WD_FLOOR)).expand(b, t, h)
        b_val = beta.float()
        beta = b_val * torch.exp(-g)
        half = _work_dtype(q, k, v) == torch.float16
        if not half and takes_value_beta(q.device):
            # (b / α) (α v) = b v: the kernel writes the values with b itself, no pass over them
            value_beta = b_val.expand(b, t, h)
        elif half:
            # float16's range is too short: α v underflows below α ≈ 6e-5 and the kernel's dv'
            # (about β / α) overflows 65504, so values and kernel work in float32 (tested)
            v, work = v.float() * torch.exp(g).unsqueeze(-1), torch.float32
        else:  # one pass in v's own dtype (a float32 round trip cost 0.4 ms eagerly at B=4, T=4096, D=128)
            v = v * torch.exp(g).to(v.dtype).unsqueeze(-1)
        alpha = None
    w = run.state["memory.w0"]
    u0 = w if origin is None else w - origin
    if alpha is not None and alpha.dim() < 4:
        alpha = alpha.expand(b, t, h)
    y, u = delta_rule(_kernel_queries(q, run.read_before), k, v, beta, alpha, u0, chunk, log_alpha=g, work=work,
                      value_beta=value_beta)
    y = _level_reads(y, u0, q, origin, run.read_before).to(run.values.data.dtype)
    state = dict(run.state)
    state["position"] = run.state["position"] + t
    state["memory.w0"] = u if origin is None else (u + origin).to(w.dtype)
    return y, state


#: Whether Titans' order (``retention: weight_decay``) on CUDA gives the delta-rule kernels the values'
#: own write strength (``chunk_delta_rule(value_beta=b)`` with ``β = b / α``) instead of scaling the
#: values by ``α`` in PyTorch, a pass over them forward and two backward (0.46 ms of a d_model-512
#: Gated DeltaNet-sized step on an H100; with it the step's GPU work is the plain rule's within
#: 0.03 ms, docs/benchmarks.md). On by default since ``benchmarks/kernels.py --value-beta`` passed on
#: an H100; ``NLGRAPH_VALUE_BETA_GPU=0`` turns it off. CPU tensors always take it.
VALUE_BETA_ON_GPU = _switch("NLGRAPH_VALUE_BETA_GPU", True)


def takes_value_beta(device: torch.device) -> bool:
    """Whether Titans' order gives the delta-rule kernels the values' own write strength for
    tensors on ``device``: CPU tensors (Triton's interpreter) always, CUDA tensors while
    :data:`VALUE_BETA_ON_GPU` is on. Float16 never does (its float32 copy of the values)."""
    return device.type != "cuda" or VALUE_BETA_ON_GPU


#: Whether a (gated) delta rule with a decay per key channel (Kimi Delta Attention's gate; the
#: kernels of ``_delta_rule_channel_triton``) runs on CUDA tensors. On since
#: ``benchmarks/delta_rule_channel_kernel.py`` passed on the H200 with triton 3.6 (outputs, state and
#: every gradient at float32 and bfloat16, the chunks the kernels run); a switch, so a Triton version
#: that breaks it can be turned off in one place: ``NLGRAPH_DELTA_RULE_CHANNEL_GPU=0`` for a process.
DELTA_RULE_CHANNEL_ON_GPU = _switch("NLGRAPH_DELTA_RULE_CHANNEL_GPU", True)


# --------------------------------------------------------------------------- linear attention (b = 0)

#: Whether the plan gives the linear-attention kernel CUDA tensors. On since
#: benchmarks/linear_attention_kernel.py passed on the H200 with triton 3.6 (Triton 3.4–3.7
#: miscompiles some backward kernels on Hopper, which the CPU interpreter cannot show); a switch, so
#: a Triton version that breaks it can be turned off in one place.
LINEAR_ATTENTION_ON_GPU = True
#: The same for a decay per key channel (GLA's; ``_output_channel`` / ``_grads_channel``), on since
#: ``benchmarks/linear_attention_kernel.py --channel`` passed on the H200 with triton 3.6;
#: ``NLGRAPH_LINEAR_ATTENTION_CHANNEL_GPU=0`` turns it off for a process.
LINEAR_ATTENTION_CHANNEL_ON_GPU = _switch("NLGRAPH_LINEAR_ATTENTION_CHANNEL_GPU", True)


def why_no_channel_kernel(device: Any, key_width: int | None, on: bool, env: str) -> str | None:
    """Why the kernels with a decay per key channel (GLA's, KDA's) do not run on ``device`` for keys
    ``key_width`` wide (``None``: not known) with their CUDA switch ``on`` (set by ``env``), or
    ``None``: on CUDA they may be switched off, and take the widths checked there."""
    if torch.device(device).type != "cuda":
        return None
    if not on:
        return f"its Triton kernel is switched off on CUDA ({env}=0; unset it to turn the kernel on)"
    if key_width is not None and key_width > CHANNEL_MAX_KEY_CUDA:
        return (f"its Triton kernels are checked on CUDA for key widths up to {CHANNEL_MAX_KEY_CUDA}, not {key_width} "
                "(use more heads)")
    return None


def _channel_decay(spec: Any) -> bool:
    ret = spec.retention
    return ret is not None and getattr(ret.gate, "per", "head") == "channel"


def why_no_online_linear_attention(spec: Any) -> str | None:
    """``None`` when a memory level run online by the chunked form is linear attention with at most a
    decay per head or per key channel (gd on the ``dot`` objective: ``W_t = α_t W_{t−1} + η_t v_t k_tᵀ``
    or ``W_t = W_{t−1} diag(α_t) + …``, or toward the initial state; RetNet, Mamba2, GLA, plain linear
    attention), read after or before the write, which
    ``chunk_linear_attention`` computes; else why not."""
    why = _why_not_online_linear(spec)
    if why is not None:
        return why
    # gd has no momentum field; a getattr with a default on a pydantic model would also break
    # Dynamo's trace on torch 2.11 (its __getattr__ reads __private_attributes__)
    if spec.optimizer.kind != "gd" or spec.objective.kind != "dot":
        return "not gd on the dot objective"
    return _why_not_read_and_decay(spec, channel=True)


def online_linear_attention(run: Any, chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Run a ``LevelRun`` that :func:`why_no_online_linear_attention` accepts through
    ``chunk_linear_attention``, or ``None`` (the caller falls back). ``W = hᵀ``, values ``η v``,
    ``g = log α``. Returns ``(outputs [B, T, H, D_v], state)`` as the online driver does."""
    inputs = (_online_inputs(run, chunk, broadcast_decay=True)
              if why_no_online_linear_attention(run.spec) is None else None)
    if inputs is None or (inputs[1].device.type == "cuda" and not LINEAR_ATTENTION_ON_GPU):
        return None
    alpha = inputs[4]
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 4 and why_no_channel_kernel(
            inputs[1].device.type, inputs[1].shape[-1], LINEAR_ATTENTION_CHANNEL_ON_GPU,
            "NLGRAPH_LINEAR_ATTENTION_CHANNEL_GPU"):
        return None
    q, k, v, lr, alpha = inputs
    from .linear_attention import chunk_linear_attention

    b, t, h = run.shape
    work = _work_dtype(q, k, v)
    vals = (v * lr.expand(b, t, h).unsqueeze(-1)).to(work)
    g = None
    if alpha is not None:  # [B, T, H] per head, [B, T, H, D_k] per key channel (GLA's decay)
        g = torch.log(alpha.float().clamp_min(_TINY))
        g = g.expand(b, t, h, k.shape[-1]) if g.dim() == 4 else g.expand(b, t, h)
    w = run.state["memory.w0"]
    # toward the initial state the deviation U = W − W_0 decays and takes the writes (which do not
    # read the memory), and the reads add W_0 q
    origin = run.state["origin.memory.w0"] if run.has_origin else None
    u0 = w if origin is None else w - origin
    y, ht = chunk_linear_attention(_kernel_queries(q, run.read_before).to(work), k.to(work), vals, g,
                                   initial_state=u0.transpose(-1, -2).float(), output_final_state=True,
                                   scale=1.0, chunk=chunk)
    y = _level_reads(y, u0, q, origin, run.read_before)
    u = ht.transpose(-1, -2)
    state = dict(run.state)
    state["position"] = run.state["position"] + t
    state["memory.w0"] = (u if origin is None else u + origin).to(w.dtype)
    return y.to(v.dtype), state


# --------------------------------------------------------------------------- the online recurrence

#: Whether the plan gives CUDA tensors the online form's recurrence kernel
#: (:mod:`~nlgraph.compilers.kernels.recurrence`; online linear levels with per-head gates that
#: neither kernel above takes: momentum, DGD with momentum, the outer objective). On: on an H100
#: ``benchmarks/online_form.py --check`` passes in float32 (``tf32x3``, within 2.2e-6 of float64)
#: and bfloat16, and in bfloat16 at B=4, T=4096, H=16, D=128 the kernel's forward + backward took
#: 26.96 / 29.33 / 13.31 ms against the PyTorch form's 82.19 / 98.83 / 64.44 (all chunks solved at
#: once, eager) for its three levels (docs/benchmarks.md). CPU tensors under ``interpret`` run it.
#: ``NLGRAPH_ONLINE_RECURRENCE_GPU=0`` turns it off for a process.
ONLINE_RECURRENCE_ON_GPU = _switch("NLGRAPH_ONLINE_RECURRENCE_GPU", True)
#: The recurrence kernel holds a state row's key width whole: up to 128 (wider runs the PyTorch loop).
RECURRENCE_MAX_KEY = 128


def why_no_online_recurrence(spec: Any) -> str | None:
    """``None`` when an online linear level has its state recurrence run by the recurrence kernel
    (the chunked form's ``_online_full``: per-head gates), else why not."""
    why = _why_not_online_linear(spec)
    if why is not None:
        return why
    if _channel_decay(spec):
        return "a per-channel retention gate (the recurrence kernel takes per-head gates)"
    return None


def online_recurrence_for(run: Any, chunk: int):
    """``online_recurrence`` when the recurrence kernel takes this run's tensors and chunk (device,
    mode, dtypes, sizes), else ``None`` (the chunked form then walks the chunks in PyTorch)."""
    if why_no_online_recurrence(run.spec) is not None:
        return None
    k, v = run.keys.data, run.values.data
    if why_no_kernel(k.device) is not None or (k.device.type == "cuda" and not ONLINE_RECURRENCE_ON_GPU):
        return None
    if k.dtype not in _DTYPES or (k.device.type == "cpu" and torch.bfloat16 in (k.dtype, v.dtype)):
        return None  # float64 is the PyTorch forms'; the interpreter computes bfloat16 wrongly
    from .recurrence import fits, online_recurrence

    return online_recurrence if fits(chunk, v.shape[-1], k.shape[-1]) else None


# --------------------------------------------------------------------------- the mini-batch DGD walk

#: Whether the plan gives CUDA tensors the chunk-walk kernel (:mod:`~nlgraph.compilers.kernels.chunk_walk`:
#: a mini-batch DGD level's per-layer recurrence over one chunk, token by token, in place of the
#: chunked form's triangular solve; HOPE's memories). Its check passed on an H100 (2026-12-06,
#: ``benchmarks/chunk_walk.py --check``: float32 within 2.4e-7 of float64, every gradient). ``None``
#: (``NLGRAPH_CHUNK_WALK_GPU`` unset): on for gradient chunks up to :data:`CHUNK_WALK_AUTO_CHUNK`
#: tokens, where it measured faster. The walk is sequential in a chunk's tokens: HOPE at chunk 16
#: trained 1.42x faster with it there, at chunk 256 (``hope_large_chunk``) 0.75x (docs/benchmarks.md).
#: ``1`` turns it on for every chunk, ``0`` off. CPU tensors under ``interpret`` run it at any chunk.
CHUNK_WALK_ON_GPU: bool | None = _switch("NLGRAPH_CHUNK_WALK_GPU", None)
#: The largest gradient chunk the chunk walk takes on CUDA by default (see :data:`CHUNK_WALK_ON_GPU`).
CHUNK_WALK_AUTO_CHUNK = 16


def why_no_chunk_walk_on_cuda(spec: Any) -> str | None:
    """Why the chunk walk stays off for this level's CUDA tensors (:data:`CHUNK_WALK_ON_GPU`), or
    ``None`` when it runs there."""
    from nlgraph.levels.run import periods

    if CHUNK_WALK_ON_GPU is False:
        return "the chunk-walk kernel is off on CUDA (NLGRAPH_CHUNK_WALK_GPU=0)"
    chunk = periods(spec)[1]
    if CHUNK_WALK_ON_GPU is None and chunk > CHUNK_WALK_AUTO_CHUNK:
        return (f"gradient chunks of {chunk} tokens: the chunk-walk kernel walks a chunk's tokens in order, and "
                f"on an H100 it trained HOPE slower than the chunked form's one triangular solve a chunk at "
                f"chunks of 256 (faster at 16); on CUDA it takes chunks up to {CHUNK_WALK_AUTO_CHUNK} "
                f"(NLGRAPH_CHUNK_WALK_GPU=1 turns it on for every chunk), and the chunked form solves in "
                f"nlgraph's Triton solve (NLGRAPH_CHUNK_SOLVE)")
    return None


def why_no_chunk_walk(spec: Any) -> str | None:
    """``None`` when a memory level's mini-batch chunks have their DGD recurrences walked by the
    chunk-walk kernel (any memory, per-head gates), else why not."""
    from nlgraph.levels.run import periods

    if spec.frequency == "never":
        return "frequency: never"
    period, chunk = periods(spec)
    if period == 1 and chunk == 1:
        return "an exact-online level (the chunk walk is the mini-batch driver's)"
    if spec.optimizer.kind != "dgd":
        return f"the {spec.optimizer.kind} optimizer (the chunk walk runs DGD's erase recurrence)"
    if _channel_decay(spec):
        return "a per-channel retention gate (the chunk walk takes per-head gates)"
    return None


def chunk_walk_for(run: Any):
    """``chunk_walk`` when the kernel takes this mini-batch run's tensors (device, mode, dtypes),
    else ``None`` (the chunked form then solves each chunk in PyTorch)."""
    if why_no_chunk_walk(run.spec) is not None or run.online:
        return None
    k = run.keys.data
    if why_no_kernel(k.device) is not None or (k.device.type == "cuda" and why_no_chunk_walk_on_cuda(run.spec)):
        return None
    if k.dtype not in _DTYPES or (k.device.type == "cpu" and k.dtype == torch.bfloat16):
        return None  # float64 is the PyTorch forms'; the interpreter computes bfloat16 wrongly
    from .chunk_walk import chunk_walk

    return chunk_walk if _walk_fits(run.memories.values()) else None


def _walk_fits(memories) -> bool:
    """Whether every layer's state row (a bias is a column more) fits the chunk walk's registers."""
    from .chunk_walk import fits

    return all(fits(layer.d_out, layer.d_in + (layer.bias is not None)) for mem in memories for layer in mem.layers)


def why_chunk_walk_too_wide(spec: Any, head_dim: int) -> str | None:
    """Why the chunk walk cannot hold this level's memory layers at ``head_dim`` (keys and values
    of that width), or ``None`` when it can."""
    from nlgraph.levels.memories import build_memory
    from nlgraph.levels.run import _slot_widths

    from .chunk_walk import MAX_IN

    try:
        mems = [build_memory(m, a, b) for m, a, b in _slot_widths(spec, head_dim, head_dim).values()]
    except ValueError:  # widths the level refuses: its own error comes when it runs
        return None
    if _walk_fits(mems):
        return None
    return f"a memory layer at head dim {head_dim} is wider than the chunk walk's rows ({MAX_IN} inputs)"


# --------------------------------------------------------------------------- the mini-batch MLP memory

#: Whether the plan gives Titans' MLP-memory kernel CUDA tensors. On since
#: benchmarks/mlp_memory_kernel.py passed on the H200 (outputs, state and every gradient against the
#: float64 token loop, in float32 and bfloat16, up to the ``[C, D]`` tile ``mlp_memory.MAX_CUDA_TILE``;
#: Triton 3.4–3.7 miscompiles some backward kernels on Hopper, which the CPU interpreter cannot show).
#: Larger tiles keep the PyTorch form. ``NLGRAPH_MLP_MEMORY_GPU=0`` (or off / false / no) turns it
#: off for a process.
MLP_MEMORY_ON_GPU = _switch("NLGRAPH_MLP_MEMORY_GPU", True)


def why_no_mlp_memory_kernel(spec: Any) -> str | None:
    """``None`` when a memory level is Titans' mini-batch MLP memory, which
    ``chunk_mlp_memory`` computes: a two-layer SiLU MLP without biases, keys and values of one
    width, the ``l2`` objective, momentum or plain gd, weight decay (or none) with at most one gate
    per head, frequency 1 with a gradient chunk of 16, 32 or 64, read after or before the write;
    else why not."""
    mem = spec.memory
    if mem.kind != "mlp" or mem.depth != 2 or mem.activation != "silu" or mem.bias:
        return "not a two-layer SiLU MLP memory without biases"
    if spec.adaptive or spec.values.self_target:
        return "a self-modifying level"
    from nlgraph.levels.run import periods

    if spec.frequency == "never":
        return "frequency: never"
    period, chunk = periods(spec)
    if period != 1 or chunk not in CHUNKS:
        return f"not a mini-batch level of chunk 16, 32 or 64 (period {period}, chunk {chunk})"
    if spec.read not in ("after_write", "before_write"):
        return f"read: {spec.read}"
    if spec.objective.kind != "l2":
        return f"the {spec.objective.kind} objective"
    if spec.optimizer.kind not in ("momentum", "gd"):
        return f"the {spec.optimizer.kind} optimizer (the kernel is momentum's, or gd's without it)"
    return _why_not_retention(spec.retention, ("weight_decay",), "the kernel decays after the step: ")


def _gate(x: Any, shape: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor | None:
    """A rate as ``[B, T, H]`` float32, from a tensor that broadcasts to it or a constant; ``None``
    for anything else (an adaptive gate)."""
    if isinstance(x, torch.Tensor):
        if x.dim() > 3:
            return None
        return x.float().expand(shape)
    if isinstance(x, (int, float)):
        return like.new_full(shape, float(x), dtype=torch.float32)
    return None


def minibatch_mlp_memory(run: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Run a ``LevelRun`` of the mini-batch driver through ``chunk_mlp_memory``, or ``None`` when it
    does not qualify (:func:`why_no_mlp_memory_kernel`, a run that starts inside a chunk, gates or
    tensors the kernel does not take), so the caller falls back. Returns ``(outputs [B, T, H, D],
    state)`` with the mini-batch driver's state entries: a sequence that ends inside a chunk keeps
    that chunk's start as its anchor."""
    if why_no_mlp_memory_kernel(run.spec) is not None or run.position % run.chunk != 0:
        return None
    if run.has_origin or run.has_pending or list(run.memories) != ["memory"]:
        return None
    q, k, v = run.queries.data, run.keys.data, run.values.data
    if any(s.slot is not None for s in (run.keys, run.values, run.queries)) or k.shape != v.shape:
        return None
    if q.device.type == "cuda":
        from .mlp_memory import why_not_on_cuda

        if not MLP_MEMORY_ON_GPU or why_not_on_cuda(run.chunk, q.shape[-1]) is not None:
            return None
    b, t, h = run.shape
    like = k
    momentum = run.optimizer.uses_momentum
    # plain gd is momentum with μ = 0 from a zero buffer: S_t = −η δ, W_t = α W_{t−1} + S_t
    eta, mu = _gate(run.lr, (b, t, h), like), _gate(run.mu if momentum else 0.0, (b, t, h), like)
    alpha = _gate(run.alpha if run.alpha is not None else 1.0, (b, t, h), like)
    if eta is None or mu is None or alpha is None or not _fits(k, v, run.chunk) or t == 0:
        return None
    from .mlp_memory import chunk_mlp_memory

    names = ("memory.w0", "memory.w1", "optimizer.memory.momentum.w0", "optimizer.memory.momentum.w1")
    if momentum:
        state0 = tuple(run.state[n] for n in names)
    else:
        w = (run.state[names[0]], run.state[names[1]])
        state0 = (*w, torch.zeros_like(w[0]), torch.zeros_like(w[1]))
    read = "before_write" if run.read_before else "after_write"
    work = _work_dtype(q, k, v)
    qkv = [x.to(work) for x in (q, k, v)]
    full = (t // run.chunk) * run.chunk
    if full in (0, t):
        y, end = chunk_mlp_memory(*qkv, eta, alpha, mu, state0, chunk=run.chunk, read=read)
        # ending on a chunk boundary, the anchor is the end state; inside the first chunk (a prompt
        # shorter than a chunk, one decoded token), it is that chunk's start
        anchor = end[:2] if full == t else state0[:2]
    else:  # the last chunk is partial: its start is the anchor a continuation reads its gradients at
        y1, mid = chunk_mlp_memory(*(x[:, :full] for x in qkv), eta[:, :full], alpha[:, :full], mu[:, :full],
                                   state0, chunk=run.chunk, read=read)
        y2, end = chunk_mlp_memory(*(x[:, full:] for x in qkv), eta[:, full:], alpha[:, full:], mu[:, full:],
                                   mid, chunk=run.chunk, read=read)
        y, anchor = torch.cat([y1, y2], dim=1), mid[:2]
    state = dict(run.state)
    state["position"] = run.state["position"] + t
    for n, x in zip(names if momentum else names[:2], end):
        state[n] = x.to(run.state[n].dtype)
    if run.has_anchor:
        for n, x in zip(names[:2], anchor):
            state[f"anchor.{n}"] = x.to(run.state[n].dtype)
    return y.to(v.dtype), state

