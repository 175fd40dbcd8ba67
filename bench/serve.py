"""The judge served over HTTP against the judge in-process, side by side in one run.

    python bench/serve.py [--model SPEC] [--backend hf|vllm] [--pairs 64] [--per-request 4]
                          [--clients 1,8,32] [--max-batch 32]

``cai serve`` runs as a subprocess on 127.0.0.1 (the model loaded there once); this process
loads the same model and labels the same pairs in-process with ``judge.label``, in batches of
``--max-batch`` (what one process holding all the pairs would do: the engine's best). Then, for
each client count N, N client threads split the pairs into requests of ``--per-request`` pairs
(a GRPO group's worth) and POST them to ``/v1/judge`` until all are labelled; the server
coalesces concurrent requests into engine batches of up to ``--max-batch`` pairs. A one-request
warm-up runs on each side before timing. The pairs are ``bench/judge.py``'s clear-cut set,
cycled. Prints a table, then one JSON line; ``served_over_inprocess`` is served pairs/s over
in-process pairs/s at each N (the aim: at least 0.8 at 8+ clients, coalescing making up for
HTTP's cost).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import quantiles

import httpx
from judge import PAIRS

from cai.engine import create_engine
from cai.judge import Judge

TIMEOUT = 600.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "cai.cli", "serve", "--port", str(port)]
    # The in-process side is Judge(engine), the pairwise judge: serve that one, not the default.
    command += ["--mode", "pairwise"]
    command += ["--backend", args.backend, "--max-batch", str(args.max_batch)]
    command += ["--max-wait-ms", str(args.max_wait_ms)]
    if args.model:
        command += ["--model", args.model]
    if args.dtype:
        command += ["--dtype", args.dtype]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            sys.exit(f"cai serve did not start; its log:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 (the largest value below 100 samples)."""
    if len(latencies) < 2:
        return latencies[0], latencies[0]
    cuts = quantiles(latencies, n=100, method="inclusive")
    return cuts[49], cuts[98]


def in_process(args: argparse.Namespace, pairs: list) -> dict:
    options = {"dtype": args.dtype} if args.dtype else {}
    with create_engine(args.backend, model=args.model, **options) as engine:
        judge = Judge(engine)
        judge.label(pairs[:1])
        latencies, errors = [], 0
        start = time.perf_counter()
        for k in range(0, len(pairs), args.max_batch):
            t = time.perf_counter()
            errors += sum(p.error is not None for p in judge.label(pairs[k : k + args.max_batch]))
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
    p50, p99 = percentiles(latencies)
    return {"pairs_per_s": len(pairs) / wall, "p50_s": p50, "p99_s": p99, "errors": errors}


def served(url: str, pairs: list, clients: int, per_request: int) -> dict:
    requests = [pairs[k : k + per_request] for k in range(0, len(pairs), per_request)]
    bodies = [
        {"pairs": [{"prompt": p, "response_a": a, "response_b": b} for p, a, b in request]}
        for request in requests
    ]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()

    def client(k: int) -> None:
        nonlocal errors
        with httpx.Client(timeout=TIMEOUT) as http:
            for body in bodies[k::clients]:
                t = time.perf_counter()
                try:
                    response = http.post(f"{url}/v1/judge", json=body)
                    ok = response.status_code == 200 and all(
                        p["error"] is None for p in response.json()["preferences"]
                    )
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - t)
                    errors += not ok

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    p50, p99 = percentiles(latencies)
    return {"pairs_per_s": len(pairs) / wall, "p50_s": p50, "p99_s": p99, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--model", default=None, help="model spec (default: smollm2-135m)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--pairs", type=int, default=64, help="pairs labelled per measurement")
    parser.add_argument("--per-request", type=int, default=4, help="pairs per HTTP request")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--max-batch", type=int, default=32, help="pairs per engine call")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    pairs = list(itertools.islice(itertools.cycle(PAIRS), args.pairs))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"cai-serve-bench-{port}.log"
    server = start_server(args, port, log)
    try:
        local = in_process(args, pairs)
        warm = {"pairs": [dict(zip(("prompt", "response_a", "response_b"), pairs[0], strict=True))]}
        httpx.post(f"{url}/v1/judge", json=warm, timeout=TIMEOUT).raise_for_status()
        remote = {n: served(url, pairs, n, args.per_request) for n in counts}
        calls = [
            line
            for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines()
            if line.startswith(("cai_engine_calls_total", "cai_batch_size{"))
        ]
    finally:
        server.terminate()
        server.wait(60)

    print(
        f"\n{len(pairs)} pairs, {args.per_request} per request, max batch {args.max_batch}, "
        f"{args.backend}, model {args.model or 'smollm2-135m'}\n"
    )
    print(f"{'':<16}{'pairs/s':>9}{'p50 s':>9}{'p99 s':>9}{'errors':>8}{'vs in-process':>15}")
    print(
        f"{'in-process':<16}{local['pairs_per_s']:>9.2f}{local['p50_s']:>9.2f}"
        f"{local['p99_s']:>9.2f}{local['errors']:>8}{'1.00':>15}"
    )
    for n, r in remote.items():
        r["served_over_inprocess"] = r["pairs_per_s"] / local["pairs_per_s"]
        print(
            f"{f'served, {n} clients':<16}{r['pairs_per_s']:>9.2f}{r['p50_s']:>9.2f}"
            f"{r['p99_s']:>9.2f}{r['errors']:>8}{r['served_over_inprocess']:>15.2f}"
        )
    print("\n" + "\n".join(calls))

    def rounded(r: dict) -> dict:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}

    line = {
        "bench": "serve",
        "pairs": len(pairs),
        "per_request": args.per_request,
        "max_batch": args.max_batch,
        "backend": args.backend,
        "model": args.model or "smollm2-135m",
        "inprocess": rounded(local),
        "served": {str(n): rounded(r) for n, r in remote.items()},
        "served_over_inprocess": {
            str(n): round(r["served_over_inprocess"], 3) for n, r in remote.items()
        },
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
