"""A run's rows as they are measured, in rows.jsonl: the first line {"environment": ...}, then one row a
line, written and flushed when its case ends (a killed run keeps every finished case), and a last line
{"end": "complete"} or {"end": "deadline"} when the run stops by itself.

Every provider is guarded: one whose step raises gets a row with "error" (the exception) and the case
goes on with the others. A case starts only while the run's deadline is ahead.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
import traceback

clock = time.monotonic  # the deadline's clock (tests replace it)


class DeadlineReached(Exception):
    """The run's time budget is spent: no new case starts."""


def row_key(row: dict) -> tuple:
    """What a row measured, provider included: the same key in two runs is the same measurement."""
    return (row["suite"], row.get("case") or row.get("op"), row["shape"], row["dtype"],
            row.get("mode") or row.get("layout"), row["provider"])


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1000]


class Recorder:
    """Writes rows.jsonl at `path` (replacing it) and keeps the rows. deadline_s: seconds from now after
    which case() raises DeadlineReached; known: rows (by row_key) that cases reuse instead of measuring."""

    def __init__(self, path: str, env: dict, deadline_s: float | None = None, progress=lambda: None,
                 known: dict | None = None):
        self.rows: list[dict] = []
        self.progress, self.known = progress, known or {}
        self._end = None if deadline_s is None else clock() + deadline_s
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "w")
        self._write({"environment": env})

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._write(row)
        self.progress()

    def case(self, fields: dict, providers: list[str]) -> Case:
        if self._end is not None and clock() >= self._end:
            raise DeadlineReached
        return Case(self, fields, providers)

    def close(self, end: str) -> None:
        self._write({"end": end})
        self._file.close()


class Case:
    """One case (`fields`: suite, case, shape, dtype, mode...) of several providers, as a `with` block.

    each(fn) runs a step per provider still in the case; a provider whose step raises is out of the case
    with its error. result(p, ...) sets p's measured fields. On leaving the block every provider's row is
    recorded, in provider order: the row reused from an earlier run, its error (if any step failed), or
    its result (with speedup_vs_eager, None without an eager result). An exception that leaves the block is the error of every
    provider without a row, and the run goes on.
    """

    def __init__(self, rec: Recorder, fields: dict, providers: list[str]):
        self._rec, self.fields, self.providers = rec, fields, list(providers)
        self.reused = {p: rec.known[k] for p in providers if (k := row_key({**fields, "provider": p})) in rec.known}
        self.errors: dict[str, str] = {}
        self.results: dict[str, dict] = {}

    @property
    def live(self) -> list[str]:
        """The providers to measure: not reused, not failed."""
        return [p for p in self.providers if p not in self.reused and p not in self.errors]

    def each(self, fn, among=None) -> dict:
        """{p: fn(p)} over the live providers (those in `among`, when given)."""
        out = {}
        for p in self.live:
            if among is not None and p not in among:
                continue
            try:
                out[p] = fn(p)
            except Exception as e:  # noqa: BLE001 (the provider's row says what)
                self._fail(p, e)
        return out

    def result(self, provider: str, **measured) -> None:
        self.results[provider] = measured

    def _fail(self, provider: str, e: Exception) -> None:
        self.errors[provider] = _describe(e)
        print(f"bench: {provider} failed in {self.fields}", file=sys.stderr)
        traceback.print_exception(e, file=sys.stderr)

    def __enter__(self) -> Case:
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if e is not None and not isinstance(e, Exception):
            return False  # KeyboardInterrupt, SystemExit
        if e is not None:
            for p in self.live:
                if p not in self.results:
                    self._fail(p, e)
        eager = None if "eager" in self.errors else self.results.get("eager", {}).get("median_ms")
        for p in self.providers:
            if p in self.reused:
                row = self.reused[p]
            elif p in self.errors:
                row = {**self.fields, "provider": p, "error": self.errors[p]}
            else:
                r = self.results[p]
                row = {**self.fields, "provider": p, **r, "speedup_vs_eager": eager / r["median_ms"] if eager else None}
            self._rec.add(row)
        return True


def read(path: str) -> tuple[dict, list[dict], str | None]:
    """(environment, rows, end) of a rows.jsonl; end is None when the run was killed (a last line cut
    short by the kill is left out)."""
    env, rows, end = {}, [], None
    with open(path) as f:
        lines = f.read().split("\n")
    for line in lines[:-1]:  # the text after the last newline is empty, or a line cut short
        obj = json.loads(line)
        if "environment" in obj:
            env = obj["environment"]
        elif "end" in obj:
            end = obj["end"]
        else:
            rows.append(obj)
    return env, rows, end


def measured_compile(root: str, env: dict) -> dict:
    """torch.compile rows of the eager modules (compile-<mode>, not compile-fused) in the results.json
    and rows.jsonl files under `root` that were measured on env's device with its torch and triton, by
    row_key, each with "from": its file (unless it was reused already). They do not depend on this
    library's code. A row within 2 % of its eager row is left to be measured again: it may be a compile
    that ran eager (dynamo's recompile limit did that on the first GPU run)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True)
                       + glob.glob(os.path.join(root, "**", "rows.jsonl"), recursive=True)):
        if path.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
            run_env, run_rows = data["environment"], data["results"]
        else:
            run_env, run_rows, _ = read(path)
        if any(run_env.get(k) != env.get(k) for k in ("device", "torch", "triton")):
            continue
        eager_ms = {row_key(r)[:-1]: r["median_ms"] for r in run_rows if r["provider"] == "eager" and "error" not in r}
        for r in run_rows:
            if not r["provider"].startswith("compile-") or r["provider"] == "compile-fused" or "error" in r:
                continue
            eager = eager_ms.get(row_key(r)[:-1])
            if eager is None or abs(r["median_ms"] / eager - 1) > 0.02:
                found.setdefault(row_key(r), {"from": path, **r})
    return found
