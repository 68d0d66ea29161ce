"""The child process that checks answers against `output_schema` (see `schema_check.py`).

A JSON Schema check can run for ever: a `pattern` that backtracks catastrophically
(`^(a+)+$` against forty `a`s and a `!`), `uniqueItems` over a huge array, `$ref`s that
fan out exponentially.  Python's `re` holds the GIL while it matches, so neither a
thread nor a cancel scope can stop it; a process can be killed.

Protocol: one JSON request per line on stdin, `{"path", "schema", "lenient"}`; one JSON
reply per line on stdout, `{"errors": [...], "unusable": str | null}`.  No errors and no
`unusable` means the answer matched and `path` now holds its canonical text.  Each
request arms `alarm(deadline)`: should the dispatcher die while a check spins, the
kernel ends this process all the same (SIGALRM's default action needs no Python code to
run).  EOF on stdin ends it too.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

from .output_schema import MAX_OUTPUT_BYTES, SchemaUnusable, check_answer


def read_answer(path: Path) -> str:
    """The staged answer (its first `MAX_OUTPUT_BYTES`; a larger one fails to parse)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(MAX_OUTPUT_BYTES + 1).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""  # the agent wrote nothing: "the answer is empty"


def handle(request: dict[str, Any]) -> dict[str, Any]:
    path = Path(request["path"])
    try:
        text, errors = check_answer(read_answer(path), request["schema"],
                                    lenient=bool(request["lenient"]))
    except SchemaUnusable as exc:
        return {"errors": [], "unusable": str(exc)}
    except OSError as exc:
        return {"errors": [f"cannot read the answer: {exc.strerror or exc}"], "unusable": None}
    if text is not None:
        path.write_text(text, encoding="utf-8")
    return {"errors": errors, "unusable": None}


def main() -> int:
    deadline = max(1, int(sys.argv[1])) if len(sys.argv) > 1 else 60
    for line in sys.stdin:
        signal.alarm(deadline)
        reply = handle(json.loads(line))
        signal.alarm(0)
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
