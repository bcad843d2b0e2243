"""Benchmark harness: time our callable against its nearest peer in the same process, alternating, as a ratio.

Rules from PERFORMANCE.md: one process, same config/dtype/threads/inputs, ours and the peer alternate over several
repetitions, the median is reported, and peak memory is measured beside every timing (peak RSS on CPU via
/proc/self/status VmHWM, reset through /proc/self/clear_refs; `torch.cuda.max_memory_allocated` on GPU). No test
asserts on these numbers; `bench/run.py` writes them to JSON and a Markdown table that README.md includes.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["Comparison", "compare", "machine_description", "write_results"]


@dataclass
class Comparison:
    """Result of one ours-vs-peer measurement. `ratio` = ours / peer (median seconds); < 1 means we are faster."""

    name: str
    ours: str
    peer: str
    ours_seconds: float
    peer_seconds: float
    ratio: float
    ours_peak_mb: float | None
    peer_peak_mb: float | None
    repeats: int
    target: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
    except OSError:
        pass


def _memory_mb(device: str, field: str) -> float | None:
    """GPU: allocated (field "VmRSS") or peak allocated ("VmHWM") MB; CPU: that /proc/self/status field in MB."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        value = torch.cuda.max_memory_allocated() if field == "VmHWM" else torch.cuda.memory_allocated()
        return value / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _time_once(fn: Callable[[], object], device: str) -> tuple[float, float | None]:
    """Seconds of one call, and its peak memory above what was in use before it (MB)."""
    _reset_peak_memory(device)
    baseline = _memory_mb(device, "VmRSS")
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = _memory_mb(device, "VmHWM")
    return seconds, None if peak is None or baseline is None else max(peak - baseline, 0.0)


def compare(
    name: str,
    ours: Callable[[], object],
    peer: Callable[[], object],
    *,
    ours_label: str,
    peer_label: str,
    repeats: int = 7,
    warmup: int = 1,
    device: str = "cpu",
    target: str = "",
    notes: str = "",
    extra: dict | None = None,
) -> Comparison:
    """Time `ours` and `peer` alternately (`warmup` untimed rounds, then `repeats` timed rounds) and compare medians.

    The order within a round alternates too (ours first on even rounds, the peer first on odd ones) so neither side
    always profits from a warm cache. Both callables must do the same work on the same inputs.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"`repeats` must be >= 1 and `warmup` >= 0, got {repeats} and {warmup}.")
    with torch.inference_mode():
        for _ in range(warmup):
            ours()
            peer()
        ours_times, peer_times, ours_peaks, peer_peaks = [], [], [], []
        for round_index in range(repeats):
            order = (("ours", ours), ("peer", peer)) if round_index % 2 == 0 else (("peer", peer), ("ours", ours))
            for label, fn in order:
                seconds, peak = _time_once(fn, device)
                (ours_times if label == "ours" else peer_times).append(seconds)
                (ours_peaks if label == "ours" else peer_peaks).append(peak)
    ours_median, peer_median = statistics.median(ours_times), statistics.median(peer_times)
    return Comparison(
        name=name,
        ours=ours_label,
        peer=peer_label,
        ours_seconds=ours_median,
        peer_seconds=peer_median,
        ratio=ours_median / peer_median if peer_median > 0 else float("inf"),
        ours_peak_mb=max((p for p in ours_peaks if p is not None), default=None),
        peer_peak_mb=max((p for p in peer_peaks if p is not None), default=None),
        repeats=repeats,
        target=target,
        notes=notes,
        extra=extra or {},
    )


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads (torch {torch.__version__})"


def _markdown_table(comparisons: list[Comparison], machine: str) -> str:
    lines = [
        f"Measured on {machine}; ratio = ours / peer (median of alternating runs, lower is faster).",
        "",
        "| measure | ours | peer | ours (ms) | peer (ms) | ratio | target | peak extra MB ours / peer |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for c in comparisons:
        peaks = "/".join("-" if p is None else f"{p:.0f}" for p in (c.ours_peak_mb, c.peer_peak_mb))
        lines.append(
            f"| {c.name} | {c.ours} | {c.peer} | {c.ours_seconds * 1e3:.2f} | {c.peer_seconds * 1e3:.2f} | "
            f"{c.ratio:.2f} | {c.target or '-'} | {peaks} |"
        )
    return "\n".join(lines)


def write_results(comparisons: list[Comparison], output_dir: str | Path, readme: str | Path | None = None) -> str:
    """Write `results.json` and `results.md` under `output_dir`; optionally replace the table in `readme`.

    In the README the table sits between `<!-- bench:start -->` and `<!-- bench:end -->`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    (output_dir / "results.json").write_text(
        json.dumps({"machine": machine, "comparisons": [asdict(c) for c in comparisons]}, indent=2)
    )
    table = _markdown_table(comparisons, machine)
    (output_dir / "results.md").write_text(table + "\n")
    if readme is not None:
        readme = Path(readme)
        text = readme.read_text()
        start, end = "<!-- bench:start -->", "<!-- bench:end -->"
        if start not in text or end not in text:
            raise ValueError(f"{readme} has no {start} ... {end} block to fill.")
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    return table
