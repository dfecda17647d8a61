"""One training step under torch's profiler, written as an operator table, and two tables compared.

``bench_train.py --profile-step N`` profiles step N of each trainer (ours and kohya's, each in its own
process) and prints where their times differ operator by operator: the way to find why one U-Net pass is
slower than the other when both run the same torch kernels. Tables go to ``bench/out/<name>_<trainer>.ops.json``.

Each row is one operator with one set of input shapes: self CPU time (time inside the operator, not in the
operators it calls), calls, the slowest call's self time. Rows are matched between trainers by operator name and
shapes; the comparison also sums by operator name alone, since the two U-Nets may reach the same kernel with
differently laid out inputs. The profiled step's own time is not comparable (profiler overhead; kohya's also
includes writing the table): read s/step from an unprofiled run.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


def table_path(out_dir: Path, run_name: str, trainer: str) -> Path:
    """Where a run's operator table of ``trainer`` goes (both trainers' processes write by this name)."""
    return Path(out_dir) / f"{run_name}_{trainer}.ops.json"


class StepProfiler:
    """Start before a step, stop after it; ``stop`` writes the table."""

    def __init__(self) -> None:
        self._profile = None

    def start(self) -> None:
        import torch

        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self._profile.__enter__()

    @property
    def running(self) -> bool:
        return self._profile is not None

    def stop(self, path: Path) -> None:
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        slowest: dict = defaultdict(float)  # one slow call (a page fault storm, a lazy init) vs a slow operator
        for e in profile.events():
            key = (e.key, str(e.input_shapes))
            slowest[key] = max(slowest[key], e.self_cpu_time_total / 1e6)
        rows = [
            {
                "op": e.key,
                "shapes": str(e.input_shapes),
                "calls": e.count,
                "self_s": e.self_cpu_time_total / 1e6,
                "slowest_call_s": slowest[(e.key, str(e.input_shapes))],
                "total_s": e.cpu_time_total / 1e6,
            }
            for e in profile.key_averages(group_by_input_shape=True)
        ]
        rows.sort(key=lambda r: -r["self_s"])
        Path(path).write_text(json.dumps({"self_s": sum(r["self_s"] for r in rows), "ops": rows}, indent=0))


def _by(rows: list[dict], key) -> dict:
    table: dict = defaultdict(lambda: [0.0, 0])
    for r in rows:
        entry = table[key(r)]
        entry[0] += r["self_s"]
        entry[1] += r["calls"]
    return table


def compare(a_path: Path, b_path: Path, a_name: str, b_name: str, top: int = 25) -> None:
    """Print the operators whose self time differs most between two tables, by name and by name + shapes."""
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    print(f"\nprofiled step, self CPU time: {a_name} {a['self_s']:.3f} s, {b_name} {b['self_s']:.3f} s")
    for title, key in (("operator", lambda r: r["op"]), ("operator + input shapes", lambda r: (r["op"], r["shapes"]))):
        ta, tb = _by(a["ops"], key), _by(b["ops"], key)
        keys = sorted(set(ta) | set(tb), key=lambda k: -abs(ta.get(k, [0, 0])[0] - tb.get(k, [0, 0])[0]))
        print(f"\nlargest differences by {title} ({a_name} - {b_name}):")
        print(f"{'diff s':>8} {a_name + ' s':>9} {'calls':>6} {b_name + ' s':>9} {'calls':>6}  {title}")
        for k in keys[:top]:
            (sa, ca), (sb, cb) = ta.get(k, [0.0, 0]), tb.get(k, [0.0, 0])
            label = k if isinstance(k, str) else f"{k[0]} {k[1][:150]}"
            print(f"{sa - sb:8.3f} {sa:9.3f} {ca:6d} {sb:9.3f} {cb:6d}  {label}")
