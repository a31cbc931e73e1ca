"""The tensors alive at a training step's memory peak, from TensorFlow's BFC allocator.

Used by ``benchmarks.memory_profile`` (the engines' workloads) and
``benchmarks.kerashub_memory --profile_peak`` (KerasHub models). The process must start
with ``TF_CPU_ALLOCATOR_USE_BFC=true`` (read when TensorFlow starts) and run one step
under ``tf.profiler``; replaying the allocator's allocation and deallocation events gives
the bytes in use over time, the step's peak, and the tensors alive then, grouped by the
op that made them (with shape). It counts TensorFlow's allocations only, not the runtime,
Python or thread pools, so its peaks are below peak RSS.
"""

from __future__ import annotations

import collections
import glob
import re


def _events(logdir: str) -> list[tuple[int, bool, dict]]:
    """(time in ps, is allocation, stats) of every BFC allocator event, in time order."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
        space.ParseFromString(f.read())
    out = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        stat_names = {k: m.name for k, m in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                kind = names.get(event.metadata_id)
                if kind not in ("MemoryAllocation", "MemoryDeallocation"):
                    continue
                stats = {}
                for s in event.stats:
                    which = s.WhichOneof("value")
                    value = getattr(s, which)
                    stats[stat_names.get(s.metadata_id)] = (
                        stat_names.get(value) if which == "ref_value" else value
                    )
                out.append((line.timestamp_ns * 1000 + event.offset_ps, kind[6] == "A", stats))
    out.sort(key=lambda e: e[0])
    return out


def peak_snapshot(events: list[tuple[int, bool, dict]]) -> tuple[int, int, dict[int, dict]]:
    """Bytes in use when the step starts, at its peak, and the allocations live then."""
    live: dict[int, dict] = {}
    peak, snapshot = -1, {}
    for _, is_alloc, stats in events:
        if is_alloc:
            live[stats["addr"]] = stats
        else:
            live.pop(stats["addr"], None)
        if stats["bytes_allocated"] > peak:
            peak, snapshot = stats["bytes_allocated"], dict(live)
    start = events[0][2]["bytes_allocated"] if events else 0
    return start, peak, snapshot


def _group(op: str) -> str:
    """An op name without the step function's prefix and per-layer numbering, so that
    e.g. the four blocks' feed-forward per-example gradients add up in one line."""
    op = op.replace("StatefulPartitionedCall/", "")
    return re.sub(r"_\d+(?=/|$)", "", op)


def live_at_peak(logdir: str) -> dict:
    """Bytes in use at the step's start and peak (MB), and the groups alive at the peak,
    largest first."""
    start, peak, snapshot = peak_snapshot(_events(logdir))
    groups: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for stats in snapshot.values():
        key = (_group(str(stats.get("tf_op"))), str(stats.get("shape")))
        groups[key][0] += stats.get("allocation_bytes", 0)
        groups[key][1] += 1
    rows = sorted(groups.items(), key=lambda kv: -kv[1][0])
    mb = 2.0**20
    return {
        "in_use_at_step_start_mb": start / mb,
        "step_peak_mb": peak / mb,
        "live_at_peak": [
            {"op": op, "shape": shape, "count": n, "mb": size / mb}
            for (op, shape), (size, n) in rows
        ],
    }


def print_rows(result: dict, top: int) -> None:
    for row in result["live_at_peak"][:top]:
        print(f"  {row['mb']:8.1f} MB  {row['count']:3d} x {row['shape']:18s} {row['op']}")
