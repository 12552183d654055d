#!/usr/bin/env bash
# Fetch into .whl/ the wheels that benchmarks/device.sh installs on the GPU machine, which has
# Python 3.12 on x86_64, torch and triton, but no package registry. Run it here once per checkout:
#   bash benchmarks/fetch_wheels.sh
# then pass carry [".whl"] to the device tool. The first group is nlgraph's own dependencies that
# the GPU image lacks; the second and third are the optional anchors of `nlgraph bench` (fla's
# kernels and layers; titans-pytorch's NeuralMemory for deep-memory levels); the fourth, pytest and
# hypothesis, so the kernel tests run on the GPU too (`gpu_session.sh gpu_kernel_tests`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
target=(--no-deps -d .whl --python-version 3.12 --only-binary :all: --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
pip download -q "${target[@]}" pydantic pydantic-core annotated-types typing-inspection omegaconf
pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3   # omegaconf's; published as an sdist only
pip download -q "${target[@]}" fla-core flash-linear-attention
pip download -q "${target[@]}" titans-pytorch assoc-scan axial-positional-embedding einx hyper-connections \
    rotary-embedding-torch tensordict x-transformers loguru pyvers orjson frozendict torch-einops-utils
pip download -q "${target[@]}" pytest==9.2.0 pluggy iniconfig packaging hypothesis==6.170.27 sortedcontainers attrs
ls .whl
