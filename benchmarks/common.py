"""Shared pieces of the benchmark suite: timing, statistics, the machine, profiles, results.

A case module measures; this module turns its samples into rows of "ours
against the reference measured in the same run", checks them against their
targets, and writes the JSON record and the markdown report. Nothing here
imports torch or cellpose at module level, so worker subprocesses start from
a clean slate and pay their imports where the measurement says they do.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
RESULTS_DIR = BENCH_DIR / "results"
DOC_PATH = ROOT / "docs" / "benchmarks.md"
DEV_DATA = ROOT / "tests" / "assets" / "dev"
#: The real image that the inference and service cases tile up to their sizes.
DEV_IMAGE = DEV_DATA / "images" / "test" / "nuclei_03.tif"
MIB = 1024**2


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


#: Torch CPU threads for ours and the reference alike (``BENCH_THREADS`` overrides).
THREADS = int(os.environ.get("BENCH_THREADS", "0")) or cpu_cores()


#: OpenMP wait policy of every worker, ours and the reference alike
#: (``BENCH_OMP_WAIT_POLICY``; empty keeps the library default). On a shared
#: 2-core machine the default, spinning, threads made the same 512² eval take
#: anywhere from 0.4 to 7.7 s while other processes ran; PASSIVE kept it within
#: a few per cent. It applies to both sides, so ratios stay fair.
OMP_WAIT_POLICY = os.environ.get("BENCH_OMP_WAIT_POLICY", "PASSIVE")


def set_torch_threads() -> None:
    """Give torch exactly :data:`THREADS` CPU threads (call it in every worker)."""
    import torch

    torch.set_num_threads(THREADS)


# --------------------------------------------------------------------------- statistics
@dataclass
class Stats:
    """Summary of repeated measurements: median and spread."""

    median: float
    min: float
    max: float
    n: int
    samples: list[float]

    @property
    def spread(self) -> float:
        """(max - min) / median: how far apart the repetitions landed."""
        return (self.max - self.min) / self.median if self.median else 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form, with the spread."""
        return {**asdict(self), "spread": round(self.spread, 4)}


def summarize(samples: Sequence[float]) -> Stats:
    """Median, min and max of ``samples`` (at least one)."""
    values = [float(x) for x in samples]
    if not values:
        raise ValueError("no samples")
    return Stats(statistics.median(values), min(values), max(values), len(values), values)


# --------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; else the peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``getrusage``; kB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux only); False if it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_now_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``; ``getrusage`` elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and library versions of this machine."""
    cpu_model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    cpu_model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    mem_gib = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu_model": cpu_model,
        "cores": cpu_cores(),
        "torch_threads": THREADS,
        "omp_wait_policy": OMP_WAIT_POLICY or "default",
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "fma"}),
        "memory_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": gpu_info(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    info.update(_versions())
    return info


def gpu_info() -> str | None:
    """The CUDA GPU torch sees, or None (asked in a subprocess: the runner never imports torch)."""
    code = "import torch\nprint(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("cellpose-finetuning", "cellpose", "torch", "numpy", "hypha", "hypha-rpc"):
        try:
            out[f"{pkg}_version"] = version(pkg)
        except PackageNotFoundError:
            out[f"{pkg}_version"] = "not installed"
    return out


def machine_slug(info: dict[str, Any]) -> str:
    """A file-name-safe name for the machine: CPU model, cores, GPU."""
    words = "".join(c if c.isalnum() else "-" for c in info["cpu_model"].lower())
    slug = "-".join(w for w in words.split("-") if w and w not in ("processor", "cpu"))[:40]
    slug = f"{slug}-{info['cores']}c"
    if info.get("gpu"):
        gpu = "".join(c if c.isalnum() else "-" for c in info["gpu"].lower())
        slug += "-" + "-".join(w for w in gpu.split("-") if w)[:30]
    return slug


def machine_line(info: dict[str, Any]) -> str:
    """One human line: CPU model, cores, memory, GPU."""
    gpu = info.get("gpu") or "no GPU"
    flags = f" ({', '.join(info['cpu_flags'])})" if info.get("cpu_flags") else ""
    threads = f", torch threads {info['torch_threads']}" if info.get("torch_threads") else ""
    if info.get("omp_wait_policy"):
        threads += f" (OMP_WAIT_POLICY {info['omp_wait_policy']})"
    return (
        f"{info['cpu_model']}{flags}, {info['cores']} cores{threads}, "
        f"{info['memory_gib']} GiB RAM, {gpu}"
    )


def git_commit() -> str | None:
    """The checked-out commit (with ``+dirty`` when tracked files have changes), if any."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------- profiles
_GROUPS = (
    ("cellpose_finetuning", "ours (cellpose_finetuning)"),
    ("/cellpose/", "cellpose"),
    ("segment_anything", "cellpose (segment_anything)"),
    ("torch", "torch"),
    ("numpy", "numpy / scipy"),
    ("scipy", "numpy / scipy"),
    ("fastremap", "numpy / scipy"),
    ("hypha_rpc", "hypha-rpc"),
    ("httpx", "httpx / httpcore"),
    ("httpcore", "httpx / httpcore"),
    ("botocore", "boto3"),
    ("boto3", "boto3"),
    ("tifffile", "tifffile"),
    ("pydantic", "pydantic"),
    ("matplotlib", "matplotlib"),
    ("PIL", "matplotlib"),
    ("msgpack", "hypha-rpc"),
)


def _group(filename: str, name: str) -> str:
    """Which library a profiled function belongs to (C built-ins by their name)."""
    text = filename if filename != "~" else name
    for needle, group in _GROUPS:
        if needle in text:
            return group
    if filename == "~":
        if "select" in name or "poll" in name or "acquire" in name or "sleep" in name:
            return "waiting (select, locks, sleep)"
        return "C built-ins (I/O, pickling, ...)"
    return "other (stdlib, site-packages)"


def _where(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    parts = Path(filename).parts
    for anchor in ("site-packages", "src", "lib"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    return f"{'/'.join(parts[-3:])}:{line}({name})"


def profile_call(fn: Callable[[], Any], *, top: int = 14) -> tuple[Any, dict[str, Any]]:
    """Run ``fn`` under cProfile; return its result and a summary of where the time went.

    The summary has the wall time, self time (``tottime``) per library, and
    the functions with the most cumulative and the most self time.
    """
    import cProfile

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        result = fn()
    finally:
        prof.disable()
    return result, summarize_profile(prof, time.perf_counter() - t0, top=top)


async def profile_async(fn: Callable[[], Any], *, top: int = 14) -> tuple[Any, dict[str, Any]]:
    """:func:`profile_call` for a coroutine function, profiled in the event loop's thread."""
    import cProfile

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        result = await fn()
    finally:
        prof.disable()
    return result, summarize_profile(prof, time.perf_counter() - t0, top=top)


def summarize_profile(prof: Any, wall: float, *, top: int = 14) -> dict[str, Any]:
    """Self time per library and the top functions of a ``cProfile.Profile``."""
    import pstats

    stats = pstats.Stats(prof)
    groups: dict[str, float] = {}
    rows = []
    for func, (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        group = _group(func[0], func[2])
        groups[group] = groups.get(group, 0.0) + tottime
        rows.append((func, ncalls, tottime, cumtime))

    def fmt(r: tuple) -> dict[str, Any]:
        return {
            "function": _where(r[0]),
            "library": _group(r[0][0], r[0][2]),
            "ncalls": r[1],
            "tottime": round(r[2], 4),
            "cumtime": round(r[3], 4),
        }

    # Imports and the profiled lambda itself crowd the top without saying anything.
    noise = ("<frozen importlib", "builtins.exec", "builtins.__import__", "<lambda>")
    by_cum = sorted(
        (r for r in rows if not any(n in _where(r[0]) for n in noise)), key=lambda r: -r[3]
    )
    by_self = sorted(rows, key=lambda r: -r[2])
    ours = [r for r in by_cum if "cellpose_finetuning" in r[0][0]]
    return {
        "wall_s": round(wall, 3),
        "self_time_by_library": {
            k: round(v, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top_cumulative": [fmt(r) for r in by_cum[:top]],
        "top_self": [fmt(r) for r in by_self[: top // 2 + 2]],
        "top_ours": [fmt(r) for r in ours[: top // 2 + 2]],
    }


def profile_difference(ours: dict[str, Any], ref: dict[str, Any]) -> str:
    """One sentence: where a profiled run of ours spent more time than the reference's."""
    a, b = ours["self_time_by_library"], ref["self_time_by_library"]
    extra = sorted(
        ((lib, a.get(lib, 0.0) - b.get(lib, 0.0)) for lib in set(a) | set(b)),
        key=lambda kv: -kv[1],
    )
    shown = ", ".join(f"{lib} {d:+.2f} s" for lib, d in extra if abs(d) >= 0.05) or "none"
    return (
        f"under cProfile ours took {ours['wall_s']:.2f} s, the reference "
        f"{ref['wall_s']:.2f} s ({ours['wall_s'] - ref['wall_s']:+.2f} s); self time by "
        f"library, ours − reference: {shown}"
    )


def pyspy_summary(raw_path: Path, *, top: int = 16, keep: Sequence[str] = ()) -> dict[str, Any]:
    """Summarise a ``py-spy record --format raw`` file: the most frequent frames.

    ``keep`` (substrings) limits the inclusive list to frames of interest
    (e.g. the server's own packages) so that the event loop's frames, which
    every sample shares, do not crowd them out.
    """
    from collections import Counter

    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        leaf[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    chosen = [(f, c) for f, c in inclusive.most_common() if not keep or any(k in f for k in keep)][
        :top
    ]
    return {
        "kind": "py-spy",
        "samples": total,
        "top_inclusive": [{"share": round(c / total, 4), "frame": f} for f, c in chosen],
        "top_self": [
            {"share": round(c / total, 4), "frame": f} for f, c in leaf.most_common(top // 2)
        ],
    }


# --------------------------------------------------------------------------- rows
@dataclass
class Target:
    """What a row must reach.

    ``kind`` is ``max_ratio`` (ours / reference at most ``value``),
    ``min_ratio`` (ours / reference at least ``value``, for throughputs) or
    ``max_value`` (ours at most ``value`` in the row's unit).
    """

    kind: str
    value: float

    def text(self, unit: str) -> str:
        """How the report writes the target."""
        if self.kind == "max_ratio":
            return f"≤ {self.value:g}× ref"
        if self.kind == "min_ratio":
            return f"≥ {self.value:.0%} of ref"
        return f"≤ {fmt_value(self.value, unit)}"

    def met(self, ours: float | None, ratio: float | None) -> bool | None:
        """Whether the row's median meets the target (None if not measurable)."""
        if self.kind == "max_value":
            return None if ours is None else ours <= self.value
        if ratio is None:
            return None
        return ratio <= self.value if self.kind == "max_ratio" else ratio >= self.value


@dataclass
class Row:
    """One line of a case's table: our figure against the reference figure."""

    name: str
    unit: str
    ours: Stats | None
    reference: Stats | None = None
    target: Target | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Median of ours / median of the reference."""
        if self.ours is None or self.reference is None or not self.reference.median:
            return None
        return self.ours.median / self.reference.median

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None without a target)."""
        if self.target is None:
            return None
        return self.target.met(self.ours.median if self.ours else None, self.ratio)

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "name": self.name,
            "unit": self.unit,
            "ours": self.ours.to_json() if self.ours else None,
            "reference": self.reference.to_json() if self.reference else None,
            "ratio": None if self.ratio is None else round(self.ratio, 4),
            "target": None
            if self.target is None
            else {**asdict(self.target), "text": self.target.text(self.unit)},
            "met": self.met,
            "note": self.note,
        }


@dataclass
class CaseResult:
    """What one case reports."""

    id: str
    title: str
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    reference_label: str = ""
    ours_label: str = ""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {
            "id": self.id,
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "ours_label": self.ours_label,
            "reference_label": self.reference_label,
            "duration_s": round(self.duration_s, 1),
            "rows": [r.to_json() for r in self.rows],
            "notes": self.notes,
            "profiles": self.profiles,
            "details": self.details,
        }


def skipped(case_id: str, title: str, reason: str) -> CaseResult:
    """A case that did not run, with one row saying why (so the table shows it)."""
    return CaseResult(
        id=case_id,
        title=title,
        status="skipped",
        reason=reason,
        rows=[Row(f"skipped: {reason}", "", None)],
    )


@dataclass
class Context:
    """Options every case receives."""

    quick: bool
    work_dir: Path
    log: Callable[[str], None] = print

    def reps(self, full: int, quick: int = 1) -> int:
        """Repetitions for this run."""
        return quick if self.quick else full

    def log_path(self, name: str) -> Path:
        """A log file for a subprocess of this run."""
        return self.work_dir / "logs" / f"{name}.log"


# --------------------------------------------------------------------------- subprocesses
def worker_env() -> dict[str, str]:
    """The environment of every worker: no downloads, no GUI, the runner's threads."""
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["BENCH_THREADS"] = str(THREADS)
    if OMP_WAIT_POLICY:
        env["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    env["BENCH_OMP_WAIT_POLICY"] = OMP_WAIT_POLICY
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_python(
    args: Sequence[str], *, timeout: float, log_path: Path
) -> tuple[dict[str, Any], float]:
    """Run ``python <args>``; return (the JSON of its last ``{``-line on stdout, wall seconds).

    stderr (and the other stdout lines) go to ``log_path``; the wall time
    covers the whole process, interpreter start to exit. The JSON gets
    ``cpu_s``: user + system CPU seconds of the process and the children it
    waited for (call this from one thread at a time for that figure to hold).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        cpu0 = _children_cpu()
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=log,
            timeout=timeout,
            env=worker_env(),
            cwd=ROOT,
        )
        wall = time.perf_counter() - t0
        cpu = _children_cpu() - cpu0
        log.write(proc.stdout)
    lines = [ln for ln in proc.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(str(a) for a in args[:2])} exited with {proc.returncode}; "
            f"see {log_path}:\n{tail(log_path)}"
        )
    result = json.loads(lines[-1])
    result.setdefault("cpu_s", cpu)
    return result, wall


class LineWorker:
    """A Python subprocess driven one command at a time; it answers each with a JSON line.

    Lets two processes (ours and the reference) take turns, so that their
    timed repetitions interleave while each keeps its own memory figures.
    """

    def __init__(self, args: Sequence[str], log_path: Path) -> None:
        import queue
        import threading

        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=ROOT,
            env=worker_env(),
        )
        self._lines: queue.Queue[bytes | None] = queue.Queue()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if line.startswith(b"{"):
                    self._lines.put(line)
                else:
                    self._log.write(line)
            self._lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line (RuntimeError if the process ends or times out first)."""
        import queue

        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise RuntimeError(f"no answer in {timeout:.0f} s; see {self.log_path}") from None
        if line is None:
            self.proc.wait()
            raise RuntimeError(
                f"worker exited with {self.proc.returncode}; see {self.log_path}:\n"
                + tail(self.log_path)
            )
        return json.loads(line)

    def ask(self, command: str, timeout: float) -> dict[str, Any]:
        """Send one command line and return the answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def close(self, timeout: float = 60) -> None:
        """Close its input and wait for it to exit (kill after ``timeout``)."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


def serve_commands(handlers: dict[str, Callable[[], dict[str, Any]]]) -> None:
    """Worker side of :class:`LineWorker`: answer each command line until ``done`` or EOF."""
    for line in sys.stdin:
        command = line.strip()
        if command in handlers:
            emit(handlers[command]())
        if command == "done":
            return


def tail(path: Path, n: int = 15) -> str:
    """The last ``n`` lines of a log file."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def emit(result: dict[str, Any]) -> None:
    """Print a worker's result as one JSON line on stdout (read by the driver)."""
    print(json.dumps(result, default=str), flush=True)


# --------------------------------------------------------------------------- data
def dev_image(size: int, path: Path = DEV_IMAGE) -> np.ndarray:
    """A real dev image tiled up to ``size``×``size`` float32, mirrored so tiles join without seams.

    The 256² nuclei image (29 nuclei) becomes ~1900 nuclei at 2048².
    """
    import tifffile

    img = tifffile.imread(path).astype("float32")
    if img.ndim != 2:
        raise ValueError(f"{path}: expected a 2D image, got {img.shape}")
    block = np.block([[img, img[:, ::-1]], [img[::-1, :], img[::-1, ::-1]]])
    reps = (-(-size // block.shape[0]), -(-size // block.shape[1]))
    return np.ascontiguousarray(np.tile(block, reps)[:size, :size])


def synthetic_cells(size: int, seed: int = 0, spacing: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Blurred disks (radius 7-12 px) on a jittered grid plus noise, and their labels.

    Only used to train the benchmark's ``cells`` network (fixtures.py); every
    image that is measured comes from :func:`dev_image`.
    """
    h = w = size
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), dtype="float32")
    lbl = np.zeros((h, w), dtype="uint16")
    yy, xx = np.mgrid[-14:15, -14:15]
    label = 0
    half = spacing // 2
    for cy in range(half, h - half + 1, spacing):
        for cx in range(half, w - half + 1, spacing):
            y = cy + int(rng.integers(-3, 4))
            x = cx + int(rng.integers(-3, 4))
            r = rng.uniform(7, 12)
            inside = yy**2 + xx**2 <= r * r
            y0, x0 = max(0, y - 14), max(0, x - 14)
            y1, x1 = min(h, y + 15), min(w, x + 15)
            cut = inside[y0 - (y - 14) : y1 - (y - 14), x0 - (x - 14) : x1 - (x - 14)]
            label += 1
            img[y0:y1, x0:x1][cut] = rng.uniform(0.6, 1.0)
            lbl[y0:y1, x0:x1][cut] = label
    for axis in (0, 1):  # a cheap blur, numpy only
        for _ in range(2):
            img = (np.roll(img, 1, axis) + img + np.roll(img, -1, axis)) / 3
    img += rng.normal(0, 0.05, img.shape).astype("float32")
    return np.clip(img, 0, None).astype("float32"), lbl


# --------------------------------------------------------------------------- output
def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def fmt_value(x: float | None, unit: str) -> str:
    """A figure with its unit, scaled for reading."""
    if x is None:
        return "–"
    if unit == "s":
        if abs(x) < 1e-3:
            return f"{x * 1e6:.0f} µs"
        if abs(x) < 1:
            return f"{x * 1e3:.1f} ms"
        return f"{x:.2f} s"
    if unit == "MiB":
        return f"{x:,.0f} MiB"
    if unit == "files/s":
        return f"{x:,.0f} files/s"
    if unit == "TFLOP/s":
        return f"{x:,.1f} TFLOP/s"
    return f"{x:.3g} {unit}".strip()


def _fmt_stats(s: dict[str, Any] | None, unit: str) -> str:
    if not s:
        return "–"
    text = fmt_value(s["median"], unit)
    if s["n"] > 1:
        text += f" ({fmt_value(s['min'], unit)}–{fmt_value(s['max'], unit)}, n={s['n']})"
    return text


def _fmt_met(met: bool | None) -> str:
    return {True: "**yes**", False: "**no**", None: "–"}[met]


def _pyspy_lines(p: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"**Profile: {p['label']}** (py-spy, {p['samples']} samples)",
        "",
        "```",
        "share of samples in the frame (inclusive):",
    ]
    lines += [f"{r['share']:7.1%}  {r['frame']}" for r in p["top_inclusive"]]
    lines += ["", "innermost frame (self):"]
    lines += [f"{r['share']:7.1%}  {r['frame']}" for r in p["top_self"]]
    lines.append("```")
    return lines


def _profile_lines(p: dict[str, Any]) -> list[str]:
    if p.get("kind") == "py-spy":
        return _pyspy_lines(p)
    lines = [
        "",
        f"**Profile: {p['label']}** (cProfile, {p['wall_s']:.2f} s under the profiler)",
        "",
        "| library | self time |",
        "|---|---|",
    ]
    total = sum(p["self_time_by_library"].values()) or 1.0
    for lib, t in p["self_time_by_library"].items():
        if t / total >= 0.005:
            lines.append(f"| {lib} | {t:.2f} s ({t / total:.0%}) |")
    lines += ["", "```", f"{'cumtime':>8} {'tottime':>8} {'ncalls':>8}  function"]
    for r in p["top_cumulative"]:
        lines.append(f"{r['cumtime']:8.3f} {r['tottime']:8.3f} {r['ncalls']:>8}  {r['function']}")
    lines += ["", "top self time:"]
    for r in p["top_self"]:
        lines.append(f"{r['cumtime']:8.3f} {r['tottime']:8.3f} {r['ncalls']:>8}  {r['function']}")
    if p.get("top_ours"):
        lines += ["", "ours (cellpose_finetuning) by cumulative time:"]
        for r in p["top_ours"]:
            lines.append(
                f"{r['cumtime']:8.3f} {r['tottime']:8.3f} {r['ncalls']:>8}  {r['function']}"
            )
    lines.append("```")
    return lines


def render_markdown(record: dict[str, Any], preamble: str = "") -> str:
    """The report ``docs/benchmarks.md`` from a results record."""
    m = record["machine"]
    lines = [
        "# Benchmarks: the service against cellpose by hand",
        "",
        "<!-- Generated by `make bench` (benchmarks/run.py) from "
        f"{record['results_file']}; edit benchmarks/, not this file. -->",
        "",
        "Users pick a service only if it costs them nothing over running cellpose by hand, so "
        "every figure of ours below sits next to the same work done directly with cellpose "
        "(or raw S3, or a bare RPC call) **measured in the same run, on the same machine**. "
        "Figures are medians over repetitions, with the range and count in brackets; "
        "ratio = ours / reference. Reproduce with `make bench` (or `.venv/bin/python "
        "benchmarks/run.py [--quick] [--cases training,inference,service,ray,gpu]`).",
        "",
        f"- **Machine:** {machine_line(m)}",
        f"- **Software:** Python {m['python']}, cellpose {m['cellpose_version']}, torch "
        f"{m['torch_version']}, numpy {m['numpy_version']}, hypha {m['hypha_version']}, "
        f"hypha-rpc {m['hypha-rpc_version']}; cellpose-finetuning "
        f"{m['cellpose-finetuning_version']} at commit {record.get('git_commit') or '?'}",
        f"- **Run:** {record['date']}, {record['duration_s'] / 60:.1f} min in all"
        + (" (**--quick**: tiny sizes, 1–2 repetitions)" if record.get("quick") else "")
        + (
            "; cases "
            + ", ".join(sorted({c["id"] for c in record["cases"]} - set(record["cases_run"])))
            + " merged from an earlier run ("
            + "; ".join(str(p) for p in record["merged"])
            + "), with their own durations below"
            if record.get("merged") and {c["id"] for c in record["cases"]} - {*record["cases_run"]}
            else ""
        )
        + (
            f"; load average at the start {m['load_average_at_start'][0]:.2f}"
            if m.get("load_average_at_start")
            else ""
        ),
        "",
    ]
    if record.get("fixtures_built_s"):
        built = ", ".join(f"{k} {v:.0f} s" for k, v in record["fixtures_built_s"].items())
        lines[-1:-1] = [
            f"- **Fixtures built in this run** (then cached in benchmarks/.work/cache): {built}"
        ]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += ["## Summary", "", "| case | status | targets met | time |", "|---|---|---|---|"]
    for case in record["cases"]:
        judged = [r for r in case["rows"] if r["met"] is not None]
        met = sum(1 for r in judged if r["met"])
        status = case["status"] + (f": {case['reason']}" if case["reason"] else "")
        targets = f"{met}/{len(judged)}" if judged else "–"
        lines.append(
            f"| {case['index']}. {case['title']} | {status} | {targets} | "
            f"{case['duration_s']:.0f} s |"
        )
    for case in record["cases"]:
        case_machine = case.get("details", {}).get("machine")
        machine = machine_line(case_machine) if case_machine else machine_line(m)
        lines += ["", f"## {case['index']}. {case['title']}", ""]
        if case["status"] != "ok":
            lines += [f"**{case['status']}**: {case['reason']}", ""]
        if case.get("ours_label"):
            lines.append(f"- **Ours:** {case['ours_label']}")
        if case.get("reference_label"):
            lines.append(f"- **Reference:** {case['reference_label']}")
        lines.append(f"- **Machine:** {machine}")
        if case["rows"]:
            lines += [
                "",
                "| measurement | ours | reference | ratio | target | met |",
                "|---|---|---|---|---|---|",
            ]
            for r in case["rows"]:
                ratio = "–" if r["ratio"] is None else f"{r['ratio']:.3f}"
                target = r["target"]["text"] if r["target"] else "–"
                lines.append(
                    f"| {r['name']} | {_fmt_stats(r['ours'], r['unit'])} | "
                    f"{_fmt_stats(r['reference'], r['unit'])} | {ratio} | {target} | "
                    f"{_fmt_met(r['met'])} |"
                )
            notes = [f"*{r['name']}*: {r['note']}" for r in case["rows"] if r["note"]]
            if notes:
                lines.append("")
                lines += [f"- {n}" for n in notes]
        if case["notes"]:
            lines += ["", "**Analysis**", ""]
            lines += [f"- {n}" for n in case["notes"]]
        for p in case.get("profiles", []):
            lines += _profile_lines(p)
    lines.append("")
    return "\n".join(lines)


def print_summary(record: dict[str, Any], log: Callable[[str], None] = print) -> None:
    """Print each target and whether it is met."""
    log("")
    log(f"Targets ({machine_line(record['machine'])}):")
    for case in record["cases"]:
        if case["status"] != "ok":
            log(f"  [{case['status']:>7}] {case['title']}: {case['reason']}")
            continue
        for r in case["rows"]:
            if r["met"] is None:
                continue
            ratio = f"ratio {r['ratio']:.3f}" if r["ratio"] is not None else ""
            ours = fmt_value(r["ours"]["median"], r["unit"]) if r["ours"] else "–"
            state = "met" if r["met"] else "MISSED"
            log(
                f"  [{state:>7}] {case['title']} / {r['name']}: {ours} {ratio} "
                f"(target {r['target']['text']})"
            )


def now_utc() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)
