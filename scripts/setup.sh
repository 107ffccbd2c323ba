#!/usr/bin/env bash
# One set-up for README, CI and users: system packages, a virtualenv with the
# project and its Python dependencies, and Horovod 0.28.1 built from source
# against the installed TensorFlow (the wheel is cached and reused).
#
#   HVD_GRADALIGN_VENV   where the virtualenv goes        (default: <repo>/.venv)
#   HVD_GRADALIGN_CACHE  where built Horovod wheels live  (default: ~/.cache/hvd_gradalign)
#   PYTHON               interpreter for the venv          (default: python3)
set -euo pipefail
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVD_GRADALIGN_VENV:-$REPO/.venv}"
CACHE="${HVD_GRADALIGN_CACHE:-$HOME/.cache/hvd_gradalign}"
PYTHON="${PYTHON:-python3}"
HOROVOD_VERSION=0.28.1

log() { printf '[setup] %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------
need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v g++ >/dev/null || need_apt+=(g++)
command -v make >/dev/null || need_apt+=(make)
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
# A one-node SLURM cluster runs in the tests (sweeps on a real scheduler).
command -v slurmctld >/dev/null || need_apt+=(slurmctld)
command -v slurmd >/dev/null || need_apt+=(slurmd)
command -v sbatch >/dev/null || need_apt+=(slurm-client)
command -v munged >/dev/null || need_apt+=(munge)
# The two-node test cluster also runs horovodrun -H over ssh between its nodes.
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    log "missing system packages: ${need_apt[*]}; install them (Debian: apt-get install ${need_apt[*]}) and re-run"
    exit 1
  fi
  log "apt-get install ${need_apt[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# --- virtualenv and TensorFlow ----------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
CONSTRAINTS="$REPO/scripts/constraints.txt"
# Horovod compiles against the installed TensorFlow, so TensorFlow comes first.
if ! "$PY" -c 'import tensorflow' 2>/dev/null; then
  log "installing TensorFlow"
  "$PY" -m pip install -q --upgrade pip setuptools wheel
  "$PY" -m pip install -q -c "$CONSTRAINTS" tensorflow packaging psutil pyyaml cloudpickle cffi
fi

# --- Horovod ----------------------------------------------------------------
if "$PY" - <<'PYEOF' 2>/dev/null
import horovod.tensorflow as hvd
raise SystemExit(0 if hvd.gloo_built() else 1)
PYEOF
then
  log "horovod $HOROVOD_VERSION with TensorFlow + Gloo already installed"
else

tf_version="$("$PY" -c 'import tensorflow as tf; print(tf.__version__)')"
py_tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
gpu=cpu
if command -v nvcc >/dev/null && [ -n "$(ls /dev/nvidia* 2>/dev/null)" ]; then gpu=nccl; fi
key="horovod-${HOROVOD_VERSION}_tf-${tf_version}_${py_tag}_${gpu}"
wheel_dir="$CACHE/wheels/$key"
wheel="$(ls "$wheel_dir"/horovod-*.whl 2>/dev/null | head -n1 || true)"

if [ -z "$wheel" ]; then
  log "building horovod $HOROVOD_VERSION for TensorFlow $tf_version ($gpu); this takes 10-20 minutes once"
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  # xla_mpi_ops.cc includes XLA headers that moved in newer TensorFlow; it only
  # serves XLA-compiled Horovod ops, which this project never uses.
  sed -i '/xla_mpi_ops\.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
  export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
  export HOROVOD_WITHOUT_MPI=1
  if [ "$gpu" = nccl ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
  export MAKEFLAGS="-j$(nproc)"
  mkdir -p "$wheel_dir.tmp"
  "$PY" -m pip wheel --no-build-isolation --no-deps -w "$wheel_dir.tmp" "$src"
  rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
  wheel="$(ls "$wheel_dir"/horovod-*.whl | head -n1)"
else
  log "reusing cached $wheel"
fi
"$PY" -m pip install -q --no-deps "$wheel"
"$PY" -c 'import horovod.tensorflow as hvd; assert hvd.gloo_built(), "horovod built without Gloo"'
log "horovod $HOROVOD_VERSION ready ($wheel)"
fi

# --- the project ------------------------------------------------------------
stamp="$VENV/.hvd_gradalign-deps"
want="$(cat "$REPO/setup.cfg" "$REPO/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing hvd_gradalign and its Python dependencies"
  "$PY" -m pip install -q -c "$CONSTRAINTS" -e "$REPO[test,plot,docs]"
  echo "$want" > "$stamp"
fi
"$PY" -c 'import hvd_gradalign'
log "ready: $VENV"
