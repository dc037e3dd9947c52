#!/usr/bin/env python3
"""Markdown tables of docs/benchmarks.md from sbn-bench runs.

    ./scripts/bench.sh > run1.jsonl; ./scripts/bench.sh > run2.jsonl; ...
    python3 bench/tables.py run1.jsonl run2.jsonl run3.jsonl

Every cell is the median over the runs of that figure (each run's figure is
itself a median over its repetitions); where a cell shows "a (b-c)", b-c is
the range over the runs.  Pure Python 3, no dependencies.
"""
import json
import statistics
import sys


def load(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append([json.loads(line) for line in f if line.strip()])
    return runs


def rows(run, bench, **match):
    return [o for o in run if o.get("bench") == bench and all(o.get(k) == v for k, v in match.items())]


def values(runs, bench, field, **match):
    out = []
    for run in runs:
        for o in rows(run, bench, **match):
            v = o.get(field)
            if isinstance(v, (int, float)) and v == v:
                out.append(float(v))
    return out


def fmt(x, nd):
    return "" if x is None else f"{x:.{nd}f}"


def med(runs, bench, field, nd=1, spread=False, **match):
    v = values(runs, bench, field, **match)
    if not v:
        return ""
    m = fmt(statistics.median(v), nd)
    if spread and len(v) > 1:
        return f"{m} ({fmt(min(v), nd)}-{fmt(max(v), nd)})"
    return m


def table(head, body):
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in body:
        print("| " + " | ".join(r) + " |")
    print()


def main(paths):
    runs = load(paths)
    print(f"<!-- bench/tables.py over {len(runs)} runs -->\n")

    print("### floor (us per round trip)\n")
    body = []
    for C in (64, 256, 1024, 4096):
        b = [str(C), med(runs, "floor", "payload_bytes", 0, channels=C, spin=False)]
        for spin in (False, True):
            b.append(med(runs, "floor", "p50_us", 1, channels=C, spin=spin) + " / " +
                     med(runs, "floor", "p99_us", 0, channels=C, spin=spin))
        body.append(b)
    table(["C", "payload B", "blocking p50 / p99 (us)", "spinning p50 / p99 (us)"], body)

    print("### round\n")
    body = []
    for spin in (False, True):
        for N in (2, 4, 8):
            for C in (64, 256, 1024, 4096):
                m = dict(workers=N, channels=C, spin=spin)
                if not values(runs, "round", "p50_us", **m):
                    continue
                body.append([str(N), str(C), "yes" if spin else "no",
                             med(runs, "round", "p50_us", 1, True, **m),
                             med(runs, "round", "p99_us", 0, **m),
                             med(runs, "round", "rounds_per_s", 0, **m),
                             med(runs, "round", "star_p50_us", 1, **m),
                             med(runs, "round", "star_ratio", 2, True, **m),
                             med(runs, "round", "floor_ratio", 2, True, **m),
                             med(runs, "round", "floor_spin_ratio", 2, **m),
                             med(runs, "round", "mpi_p50_us", 1, **m),
                             med(runs, "round", "mpi_ratio", 2, True, **m),
                             med(runs, "round", "coord_sched_us_per_round", 1, **m),
                             med(runs, "round", "coord_allocs_per_round", 0, **m)])
    table(["N", "C", "spin (workers + coordinator)", "p50 us", "p99 us", "rounds/s",
           "star p50 us", "star_ratio", "floor_ratio", "floor_spin_ratio",
           "MPI p50 us", "mpi_ratio", "coord CPU us/round", "coord allocs/round"], body)
    fits = [rows(r, "round_fit") for r in runs]
    for i, f in enumerate(fits):
        for o in f:
            print(f"- run {i + 1} round_fit: {o['a_us']:.1f} us + {o['b_us_per_worker']:.1f} us "
                  f"per worker + {o['c_ns_per_worker_channel']:.1f} ns per worker-channel, "
                  f"R^2 = {o['r2']:.3f} (largest relative residual {o['max_rel_residual']:.2f})")
    print()

    print("### gloo (PyTorch all_reduce of the same payload), against sbn's rounds of the same run\n")
    body = []
    for N in (2, 4, 8):
        m = dict(workers=N, channels=256)
        if not values(runs, "gloo", "p50_us", **m):
            continue
        # gloo's p50 over sbn's blocking and spinning p50, run by run
        ratio = {}
        for spin in (False, True):
            r = []
            for run in runs:
                g = [o["p50_us"] for o in rows(run, "gloo", **m)]
                s_ = [o["p50_us"] for o in rows(run, "round", spin=spin, **m)]
                if g and s_:
                    r.append(g[0] / s_[0])
            ratio[spin] = (f"{statistics.median(r):.1f} ({min(r):.1f}-{max(r):.1f})"
                           if len(r) > 1 else f"{r[0]:.1f}" if r else "")
        body.append([str(N), "256", med(runs, "gloo", "p50_us", 0, True, **m),
                     med(runs, "gloo", "p99_us", 0, **m), ratio[False], ratio[True]])
    table(["N", "C", "gloo p50 us", "gloo p99 us", "gloo / sbn blocking",
           "gloo / sbn spinning"], body)

    print("### groups\n")
    body = []
    for C in (64, 256, 1024):
        m = dict(channels=C)
        if not values(runs, "groups", "rounds_per_s", **m):
            continue
        g = rows(runs[0], "groups", **m)[0] if rows(runs[0], "groups", **m) else {}
        body.append([f"{g.get('groups', '?')} x {g.get('workers_per_group', '?')}", str(C),
                     med(runs, "groups", "rounds_per_s", 0, True, **m),
                     med(runs, "groups", "coord_sched_us_per_round", 1, **m),
                     med(runs, "groups", "coord_ns_per_member_channel", 0, **m),
                     med(runs, "groups", "coord_allocs_per_round", 3, **m)])
    table(["groups x workers", "C", "rounds/s (all groups)", "coord CPU us/round",
           "coord ns per member-channel", "coord allocs/round"], body)

    print("### allreduce\n")
    body = []
    for bench, label in (("allreduce", "`sbn_allreduce`"),
                         ("allreduce_many", "`sbn_allreduce_many` (ResNet-50, 161 tensors)")):
        for N in (2, 4):
            sizes = sorted({o["bytes"] for r in runs for o in rows(r, bench, workers=N)})
            for B in sizes:
                m = dict(workers=N, bytes=B)
                size = f"{B / 2**20:g} MiB" if B % 2**20 == 0 else f"{B / 1e6:.1f} MB"
                body.append([label, str(N), size,
                             med(runs, bench, "p50_ms", 1, True, **m),
                             med(runs, bench, "floor_p50_ms", 1, **m),
                             med(runs, bench, "floor_ratio", 2, True, **m),
                             med(runs, bench, "gbps", 2, **m),
                             med(runs, bench, "mpi_p50_ms", 1, **m),
                             med(runs, bench, "mpi_ratio", 2, True, **m)])
    table(["call", "workers", "bytes", "p50 ms", "star floor p50 ms", "floor_ratio", "GB/s",
           "MPI p50 ms", "mpi_ratio"], body)

    print("### kernel (one thread)\n")
    body = []
    shapes = []
    for o in runs[0]:
        if o.get("bench") == "kernel" and o.get("shape") not in shapes:
            shapes.append(o.get("shape"))
    for shape in shapes:
        for relu in (False, True):
            for layout in ("NCHW", "NHWC"):
                m = dict(shape=shape, layout=layout, fused_relu=relu)
                if not values(runs, "kernel", "gbps", op="forward_train", **m):
                    continue
                cells = [shape, layout, "yes" if relu else "no"]
                for op in ("forward_train", "backward"):
                    cells.append(f"{med(runs, 'kernel', 'gbps', 1, op=op, **m)} "
                                 f"({med(runs, 'kernel', 'ratio', 2, op=op, **m)}, "
                                 f"{med(runs, 'kernel', 'passes_ratio', 2, True, op=op, **m)})")
                cells.append(f"{med(runs, 'kernel', 'gbps', 1, op='forward_eval', **m)} "
                             f"({med(runs, 'kernel', 'ratio', 2, op='forward_eval', **m)})")
                body.append(cells)
    table(["shape", "layout", "ReLU", "forward_train GB/s (ratio, passes_ratio)",
           "backward GB/s (ratio, passes_ratio)", "forward_eval GB/s (ratio)"], body)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
