"""Where the GPU time of a profiled step goes, from a torch.profiler Chrome trace.

    python bench/kernel_table.py profile/trace_rank0.json [--top 60]

The trace is what `--profile --use-pytorch-profiler` writes (training/profiling.py). Each GPU kernel
is charged to the op that launched it (the innermost aten op, with its input shapes) and to the
autograd node around that op in backward ("forward" otherwise), so elementwise kernels read as
"MulBackward0 / aten::mul [[8192, 2048], []]" rather than one anonymous vectorized_elementwise
kernel. Two tables: by (autograd node, op, shapes) and by kernel name. A third lists where the
GPU sat idle (no kernel on any stream) and which launch site ended each wait: with the host
launching ahead of the GPU there are no gaps, so gaps are host synchronisations or launch overhead.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json


def _load(path: str) -> list[dict]:
    with open(path) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def attribute(events: list[dict]) -> tuple[collections.Counter, collections.Counter, collections.Counter, float]:
    """(time by launch site, launches by launch site, time by kernel name, total kernel time), in us."""
    ops = {}                                    # External id -> innermost cpu op with that id
    nodes = collections.defaultdict(list)       # tid -> [(start, end, autograd node name)]
    for e in events:
        if e.get("cat") != "cpu_op" or "dur" not in e:
            continue
        name = e["name"]
        if name.startswith("autograd::engine::evaluate_function: "):
            nodes[e["tid"]].append((e["ts"], e["ts"] + e["dur"], name.split(": ", 1)[1]))
        ext = e.get("args", {}).get("External id")
        if ext is not None:
            prev = ops.get(ext)
            if prev is None or e["dur"] <= prev["dur"]:
                ops[ext] = e
    starts = {tid: sorted(v) for tid, v in nodes.items()}

    def node_of(op: dict) -> str:
        spans = starts.get(op["tid"], [])
        i = bisect.bisect_right(spans, (op["ts"], float("inf"), "")) - 1
        while i >= 0:                           # the innermost node whose span holds the op
            s, end, name = spans[i]
            if end >= op["ts"] + op["dur"]:
                return name
            i -= 1
        return "forward"

    def site_of(kernel: dict) -> str:
        op = ops.get(kernel.get("args", {}).get("External id"))
        if op is None:
            return "(no launching op)"
        dims = op.get("args", {}).get("Input Dims", "")
        return f"{node_of(op)} / {op['name']} {json.dumps(dims, separators=(',', ':'))[:90]}"

    by_site, calls, by_kernel, total = collections.Counter(), collections.Counter(), collections.Counter(), 0.0
    for e in events:
        if e.get("cat") != "kernel":
            continue
        dur = float(e.get("dur", 0))
        total += dur
        by_kernel[e["name"][:110]] += dur
        site = site_of(e)
        by_site[site] += dur
        calls[site] += 1
    return by_site, calls, by_kernel, total, site_of


def idle_gaps(events: list[dict], site_of, min_gap_us: float = 20.0) -> tuple[float, float, collections.Counter]:
    """(span of the kernels, idle time inside it, idle time by the launch site that ended each gap
    of at least min_gap_us), in us; idle = no kernel running on any stream."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    idle, by_site = 0.0, collections.Counter()
    if not kernels:
        return 0.0, 0.0, by_site
    busy_until = kernels[0]["ts"] + kernels[0].get("dur", 0)
    for k in kernels[1:]:
        gap = k["ts"] - busy_until
        if gap > 0:
            idle += gap
            if gap >= min_gap_us:
                by_site[site_of(k)] += gap
        busy_until = max(busy_until, k["ts"] + k.get("dur", 0))
    return busy_until - kernels[0]["ts"], idle, by_site


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=60)
    a = p.parse_args()
    events = _load(a.trace)
    by_site, calls, by_kernel, total, site_of = attribute(events)
    span, idle, gaps = idle_gaps(events, site_of)
    print(f"total kernel time {total / 1e3:.1f} ms\n\nby launch site (autograd node / op input-dims)")
    for site, us in by_site.most_common(a.top):
        print(f"{us / 1e3:9.2f} ms {100 * us / total:5.1f}% {calls[site]:6d}x  {site}")
    print("\nby kernel")
    for name, us in by_kernel.most_common(a.top // 2):
        print(f"{us / 1e3:9.2f} ms {100 * us / total:5.1f}%  {name}")
    print(f"\nGPU idle {idle / 1e3:.1f} ms of the kernels' span {span / 1e3:.1f} ms; gaps >= 20 us by the launch "
          f"site that ended them ({sum(gaps.values()) / 1e3:.1f} ms)")
    for site, us in gaps.most_common(a.top // 2):
        print(f"{us / 1e3:9.2f} ms  {site}")


if __name__ == "__main__":
    main()
