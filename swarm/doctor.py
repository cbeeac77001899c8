"""``swarm doctor``: one screen that says what this machine can serve with, and the fix for each mismatch.

It reports Python, the torch build, the accelerators the OS shows (:mod:`swarm.accelerators`) against
what torch can use (:mod:`swarm.devices`, the same code ``swarm serve --device`` runs), free memory per
device, a small matmul on each usable device (speed, and error against float64 on the CPU), whether
``p2pd`` starts, whether the given initial peers answer, and the Slurm job it runs in. ``--json``
prints the same as one document. Exit code 0 when nothing is wrong, 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

from swarm.command_config import DoctorConfig

MATMUL_SIZE = 1024
# relative error (max |diff| / max |reference|) a healthy device stays under, per dtype; bf16 keeps
# 8 bits of mantissa, fp16 11, so their products drift by about 2^-8 and 2^-11 of the largest value
MATMUL_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def matmul_check(device: str, dtype_name: str, size: int = MATMUL_SIZE, budget_s: float = 0.5) -> dict[str, Any]:
    """A ``size x size`` matmul on ``device`` in ``dtype``: GFLOP/s, and its error against float64 on the CPU."""
    import torch

    from swarm.devices import synchronize

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    result: dict[str, Any] = {"device": device, "dtype": dtype_name, "size": size}
    try:
        x, y = a.to(device, dtype), b.to(device, dtype)
        out = x @ y
        synchronize(torch.device(device))
        runs, started = 0, time.perf_counter()
        while runs < 1000 and (runs < 3 or time.perf_counter() - started < budget_s):
            out = x @ y
            runs += 1
        synchronize(torch.device(device))
        seconds = (time.perf_counter() - started) / runs
        reference = a.double() @ b.double()
        error = float((out.double().cpu() - reference).abs().max() / reference.abs().max())
    except Exception as e:  # a device that fails here is exactly what doctor is for
        return {**result, "ok": False, "error": f"{type(e).__name__}: {e}"}
    ok = error <= MATMUL_TOLERANCE[dtype_name]
    return {**result, "ok": ok, "gflops": round(2 * size**3 / seconds / 1e9, 1), "max_rel_error": error,
            "tolerance": MATMUL_TOLERANCE[dtype_name],
            **({} if ok else {"error": f"wrong results: relative error {error:.2g} over {MATMUL_TOLERANCE[dtype_name]}"})}


async def network_check(initial_peers: tuple[str, ...], timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Starts a ``p2pd`` on 127.0.0.1 (timed) and dials each initial peer through it."""
    import asyncio

    from hivemind.p2p import P2P

    from swarm.dht import clean_peer_sockets, dial, peer_sockets

    before = peer_sockets()
    started = time.monotonic()
    try:
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], startup_timeout=timeout)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}, []
    p2pd = {"ok": True, "seconds": round(time.monotonic() - started, 3),
            "maddrs": [str(m) for m in await p2p.get_visible_maddrs()]}
    peers = []
    try:
        for maddr in initial_peers:
            try:
                rtt = await dial(p2p, maddr, timeout)
                peers.append({"maddr": maddr, "ok": True, "seconds": round(rtt, 4)})
            except asyncio.TimeoutError:
                peers.append({"maddr": maddr, "ok": False, "error": f"no answer within {timeout:.0f}s"})
            except Exception as e:
                peers.append({"maddr": maddr, "ok": False, "error": " ".join(f"{type(e).__name__}: {e}".split())})
    finally:
        await p2p.shutdown()
        clean_peer_sockets(keep=before)
    return p2pd, peers


def examine(config: DoctorConfig) -> dict[str, Any]:
    """Runs every check; returns the report (the ``--json`` document)."""
    report: dict[str, Any] = {"python": {"version": platform.python_version(), "executable": sys.executable,
                                         "machine": platform.machine()}}
    problems: list[dict[str, str]] = []
    try:
        import torch  # noqa: F401
    except Exception as e:  # a broken vendor build: say so instead of a traceback
        report.update(torch={"error": f"{type(e).__name__}: {e}"}, ok=False, problems=[{
            "what": f"torch does not import: {e}",
            "fix": "reinstall torch for this machine (bash scripts/setup.sh, or your site's torch module)"}])
        return report
    from swarm import aio
    from swarm.accelerators import probe_os
    from swarm.devices import available_ram, bf16_supported, choose, inspect_torch, normalize
    from swarm.slurm import SlurmJob

    os_view = probe_os()
    want_npu = normalize(config.device).startswith("npu") or bool(os_view.by_vendor("ascend"))
    tv = inspect_torch(want_npu=want_npu)
    verdict = choose(config.device, os_view, tv)
    report["torch"] = {"version": tv.version, "build": tv.build, "cuda": tv.cuda, "hip": tv.hip,
                       "cuda_error": tv.cuda_error, "npu_error": tv.npu_error}
    report["os_accelerators"] = [dataclasses.asdict(a) for a in os_view.accelerators]
    report["tools"] = {name: path for name, path in os_view.tools.items()}
    report["tool_errors"] = dict(os_view.errors)
    report["driver_cuda"] = os_view.driver_cuda
    report["torch_devices"] = [dataclasses.asdict(d) for d in tv.devices]
    report["ram"] = {"available_bytes": available_ram(), "cpus": os.cpu_count()}
    job = SlurmJob.from_env()
    report["slurm"] = job.describe() if job is not None else None

    import torch

    checks = [matmul_check("cpu", "float32", budget_s=min(0.5, config.timeout))]
    for device in tv.devices:
        checks.append(matmul_check(device.label, "float32", budget_s=min(0.5, config.timeout)))
        half = "bfloat16" if bf16_supported(torch.device(device.label)) else "float16"
        checks.append(matmul_check(device.label, half, budget_s=min(0.5, config.timeout)))
    report["matmul"] = checks
    problems += [{"what": f"matmul on {c['device']} in {c['dtype']} failed: {c['error']}",
                  "fix": "this device computes wrong results or not at all: check its driver and torch build"}
                 for c in checks if not c["ok"]]

    p2pd, peers = aio.run(network_check(config.initial_peers, config.timeout))
    report["p2pd"], report["initial_peers"] = p2pd, peers
    if not p2pd["ok"]:
        problems.append({"what": f"p2pd (hivemind's libp2p daemon) does not start: {p2pd['error']}",
                         "fix": "reinstall hivemind (pip install --force-reinstall --no-deps hivemind); its wheel "
                                "ships p2pd for Linux x86-64/aarch64 and macOS arm64"})
    problems += [{"what": f"initial peer {p['maddr']} is not reachable: {p['error']}",
                  "fix": "check the address (as `swarm dht` or `swarm serve` printed it), that the peer runs, and "
                         "that this node may open outbound TCP connections to it"}
                 for p in peers if not p["ok"]]

    problems = [dataclasses.asdict(p) for p in verdict.problems] + problems
    report["verdict"] = {"device": verdict.device, "line": verdict.line, "requested": config.device}
    report["problems"] = problems
    report["ok"] = verdict.device is not None and not problems
    return report


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


def render(report: dict[str, Any]) -> str:
    """The report as one screen of text."""
    lines = ["swarm doctor: what this machine can serve with", ""]
    py = report["python"]
    lines.append(f"  Python     {py['version']} ({py['machine']}) {py['executable']}")
    t = report["torch"]
    if "build" not in t:
        lines.append(f"  torch      does not import: {t['error']}")
    else:
        lines.append(f"  torch      {t['version']}: {t['build']}")
        tools = ", ".join(f"{name}{'' if path else ' (not found)'}" for name, path in report["tools"].items())
        lines.append(f"  tools      {tools}")
        seen = report["os_accelerators"]
        lines.append(f"  OS shows   {len(seen)} accelerator(s)" + ("" if seen else " (no GPU, DCU or NPU)"))
        for a in seen:
            lines.append(f"               {a['vendor']} #{a['index']}: {a['name']}{' ' + a['arch'] if a['arch'] else ''}"
                         f", {_size(a['free_bytes'])} free of {_size(a['total_bytes'])} (via {a['source']})")
        usable = report["torch_devices"]
        lines.append(f"  torch uses {', '.join(d['type'] + ':' + str(d['index']) for d in usable) or 'the CPU only'}")
        for d in usable:
            lines.append(f"               {d['type']}:{d['index']}: {d['name']}, {_size(d['free_bytes'])} free of "
                         f"{_size(d['total_bytes'])}")
        lines.append(f"  RAM        {_size(report['ram']['available_bytes'])} available, {report['ram']['cpus']} CPUs")
        for c in report["matmul"]:
            if c["ok"]:
                lines.append(f"  matmul     {c['device']} {c['dtype']} {c['size']}x{c['size']}: {c['gflops']} GFLOP/s, "
                             f"relative error {c['max_rel_error']:.1e} (limit {c['tolerance']:g})")
            else:
                lines.append(f"  matmul     {c['device']} {c['dtype']}: FAILED: {c['error']}")
        p = report["p2pd"]
        lines.append(f"  p2pd       started in {p['seconds']:.2f}s" if p["ok"] else f"  p2pd       FAILED: {p['error']}")
        for peer in report["initial_peers"]:
            state = f"reachable in {peer['seconds'] * 1000:.0f} ms" if peer["ok"] else f"UNREACHABLE: {peer['error']}"
            lines.append(f"  peer       {peer['maddr']}: {state}")
        slurm = report.get("slurm")
        lines.append(f"  Slurm      {slurm}" if slurm else "  Slurm      not in a Slurm job")
        lines += ["", f"swarm serve --device {report['verdict']['requested']}: {report['verdict']['line']}"]
    if report["problems"]:
        lines += ["", f"{len(report['problems'])} problem(s):"]
        for i, problem in enumerate(report["problems"], 1):
            lines += [f"  {i}. {problem['what']}", f"     fix: {problem['fix']}"]
    else:
        lines += ["", "No problems found."]
    return "\n".join(lines)


def run_doctor(config: DoctorConfig) -> int:
    report = examine(config)
    print(json.dumps(report, indent=1, default=str) if config.json else render(report), flush=True)
    return 0 if report["ok"] else 1
