"""Overrides that shrink any library spec to a tiny model, shared by the tests that build them all."""

from nlgraph import load_spec


def tiny(name: str) -> list[str]:
    """``KEY=VALUE`` overrides: vocabulary 64 and, where the spec has them, d_model 16, 2 heads,
    1 layer, chunk 4."""
    spec_vars = load_spec(name).vars
    out = ["model.vocab=64"]
    for key, value in (("d_model", 16), ("heads", 2), ("layers", 1), ("chunk", 4)):
        if key in spec_vars:
            out.append(f"vars.{key}={value}")
    return out
