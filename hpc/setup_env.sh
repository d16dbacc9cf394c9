#!/usr/bin/env bash
# setup_env.sh -- build (or update) the moespec virtualenv on a cluster login node.
#
#   bash hpc/setup_env.sh                      # venv in $WORK/venvs/moespec (or ~/venvs/moespec)
#   bash hpc/setup_env.sh /path/to/venv
#   DRY_RUN=1 bash hpc/setup_env.sh            # print the commands, run nothing
#
# Put the venv on a file system the compute nodes see (not /tmp, not a node-local disk), then
# point the cluster profile at it (hpc/clusters/<name>.yaml):
#   setup:
#     - module load python/3.11            # whatever provides $PYTHON below
#     - source /path/to/venv/bin/activate
#   python: python
#
# Knobs (environment):
#   MODULES="python/3.11 cuda/12.4"   modules to load first (when `module` exists)
#   PYTHON=python3                    interpreter the venv is made from (>= 3.10)
#   TORCH_SPEC="torch==2.13.0"        the torch requirement (setup.cfg pins the same version)
#   TORCH_INDEX_URL=...               e.g. https://download.pytorch.org/whl/cu124 for a CUDA build;
#                                     empty: PyPI's default build
#   EXTRAS=compute                    moespec extras (compute = torch, transformers, datasets...)
#
# Safe to re-run: an existing venv is reused and only updated. moespec is installed in editable
# mode from this checkout, so `git pull` updates the code; each `moespec submit` snapshots the
# package, so jobs already queued keep the code they were submitted with.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${WORK:-$HOME}/venvs/moespec}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
EXTRAS="${EXTRAS:-compute}"

log() { printf '[setup_env] %s\n' "$*" >&2; }
run() { log "+ $*"; [ -n "${DRY_RUN:-}" ] || "$@"; }

if [ -n "${MODULES:-}" ]; then
  if command -v module >/dev/null 2>&1 || type module >/dev/null 2>&1; then
    # shellcheck disable=SC2086  # a list of module names
    run module load $MODULES
  else
    log "MODULES is set but there is no \`module\` command here; continuing without"
  fi
fi

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null \
  || { log "ERROR: $PYTHON is missing or older than 3.10 (set PYTHON=, or MODULES= to load one)"; exit 1; }

case "$VENV" in
  /tmp/*|/dev/shm/*) log "WARNING: $VENV is node-local on most clusters; jobs on compute nodes will not see it" ;;
esac

if [ -x "$VENV/bin/python" ]; then
  log "updating the existing virtualenv $VENV"
else
  run "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
run "${PIP[@]}" install --quiet --upgrade pip
if [ -n "$TORCH_INDEX_URL" ]; then
  run "${PIP[@]}" install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
  run "${PIP[@]}" install --quiet "$TORCH_SPEC"
fi
run "${PIP[@]}" install --quiet -e "${REPO}[${EXTRAS}]"

# Check what jobs will need, on this node (a GPU is only visible on compute nodes).
run "$VENV/bin/python" -c "import moespec, torch, h5py, submitit; print('moespec', moespec.__version__, '| torch', torch.__version__, '| CUDA build', torch.version.cuda, '| h5py', h5py.__version__)"
run "$VENV/bin/moespec" validate "$REPO"/configs/experiments/*.yaml

log "done. In hpc/clusters/<name>.yaml:"
log "  setup: [\"source $VENV/bin/activate\"]"
log "  python: python"
