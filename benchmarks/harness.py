"""What every benchmark shares: timing, provenance, atomic JSON results, and targets read from targets.toml.

    ms = median(iter_ms(fn, iters=20, cuda=True))         # CUDA events per call after warm-up calls
    res = Results(path, provenance(), targets=[])         # rewritten (atomically) after every add()
    res.add(kind="decode", B=8, L=32768, ms=ms)
    res.data["targets"] = evaluate_targets(load_targets("e2e"), res.rows, names)

Importing this module imports neither torch nor triton (report.py and its tests stay light); the timing
functions use the torch the benchmark has already imported.
"""

from __future__ import annotations

import ast
import datetime
import functools
import hashlib
import importlib.metadata
import json
import math
import operator
import os
import pathlib
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGETS = pathlib.Path(__file__).resolve().parent / "targets.toml"
T = TypeVar("T")

# ------------------------------------------------------------------------------------ timing


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def wall_ms(fn: Callable[[], T], *, cuda: bool) -> tuple[float, T]:
    """(ms, result) of one call, the device synchronised before and after (long calls: prefills, decode loops)."""
    sync(cuda)
    start = time.perf_counter()
    out = fn()
    sync(cuda)
    return (time.perf_counter() - start) * 1e3, out


def median_wall_ms(fn: Callable[[], T], *, reps: int, warm: int = 2, cuda: bool) -> tuple[float, T]:
    """Median of `reps` synchronised wall times after `warm` untimed calls, and the last call's result."""
    for _ in range(warm):
        fn()
    times, out = [], None
    for _ in range(reps):
        ms, out = wall_ms(fn, cuda=cuda)
        times.append(ms)
    return median(times), out  # type: ignore[return-value]


def iter_ms(fn: Callable[[], Any], *, iters: int, warm: int = 2, cuda: bool) -> list[float]:
    """Per-call ms of `iters` back-to-back calls after `warm` calls: CUDA events on the GPU (launches queue up,
    so host overhead hides behind the device), perf_counter on CPU."""
    for _ in range(warm):
        fn()
    sync(cuda)
    if not cuda:
        out = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
        return out
    import torch

    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def do_bench_ms(fn: Callable[[], Any], *, graph: bool = False, rep: int = 100, warmup: int = 25) -> float:
    """Median ms of `triton.testing.do_bench` (L2 flushed between calls); `graph`: replayed as a CUDA graph.
    One call first, outside the timing, so compilation and autotuning are not measured."""
    import torch
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    if graph:
        return float(tt.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
    return float(tt.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


# ------------------------------------------------------------------------------------ provenance


def _version(module: str) -> str | None:
    """The version the process runs: the imported module's own, else the installed distribution's."""
    loaded = sys.modules.get(module)
    if loaded is not None and getattr(loaded, "__version__", None):
        return str(loaded.__version__)
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(root: pathlib.Path = ROOT) -> str | None:
    """HEAD of the checkout, "+dirty" when tracked files differ from it; FLUXC_COMMIT overrides (the GPU
    machine's copy has no .git). None when neither says."""
    if os.environ.get("FLUXC_COMMIT"):
        return os.environ["FLUXC_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        # --no-optional-locks: status must not refresh (write) the index of a checkout someone is working in
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def tree_digest(root: pathlib.Path = ROOT) -> str:
    """sha256 (16 hex) over fluxc/ and benchmarks/ sources: identifies the code without .git."""
    digest = hashlib.sha256()
    for folder in ("fluxc", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def gpu_name() -> str:
    """The first CUDA device's name, or "cpu" (torch is asked only when the process has imported it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return str(torch.cuda.get_device_name(0))
    return "cpu"


def provenance(argv: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    """Where a result comes from, for every result JSON: device, versions, code, command, time, host.

    `argv`: the command as run (program first; default `sys.argv`), for mains called with an argument list."""
    torch = sys.modules.get("torch")
    now = datetime.datetime.now(datetime.timezone.utc)
    meta: dict[str, Any] = dict(
        gpu=gpu_name(), torch=_version("torch"), triton=_version("triton"), transformers=_version("transformers"),
        fluxc=_version("fluxc"), flash_attn_4=_version("flash-attn-4"),
        cuda=getattr(getattr(torch, "version", None), "cuda", None),
        commit=git_commit(), tree_digest=tree_digest(), command=shlex.join(list(sys.argv if argv is None else argv)),
        date=now.isoformat(), unix_time=now.timestamp(), host=platform.node(), python=platform.python_version())
    meta.update(extra)
    return meta


# ------------------------------------------------------------------------------------ results


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write `data` as JSON by a temporary file renamed over `path`: a run killed mid-write keeps the last
    complete document, never half of one."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded (recursively): result files stay readable and diffable."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, list):
        return [rounded(x, digits) for x in value]
    if isinstance(value, dict):
        return {k: rounded(x, digits) for k, x in value.items()}
    return value


def matches(row: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    """Every selector field equals the row's; a list selects any of its values."""
    for key, want in selector.items():
        have = row.get(key)
        if isinstance(want, (list, tuple)):
            if have not in want:
                return False
        elif have != want:
            return False
    return True


class Results:
    """One result document, {"meta", "rows", ...sections}, rewritten atomically after every change."""

    def __init__(self, path: str | os.PathLike[str] | None, meta: dict[str, Any], **sections: Any) -> None:
        self.path = path
        self.data: dict[str, Any] = dict(meta=meta, rows=[], **sections)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    @property
    def meta(self) -> dict[str, Any]:
        return self.data["meta"]

    def add(self, **row: Any) -> dict[str, Any]:
        row = rounded(row)
        self.rows.append(row)
        print("ROW " + json.dumps(row, default=str), flush=True)
        self.flush()
        return row

    def find(self, **selector: Any) -> dict[str, Any] | None:
        """The first row matching `selector` that has a time (`ms`)."""
        return next((r for r in self.rows if matches(r, selector) and r.get("ms") is not None), None)

    def flush(self) -> None:
        if self.path:
            write_json(self.path, self.data)


# ------------------------------------------------------------------------------------ targets


class Missing(Exception):
    """A measurement a target needs is not in the results."""


def _divide(a: float, b: float) -> float:
    if b == 0:
        if a == 0:
            raise Missing("0 / 0")
        return math.inf  # e.g. "largest batch vs a dense batch of 0": unbounded, and a ">=" goal is met
    return a / b


_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: _divide,
    ast.FloorDiv: operator.floordiv}
_PLAIN_CALLS: dict[str, Callable[..., Any]] = {"min": min, "max": max, "abs": abs}
_ROW_CALLS = ("ms", "get")


@functools.cache
def check_expression(source: str) -> ast.Expression:
    """Parse a target expression, allowing only arithmetic, names, constants and the calls ms(...), get(...),
    min, max and abs (targets.toml is data: nothing in it may run code)."""
    tree = ast.parse(source.strip(), mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in (*_ROW_CALLS, *_PLAIN_CALLS):
                raise ValueError(f"{source!r}: only ms(...), get(...), min, max and abs may be called")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise ValueError(f"{source!r}: operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd)):
                raise ValueError(f"{source!r}: operator {type(node.op).__name__} is not allowed")
        elif not isinstance(node, (ast.Expression, ast.Name, ast.Constant, ast.keyword, ast.Load, ast.List,
                                   ast.operator, ast.unaryop)):
            raise ValueError(f"{source!r}: {type(node).__name__} is not allowed in a target expression")
    return tree


def _eval(node: ast.AST, rows: Sequence[Mapping[str, Any]], names: Mapping[str, Any]) -> Any:
    if isinstance(node, ast.Expression):
        return _eval(node.body, rows, names)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.List):
        return [_eval(x, rows, names) for x in node.elts]
    if isinstance(node, ast.Name):
        if names.get(node.id) is None:
            raise Missing(node.id)
        return names[node.id]
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, rows, names)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, rows, names), _eval(node.right, rows, names))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    args = [_eval(a, rows, names) for a in node.args]
    if node.func.id in _PLAIN_CALLS:
        return _PLAIN_CALLS[node.func.id](*args)
    selector = {kw.arg: _eval(kw.value, rows, names) for kw in node.keywords if kw.arg}
    field = "ms" if node.func.id == "ms" else args[0]
    for row in rows:
        if matches(row, selector) and row.get(field) is not None:
            return row[field]
    raise Missing(f"{field} of {selector}")


def evaluate(source: str, rows: Sequence[Mapping[str, Any]], names: Mapping[str, Any]) -> Any:
    """Value of a target expression over measured rows and named scalars; raises Missing.

    `ms(kind="decode", B=8)`: the `ms` of the first row matching the selector; `get("gbps", ...)` another field;
    bare names: `names` (scalars of the run, and the row's own fields in an `over` target)."""
    return _eval(check_expression(source), rows, names)


def render(template: str, rows: Sequence[Mapping[str, Any]], names: Mapping[str, Any]) -> str:
    """`template` with each {expression} replaced by its value ("n/a" when not measured)."""
    def one(match: re.Match[str]) -> str:
        try:
            return str(evaluate(match.group(1), rows, names))
        except Missing:
            return "n/a"
    return re.sub(r"\{([^{}]+)\}", one, template)


@dataclass(frozen=True)
class Target:
    """One goal of targets.toml: `value` (an expression) compared with `at_most` or `at_least`.

    `over`: a row selector; the target is then evaluated once per matching row, with that row's fields as
    names (e.g. every measured prefill shape), and rows whose value cannot be computed are left out."""

    id: str
    bench: tuple[str, ...]
    label: str
    value: str
    description: str
    at_most: float | None = None
    at_least: float | None = None
    over: Mapping[str, Any] | None = None
    note: str = ""
    issue: int | None = None

    @property
    def goal(self) -> str:
        return f"<= {self.at_most:g}" if self.at_most is not None else f">= {self.at_least:g}"

    def met(self, value: float) -> bool:
        return value <= self.at_most if self.at_most is not None else value >= self.at_least  # type: ignore[operator]

    def results(self, rows: Sequence[Mapping[str, Any]], names: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One entry per instance: {id, target (the label), value, goal, met (None: not measured), note}."""
        scopes = [dict(names)] if self.over is None else [{**names, **r} for r in rows if matches(r, self.over)]
        out = []
        for scope in scopes:
            try:
                value: float | None = float(evaluate(self.value, rows, scope))
            except Missing:
                if self.over is not None:
                    continue
                value = None
            out.append(dict(id=self.id, target=render(self.label, rows, scope),
                            value=None if value is None else round(value, 4), goal=self.goal,
                            met=None if value is None else bool(self.met(value)),
                            note=render(self.note, rows, scope)))
        return out


def load_targets(bench: str | None = None, path: str | os.PathLike[str] = TARGETS) -> list[Target]:
    """The targets of `bench` (all when None) from targets.toml, checked: unique ids, one goal each,
    expressions that parse."""
    with open(path, "rb") as f:
        raw = tomllib.load(f).get("target", [])
    targets, seen = [], set()
    for entry in raw:
        entry = dict(entry)
        benches = entry.pop("bench")
        target = Target(bench=tuple([benches] if isinstance(benches, str) else benches), **entry)
        if target.id in seen:
            raise ValueError(f"{path}: target id {target.id!r} appears twice")
        seen.add(target.id)
        if (target.at_most is None) == (target.at_least is None):
            raise ValueError(f"{path}: target {target.id!r} needs exactly one of at_most / at_least")
        check_expression(target.value)
        for template in (target.label, target.note):
            for expr in re.findall(r"\{([^{}]+)\}", template):
                check_expression(expr)
        if bench is None or bench in target.bench:
            targets.append(target)
    return targets


def evaluate_targets(targets: Iterable[Target], rows: Sequence[Mapping[str, Any]],
                     names: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target's entries, in targets.toml order."""
    return [entry for target in targets for entry in target.results(rows, names)]


VERDICT = {True: "MET", False: "MISSED", None: "n/a"}


def print_targets(entries: Iterable[Mapping[str, Any]]) -> None:
    """One line per evaluated target, as the benchmarks end their output."""
    for t in entries:
        print(f"TARGET {t['target']}: {t['value']} (goal {t['goal']}) -> {VERDICT[t['met']]}", flush=True)
