# Sourced by scripts/*: create or refresh the project's virtual environment in .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
stamp="$VENV/.installed"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# Reinstall when pyproject.toml, setup.py or the C fast path changed since the last install (an
# editable install builds uffdd/core/_fastpath.c next to its source).
changed() { [ ! -f "$stamp" ] || [ "$ROOT/$1" -nt "$stamp" ]; }
if changed pyproject.toml || changed setup.py || changed uffdd/core/_fastpath.c || changed uffdd/kernel/_memguard.c \
        || changed uffdd/csrc/guard.h || changed uffdd/peer/_wire.c || changed uffdd/csrc/wire.h \
        || changed uffdd/peer/_native.c || changed uffdd/peer/_responder.c || changed uffdd/peer/_bulk.c || changed uffdd/csrc/frame.h \
        || changed uffdd/csrc/link_api.h; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]"
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
