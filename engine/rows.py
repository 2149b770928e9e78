"""A run's .jsonl rows (metrics, samples, tokens), read while the run may still be writing them. Plain Python:
plot.py reads runs without loading torch.

    complete_rows, token_steps   the rows up to a last line still being written
    step_lines                   every complete line with its step, as written (for rewriting the files)
"""

import json
import os


def complete_rows(path):
    """The rows of a .jsonl that may be being written (a run's metrics, its tokens): a last line not yet
    complete is left out; no file, no rows."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:       # a cut-off line may hold NULs or half a character
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows


def token_steps(run):
    """The rows of a run's tokens.jsonl, one per logging step (a last line still being written is left out)."""
    return complete_rows(os.path.join(run, "tokens.jsonl"))


def step_lines(path):
    """[(step, line)] of a run's .jsonl, each line as written; no file, no rows. A line cut off by a
    crash or power cut (a partial last line, or the NUL bytes some file systems leave where an append
    had reached the file's size and not its data) is left out: only lines written after the last
    save's flush can be, and those are after its step, to be redone."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:              # JSONDecodeError, or bytes that are not UTF-8
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append((row["step"], line if line.endswith(b"\n") else line + b"\n"))
    return rows
