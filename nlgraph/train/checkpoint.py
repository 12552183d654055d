"""Checkpoints: safetensors for tensors, JSON for everything else, no pickle anywhere.

Layout of a run folder ``DIR``::

    DIR/latest.json                    {"checkpoint": "checkpoints/step-000200", "step": 200}
    DIR/checkpoints/step-000200/
        model.safetensors              the model's parameters and buffers (tied weights stored once)
        optimizer.safetensors          the outer optimizer's per-parameter state
        outer.safetensors              (``updates: outer_loop`` levels only) the gradients held back
                                       until the level's period of training tokens is complete
        spec.yaml                      the resolved spec
        state.json                     step, tokens, data position, RNG states, spec hash, the
                                       optimizer's hyper-parameters, sha256 of every file above

A checkpoint is written into ``step-N.tmp`` (every file fsynced), renamed to ``step-N`` and only
then named by ``latest.json`` (written atomically); older checkpoints are deleted after that, so a
crash at any point leaves the previous checkpoint loadable. Loading checks every file's sha256, the
tensors' names and shapes, and that the stored spec hashes to the recorded hash, so a truncated,
corrupted or tampered checkpoint is refused with one clear error.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import NLGraphError
from ..io import atomic_write

__all__ = ["CheckpointError", "Checkpoint", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

EXTRA_FILES = ("outer.safetensors",)
"""Optional tensor files a checkpoint may hold besides the model's and the optimizer's."""

FORMAT = "nlgraph-checkpoint"
VERSION = 1


class CheckpointError(NLGraphError):
    """A checkpoint or run folder could not be read, or does not fit the model it is loaded into."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors on the CPU, the resolved spec text and the run state."""

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    spec_yaml: str
    state: dict[str, Any]
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Tensors of the optional files (:data:`EXTRA_FILES`) the checkpoint has, by file name."""

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tensor_aliases(module: torch.nn.Module) -> dict[str, str]:
    """``{name: stored_name}`` for every state-dict tensor of ``module`` that shares storage with an
    earlier one (tied weights), as :func:`model_tensors` finds them; nothing is copied."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in module.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
    return aliases


def model_tensors(module: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The module's state dict with tied tensors stored once: ``(tensors, aliases)`` where
    ``aliases[name] = stored_name`` for every tensor that shares storage with an earlier one."""
    aliases = tensor_aliases(module)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in module.state_dict().items()
               if name not in aliases}
    return tensors, aliases


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten an optimizer's state dict: per-parameter tensors as ``"{index}.{key}"`` and the rest
    (param groups, non-tensor state) as JSON-able data."""
    sd = optimizer.state_dict()
    tensors, scalars = flatten_optimizer_state(sd["state"])
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``{param index: {key: value}}`` → tensors (on the CPU) and other values, both keyed
    ``"{index}.{key}"``: the layout of ``optimizer.safetensors`` and its JSON scalars."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in state.items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, scalars


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load what :func:`optimizer_tensors` saved into ``optimizer`` (tensors move to each
    parameter's device on load, as ``Optimizer.load_state_dict`` does)."""
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for name, value in meta.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU and every CUDA device), JSON-able."""
    out = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    raw = base64.b64decode(state["cpu"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def save_checkpoint(
    out: str | os.PathLike,
    *,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    spec_yaml: str,
    spec_hash: str,
    state: dict[str, Any],
    keep: int = 1,
    model_state: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None,
    optimizer_state: tuple[dict[str, torch.Tensor], dict] | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint of ``model`` (and ``optimizer``) at ``step`` into the run folder ``out``.

    ``state`` holds the caller's JSON-able run state (data position, config, metrics so far...);
    RNG states, the spec hash and file checksums are added here. ``keep`` complete checkpoints are
    kept (the newest ones); the previous one is removed only after the new one is complete.
    ``model_state`` / ``optimizer_state`` replace what :func:`model_tensors` /
    :func:`optimizer_tensors` would read from ``model`` / ``optimizer`` (a sharded model's full
    state, gathered by the caller, in the same layout). ``extra`` maps a name of
    :data:`EXTRA_FILES` to the tensors written there. Returns the checkpoint's folder.
    """
    out = Path(out)
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    final = root / name
    tmp = root / f"{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, aliases = model_state if model_state is not None else model_tensors(model)
    files: dict[str, bytes] = {"model.safetensors": st_save(tensors), "spec.yaml": spec_yaml.encode()}
    opt_meta = None
    if optimizer_state is not None or optimizer is not None:
        opt_tensors, opt_meta = optimizer_state if optimizer_state is not None else optimizer_tensors(optimizer)
        files["optimizer.safetensors"] = st_save(opt_tensors)
    for fname, more in (extra or {}).items():
        if fname not in EXTRA_FILES:
            raise ValueError(f"{fname!r} is not one of the checkpoint's optional files {EXTRA_FILES}")
        files[fname] = st_save({k: v.detach().to("cpu").contiguous() for k, v in more.items()})
    for fname, data in files.items():
        _write_synced(tmp / fname, data)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "spec_hash": spec_hash,
        "aliases": aliases,
        "optimizer": opt_meta,
        "rng": rng_state(),
        "files": {fname: _sha256(data) for fname, data in files.items()},
        **state,
    }
    _write_synced(tmp / "state.json", json.dumps(record, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of the same step (a resumed run saving again): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write(out / "latest.json", json.dumps({"checkpoint": f"checkpoints/{name}", "step": int(step)}).encode())
    # only earlier steps are pruned: the checkpoint just written always stays, and a later-step
    # folder (another run's, left in this folder) is not this run's to delete
    # by step number, not by name: step-1000000 sorts before step-999999 as text
    steps = {p: int(p.name[5:]) for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()}
    earlier = sorted((p for p, n in steps.items() if n < step), key=steps.__getitem__)
    # max(0, ...): with fewer earlier checkpoints than keep − 1 a negative bound would slice from
    # the end and delete the oldest ones anyway
    for old in earlier[:max(0, len(earlier) - (max(keep, 1) - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def existing_run(out: str | os.PathLike) -> str | None:
    """What of a previous run the folder ``out`` holds (``"a checkpoint at step N"``,
    ``"checkpoints"``), or ``None`` when it holds none."""
    out = Path(out)
    pointer = out / "latest.json"
    if pointer.is_file():
        try:
            return f"a checkpoint at step {int(json.loads(pointer.read_text())['step'])}"
        except (OSError, ValueError, KeyError, TypeError):
            return "latest.json"
    root = out / "checkpoints"
    # a step-N.tmp folder is a checkpoint that was never completed (the process died writing it):
    # nothing to resume (--resume refuses it), so nothing a fresh run must keep
    if root.is_dir() and any(p.name.startswith("step-") and not p.name.endswith(".tmp") for p in root.iterdir()):
        return "checkpoints"
    return None


def clear_run(out: str | os.PathLike) -> None:
    """Remove a previous run's checkpoints, pointer and logs from ``out`` (a folder the calling
    command owns, such as the demo's); other files stay."""
    out = Path(out)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in ("latest.json", "metrics.jsonl", "memory.safetensors", "loss.png"):
        (out / name).unlink(missing_ok=True)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The folder named by ``out/latest.json``, or ``None`` when the run has no checkpoint yet."""
    out = Path(out)
    pointer = out / "latest.json"
    if not pointer.exists():
        return None
    try:
        rel = _json(_bounded_read(pointer, out, MAX_JSON_BYTES), pointer)["checkpoint"]
        if not isinstance(rel, str):
            raise TypeError
    except (KeyError, TypeError, OSError):
        raise CheckpointError("latest.json is not a checkpoint pointer; delete it to start over, or "
                              "point it at a folder under checkpoints/", file=str(pointer)) from None
    path = (out / rel).resolve()
    if out.resolve() not in path.parents:
        from ..spec.loader import excerpt

        raise CheckpointError(f"latest.json points outside the run folder ({excerpt(rel)})", file=str(pointer))
    return path


MAX_JSON_BYTES = 16 * 2**20
"""state.json / latest.json larger than this are refused before they are read."""


def _bounded_read(f: Path, root: Path, limit: int | None) -> bytes:
    """Read ``f`` only if it is a regular file inside ``root`` (symlinks resolved) and, with
    ``limit``, at most that many bytes: a FIFO or device never blocks or floods the loader."""
    import stat as st

    real = f.resolve()
    if real != root.resolve() and root.resolve() not in real.parents:
        raise CheckpointError("the file points outside the checkpoint folder; refusing to read it", file=str(f))
    info = os.stat(real)  # OSError (missing) is handled by the caller
    if not st.S_ISREG(info.st_mode):
        raise CheckpointError("not a regular file; the checkpoint was altered", file=str(f))
    if limit is not None and info.st_size > limit:
        raise CheckpointError(f"{info.st_size:,} bytes, over the {limit:,} allowed for this file; the "
                              f"checkpoint was altered", file=str(f))
    return real.read_bytes()


def _json(data: bytes, f: Path) -> Any:
    """Parse JSON from a checkpoint: no NaN/Infinity, no pathological nesting, one clear error."""
    def refuse(name: str) -> Any:
        raise ValueError(f"non-finite constant {name}")

    try:
        return json.loads(data.decode("utf-8"), parse_constant=refuse)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{f.name} is not valid JSON: the checkpoint is truncated or corrupted; "
                              f"resume from an earlier checkpoint", file=str(f)) from None


def _read(path: Path, fname: str, expected: dict[str, str]) -> bytes:
    f = path / fname
    try:
        data = _bounded_read(f, path, None)
    except OSError as e:
        raise CheckpointError(f"cannot read the checkpoint file: {e.strerror}; the checkpoint is "
                              f"incomplete — resume from an earlier one or start a new run",
                              file=str(f)) from None
    want = expected.get(fname)
    if want is None:
        raise CheckpointError("file not listed in state.json; the checkpoint was not written by "
                              "nlgraph or was altered", file=str(f))
    if _sha256(data) != want:
        raise CheckpointError(f"checksum mismatch ({len(data):,} bytes): the file is truncated or "
                              f"corrupted; resume from an earlier checkpoint or start a new run",
                              file=str(f))
    return data


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a checkpoint from its folder, or from a run folder (its latest checkpoint).

    Raises :class:`CheckpointError` (one line: the file and what to do) when anything is missing,
    truncated, corrupted, of an unknown format, or when the stored spec does not hash to the
    recorded hash.
    """
    from ..spec.loader import load_resolved_spec, spec_hash

    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such checkpoint or run folder; train one with `nlgraph train SPEC "
                              "--out DIR`", file=str(path))
    if (path / "latest.json").exists() or (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError("the run folder has no checkpoint yet (no latest.json)", file=str(path))
        path = found
    state_file = path / "state.json"
    try:
        state = _json(_bounded_read(state_file, path, MAX_JSON_BYTES), state_file)
    except OSError:
        raise CheckpointError("not a checkpoint folder (no readable state.json); pass a run folder "
                              "or one of its checkpoints/step-N folders", file=str(path)) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        from ..spec.loader import excerpt

        fmt = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"not an nlgraph checkpoint (format {excerpt(fmt)})",
                              file=str(state_file))
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint format version {state.get('version')!r} is not supported "
                              f"(this nlgraph reads version {VERSION})", file=str(state_file))
    expected = state.get("files")
    step = state.get("step")
    if (not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values())
            or not isinstance(step, int) or isinstance(step, bool) or step < 0
            or not isinstance(state.get("spec_hash"), str)):
        raise CheckpointError("state.json lacks a valid step, spec hash or file list; the checkpoint "
                              "was altered", file=str(state_file))
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for fname in ("model.safetensors", "optimizer.safetensors", *EXTRA_FILES):
        if fname not in expected:
            tensors[fname] = {}
            continue
        data = _read(path, fname, expected)
        try:
            tensors[fname] = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"not a valid safetensors file ({str(e).splitlines()[0]})",
                                  file=str(path / fname)) from None
    raw_spec = _read(path, "spec.yaml", expected)
    try:
        # text only: never a path or library name, no include, no live ${...}
        spec = load_resolved_spec(raw_spec, file=str(path / "spec.yaml"))
    except NLGraphError as e:
        raise CheckpointError(f"the stored spec does not load: {e.render()}", file=str(path / "spec.yaml")) from None
    spec_yaml = raw_spec.decode("utf-8")
    if spec_hash(spec) != state.get("spec_hash"):
        raise CheckpointError(f"the stored spec hashes to {spec_hash(spec)}, not the recorded "
                              f"{state.get('spec_hash')}: the checkpoint was altered", file=str(path / "spec.yaml"))
    return Checkpoint(path, tensors["model.safetensors"], tensors["optimizer.safetensors"], spec_yaml, state,
                      {f: tensors[f] for f in EXTRA_FILES if f in expected})


def load_model_state(module: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Copy a checkpoint's tensors into ``module``: names and shapes must match exactly."""
    want = module.state_dict()
    aliases = ckpt.state.get("aliases", {})
    missing = [k for k in want if k not in ckpt.model and k not in aliases]
    unexpected = [k for k in ckpt.model if k not in want]
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint does not fit this model ({len(missing)} tensors "
                              f"missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                              f"{unexpected[:2]}); load it with the spec it was trained with",
                              file=str(ckpt.path / "model.safetensors"))
    for name, t in ckpt.model.items():
        if tuple(t.shape) != tuple(want[name].shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)} in the checkpoint and "
                                  f"{tuple(want[name].shape)} in the model; load it with the spec it was "
                                  f"trained with", file=str(ckpt.path / "model.safetensors"))
    module.load_state_dict(ckpt.model, strict=False)
