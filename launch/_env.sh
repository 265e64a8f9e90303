# Sourced by launch/train and launch/test: make sure a Python environment with distseq exists.
# Reuse the active environment when it already has distseq; otherwise create or refresh .venv in
# the repository. torch is pinned only when none is importable, so a cluster's CUDA torch is kept.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_PIN="${DISTSEQ_TORCH_PIN:-torch==2.13.0}"

distseq_python() {
  if [ -n "${VIRTUAL_ENV:-}" ] && "$VIRTUAL_ENV/bin/python" -c "import distseq" 2>/dev/null; then
    echo "$VIRTUAL_ENV/bin/python"
    return
  fi
  local venv="$REPO_ROOT/.venv"
  local stamp="$venv/.distseq-installed"
  if [ ! -x "$venv/bin/python" ]; then
    echo "distseq: creating $venv" >&2
    python3 -m venv "$venv" >&2
  fi
  # Reinstall only when pyproject.toml changed since the last successful install.
  if [ ! -f "$stamp" ] || [ "$REPO_ROOT/pyproject.toml" -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
    if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
      echo "distseq: installing $TORCH_PIN" >&2
      "$venv/bin/python" -m pip install --quiet "$TORCH_PIN" >&2
    fi
    echo "distseq: installing distseq and its dependencies" >&2
    "$venv/bin/python" -m pip install --quiet -e "$REPO_ROOT[test]" >&2
    touch "$stamp"
  fi
  echo "$venv/bin/python"
}
