#!/usr/bin/env bash
# Wheels of what the GPU machine (device tool: Python 3.12, jax 0.11.2, flax, optax, orbax,
# transformers, torch already there) lacks for the runner and the suite, downloaded here into
# .whl/ (git-ignored), to travel with a device call as a carried path:
#
#   bash benchmarks/gpu_wheels.sh            # here, once (needs the package registry)
#   # in the device call, carry [".whl"], and begin the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#     --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
#
# Versions as in requirements*.txt where they are pinned there; their own needs listed by name.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=(
  ml-collections==1.1.0
  tensorflow-datasets==4.9.10 array-record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1
  simple-parsing==0.1.9 tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2
  importlib-resources==7.1.0 docstring-parser==0.18.0 googleapis-common-protos==1.76.0
  tensorboardX==2.6.5
  math-verify==0.9.0 latex2sympy2-extended==1.11.0 antlr4-python3-runtime==4.13.2
  rlax==0.1.9 distrax==0.1.9 dm-env==1.6 tfp-nightly==0.26.0.dev20261027 gast==0.7.0
  decorator==5.3.2
)
SDIST_ONLY=(promise==2.3)  # Pure Python, published as a source archive only: built here.
mkdir -p .whl
for w in "${SDIST_ONLY[@]}"; do
  $PY -m pip wheel -q --no-deps -w .whl "$w"
done
for w in "${WHEELS[@]}"; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
du -sh .whl
