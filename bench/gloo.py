#!/usr/bin/env python3
"""PyTorch's gloo all_reduce of what one sbn round carries: sbn-bench's `gloo` bench.

    python3 bench/gloo.py [--workers 2,4] [--channels 256] [--reps 400] [--warm 50]

For each N and C, starts N processes on 127.0.0.1 (torch.distributed with the
gloo backend, the TCP transport on the loopback interface), which all_reduce
(SUM) a float64 tensor of 2*C values, the statistics a forward round of C
channels sends, `warm` times untimed, then `reps` times timed at rank 0.  The
result is checked, and one JSON line is printed per case:

    {"bench":"gloo","workers":N,"channels":C,"payload_bytes":16*C,"reps":...,
     "p50_us":...,"p99_us":...,"mean_us":...,"torch":"1.13.0"}

Exit status: 0, 1 when a case failed, 3 when torch.distributed with gloo is
not importable (Debian: python3-torch), 2 on bad usage.  Every wait is
bounded: a case that does not finish in CASE_TIMEOUT_S is killed.
"""
import argparse
import json
import os
import sys
import tempfile
import time

CASE_TIMEOUT_S = 300


def worker(rank, n, channels, warm, reps, init_file, out_file):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n)
    t = torch.empty(2 * channels, dtype=torch.float64)
    base = torch.arange(1, 2 * channels + 1, dtype=torch.float64) * (rank + 1)
    for _ in range(warm):
        t.copy_(base)
        dist.all_reduce(t)
    dist.barrier()
    lat = []
    for _ in range(reps):
        t.copy_(base)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        lat.append((time.perf_counter() - t0) * 1e6)
    want = torch.arange(1, 2 * channels + 1, dtype=torch.float64) * (n * (n + 1) / 2)
    ok = bool(torch.equal(t, want))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump({"ok": ok, "lat": lat}, f)
    return 0 if ok else 1


def pct(v, p):
    v = sorted(v)
    k = max(0, min(len(v) - 1, int(-(-p * len(v) // 1)) - 1))  # nearest rank
    return v[k]


def run_case(n, channels, warm, reps):
    import multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="sbn-bench-gloo-") as d:
        init_file, out_file = os.path.join(d, "init"), os.path.join(d, "out.json")
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=worker, args=(r, n, channels, warm, reps, init_file, out_file))
                 for r in range(n)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + CASE_TIMEOUT_S
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        late = [p for p in procs if p.is_alive()]
        for p in late:
            p.kill()
            p.join()
        if late:
            print(f"gloo.py: N={n} C={channels}: killed after {CASE_TIMEOUT_S} s", file=sys.stderr)
            return None
        if any(p.exitcode != 0 for p in procs) or not os.path.exists(out_file):
            print(f"gloo.py: N={n} C={channels}: exit codes {[p.exitcode for p in procs]}",
                  file=sys.stderr)
            return None
        with open(out_file) as f:
            res = json.load(f)
        if not res["ok"]:
            print(f"gloo.py: N={n} C={channels}: wrong sum", file=sys.stderr)
            return None
        return res["lat"]


def int_list(hi):
    def parse(s):
        try:
            v = [int(x) for x in s.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"wants comma-separated integers, got '{s}'")
        if not v or min(v) < 1 or max(v) > hi:
            raise argparse.ArgumentTypeError(f"wants integers in [1, {hi}], got '{s}'")
        return v
    return parse


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int_list(64), default=[2, 4])
    ap.add_argument("--channels", type=int_list(1 << 20), default=[256])
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--warm", type=int, default=50)
    a = ap.parse_args()
    if a.reps < 1 or a.warm < 0:
        ap.error("--reps wants at least 1 and --warm at least 0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_gloo_available():
            raise ImportError("torch.distributed without gloo")
    except ImportError as e:
        print(f"gloo.py: no gloo here ({e}); Debian: apt-get install python3-torch",
              file=sys.stderr)
        return 3
    torch.set_num_threads(1)
    failed = 0
    for n in a.workers:
        for c in a.channels:
            lat = run_case(n, c, a.warm, a.reps)
            if lat is None:
                failed = 1
                continue
            print(json.dumps({"bench": "gloo", "workers": n, "channels": c,
                              "payload_bytes": 16 * c, "reps": len(lat),
                              "p50_us": round(pct(lat, 0.5), 2), "p99_us": round(pct(lat, 0.99), 2),
                              "mean_us": round(sum(lat) / len(lat), 2),
                              "torch": torch.__version__}, separators=(",", ":")), flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
