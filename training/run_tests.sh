#!/usr/bin/env bash
# Runs the training recipe's tests (training/tests, pytest, CPU, about a minute).
# Exits 0 with a SKIPPED message where torch (or another test requirement) is not installed;
# exits non-zero when a test fails. Extra arguments go to pytest (e.g. -k export -s).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
py="${PYTHON:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
    echo "training/run_tests.sh: SKIPPED: $py not found"
    exit 0
fi
missing="$("$py" - <<'PY' 2>/dev/null
import importlib.util
print(" ".join(m for m in ["torch", "numpy", "onnx", "onnxruntime", "PIL", "pytest"]
               if importlib.util.find_spec(m) is None))
PY
)" || missing="(python failed)"
if [ -z "$missing" ] && ! "$py" -c "import torch" >/dev/null 2>&1; then
    missing="torch (installed but not importable)"
fi
if [ -n "$missing" ]; then
    echo "training/run_tests.sh: SKIPPED: python modules not importable: $missing" \
         "(pip install -r training/requirements.txt)"
    exit 0
fi
cd "$repo" || exit 1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$py" -m pytest -q -p no:cacheprovider training/tests "$@"
