"""Concurrent sessions on one server, batching on vs off. Prints JSON.

    python benchmarks/bench_concurrency.py                        # tiny and wide Llama on this CPU
    python benchmarks/bench_concurrency.py --shape 7b --device cuda --dtype bfloat16 --sessions 1 8 32

Starts a DHT peer and two servers holding every block of a random-weight Llama (one with
``--no-batching``), and drives N sessions from this one process straight through
``InferenceSession.astep`` with hidden states (no embeddings, no sampling: the client does little
but send and receive). Each session prefills ``--prefill`` tokens, warms up, then runs ``--steps``
one-token steps as fast as its answers come. Per concurrency level, ``--repeats`` runs on each
server, alternating (so a burst of load hits both), and the median run (by tokens/s) is reported:
aggregate tokens/s over the measured steps, each session's step latency (median and p90 over all
steps), and the ratios against one session. The servers lift their per-peer quotas (sessions and
cache share), since this one process stands for many users.

Also, on the batching server: how many sessions holding ``--fit-length`` real tokens fit its
``--cache-tokens`` with ``max_length`` ``--fit-max-length`` (the old rule reserved ``max_length``
at open: ``cache_tokens // max_length`` fit), and how long decode steps stall while another session
prefills ``--stall-prefill`` tokens (chunks of ``--max-batch-tokens``).

Beside the swarm's ratios, the local floor (``concurrency_floor``): the same blocks in this process,
same dtype and ``--server-threads``, stepping N rows at once against one row with caches of the
sessions' lengths, over transformers' ``DynamicCache`` (``local_floor_latency``: what batching on
this hardware can reach at best) and through the server's paged batched step
(``local_paged_latency``); the gap from the floor to the swarm's ratio is the network, the client
and the servers' per-step work.

The client sends concurrent steps to a server in one frame (``client.step_frames``; each result
says how many timed steps a frame carried on average), unless ``--no-step-frames``: then every step is a
message of its own on its session's stream.

``--lora-rank R`` also runs every session with its own LoRA adapter (rank R on every block's q_proj
and v_proj, sent when the session opens): rows of different adapters share the base layers' matmuls
and each adapter adds its own product (batching on), or run one session at a time (off).

Shapes: ``tiny`` (hidden 64, 4 blocks), ``wide`` (hidden 1024, 4 blocks), ``7b`` (Llama-2-7B's
block shape, ``--blocks`` of them; meant for a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
    "wide": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
}


def make_model(workdir: str, shape: str, blocks: int) -> str:
    from swarm.tiny import make_tiny_model

    return make_tiny_model(os.path.join(workdir, f"llama-{shape}-{blocks}"), num_hidden_layers=blocks,
                           vocab_size=1024, **SHAPES[shape])


async def _open(sequence, max_length: int):
    from client.inference_session import InferenceSession

    return InferenceSession(sequence, max_length)


async def _drive(sessions, hidden: torch.Tensor, prefill: int, warmup: int, steps: int,
                 started=lambda: None) -> tuple[float, list[float]]:
    """Every session: prefill, ``warmup`` steps, then ``steps`` timed steps, all concurrently (``started()`` is
    called as the timed part begins). Returns the wall time of the timed part (first timed step sent to last
    answer) and every step's latency."""
    latencies: list[float] = []
    ready = asyncio.Barrier(len(sessions))
    marks: list[float] = []

    async def one(session) -> None:
        await session.astep(hidden.expand(1, prefill, -1).contiguous())
        for _ in range(warmup):
            await session.astep(hidden)
        if await ready.wait() == 0:
            started()
        marks.append(time.perf_counter())
        for _ in range(steps):
            t0 = time.perf_counter()
            await session.astep(hidden)
            latencies.append(time.perf_counter() - t0)
        marks.append(time.perf_counter())

    await asyncio.gather(*(one(s) for s in sessions))
    return max(marks) - min(marks), latencies


def _frames_sent(sequence) -> tuple[int, int]:
    """Frames and steps this client sent in frames so far (client.step_frames)."""
    frames = list(sequence._frames.values())
    return sum(f.frames_sent for f in frames), sum(f.steps_sent for f in frames)


async def measure(sequence, n: int, hidden: torch.Tensor, args) -> dict:
    sessions = [await _open(sequence, args.prefill + args.warmup + args.steps + 1) for _ in range(n)]
    before: list[tuple[int, int]] = []
    try:
        wall, latencies = await _drive(sessions, hidden, args.prefill, args.warmup, args.steps,
                                       started=lambda: before.append(_frames_sent(sequence)))
    finally:
        for s in sessions:
            await s.aclose()
    frames, steps = (after - was for after, was in zip(_frames_sent(sequence), before[0]))  # of the timed steps
    latencies.sort()
    return {"tokens_per_s": round(n * args.steps / wall, 1),
            "step_ms_median": round(statistics.median(latencies) * 1e3, 2),
            "step_ms_p90": round(latencies[max(0, -(-9 * len(latencies) // 10) - 1)] * 1e3, 2),
            "steps_per_frame": round(steps / frames, 2) if frames else None}


def measure_both(sequences: dict, n: int, hidden: torch.Tensor, args, label: str) -> dict:
    """``--repeats`` runs of ``n`` sessions on each server, alternating; the median run of each (by tokens/s)."""
    from client.loop import run_sync

    runs: dict = {"off": [], "on": []}
    for _ in range(args.repeats):
        for name in ("off", "on"):
            runs[name].append(run_sync(measure(sequences[name], n, hidden, args)))
            print(f"{label} batching {name} sessions {n}: {runs[name][-1]}", file=sys.stderr, flush=True)
    return {name: {**sorted(r, key=lambda x: x["tokens_per_s"])[len(r) // 2],
                   "runs_tokens_per_s": [x["tokens_per_s"] for x in r]} for name, r in runs.items()}


async def sessions_that_fit(sequence, hidden: torch.Tensor, length: int, max_length: int, limit: int) -> int:
    """Opens sessions of ``max_length`` holding ``length`` tokens each until the server refuses one."""
    from swarm.errors import SwarmError

    opened = []
    try:
        while len(opened) < limit:
            session = await _open(sequence, max_length)
            try:
                await session.astep(hidden.expand(1, length, -1).contiguous())
            except SwarmError:  # the server's ServerBusy (no retry: the first failure ends the step)
                await session.aclose()
                break
            opened.append(session)
    finally:
        for session in opened:
            await session.aclose()
    return len(opened)


async def prefill_stall(sequence, hidden: torch.Tensor, args) -> dict:
    """Decode step latency of 4 sessions before and while a fifth prefills ``--stall-prefill`` tokens."""
    decoders = [await _open(sequence, 4096) for _ in range(4)]
    long = await _open(sequence, args.stall_prefill + 1)
    try:
        for s in decoders:
            await s.astep(hidden.expand(1, 8, -1).contiguous())
        quiet: list[float] = []
        busy: list[float] = []
        done = asyncio.Event()

        async def decode(into: list[float], until: asyncio.Event | None, count: int) -> None:
            async def loop(s) -> None:
                for _ in range(count):
                    if until is not None and until.is_set():
                        return
                    t0 = time.perf_counter()
                    await s.astep(hidden)
                    into.append(time.perf_counter() - t0)
            await asyncio.gather(*(loop(s) for s in decoders))

        await decode(quiet, None, 20)
        t0 = time.perf_counter()

        async def prefill() -> None:
            await asyncio.sleep(0.01)
            await long.astep(hidden.expand(1, args.stall_prefill, -1).contiguous())
            done.set()

        await asyncio.gather(prefill(), decode(busy, done, 100000))
        prefill_s = time.perf_counter() - t0
    finally:
        for s in (*decoders, long):
            await s.aclose()
    return {"prefill_tokens": args.stall_prefill, "max_batch_tokens": args.max_batch_tokens,
            "prefill_s": round(prefill_s, 3), "decode_step_ms_median_quiet": round(statistics.median(quiet) * 1e3, 2),
            "decode_step_ms_max_during_prefill": round(max(busy) * 1e3, 2) if busy else None,
            "decode_steps_during_prefill": len(busy)}


def with_lora(sequence, shape: str, blocks: int, rank: int) -> None:
    """Every session of ``sequence`` opens with a LoRA adapter of its own (random weights)."""
    config = SHAPES[shape]
    hidden, kv = config["hidden_size"], config["hidden_size"] // config["num_attention_heads"] * config[
        "num_key_value_heads"]

    def fields(start: int, end: int) -> dict:
        names, a, b = [], [], []
        for block in range(start, end):
            for module, out in (("self_attn.q_proj", hidden), ("self_attn.v_proj", kv)):
                names.append(f"{block}.{module}")
                a.append(torch.randn(rank, hidden) * 0.01)
                b.append(torch.randn(out, rank) * 0.01)
        return dict(lora_modules=tuple(names), lora_a=tuple(a), lora_b=tuple(b), lora_scaling=2.0)

    sequence.session_fields = fields


def local_floor(model_dir: str, hidden: torch.Tensor, args, lora_fields=None) -> dict:
    """The same steps in this process (``concurrency_floor``), on the servers' thread count and dtype."""
    from concurrency_floor import measure_floor

    local = measure_floor(model_dir, args.blocks, args.sessions, hidden, args.prefill, args.warmup, args.steps,
                          args.server_threads, getattr(torch, args.dtype), torch.device(args.device), lora_fields)
    print(f"local: {local}", file=sys.stderr, flush=True)
    return local


def vs_one(runs: dict, local: dict, args) -> dict:
    """Per server and level: aggregate tokens/s and step latency against one session, beside the local
    floor's and the in-process paged step's latency ratios on the batching server's rows (N rows against one,
    same thread count and dtype)."""
    one = args.sessions[0]
    ratios: dict = {}
    for name in runs:
        ratios[name] = {n: {"aggregate_tokens_per_s": round(r["tokens_per_s"] / runs[name][one]["tokens_per_s"], 2),
                            "step_latency": round(r["step_ms_median"] / runs[name][one]["step_ms_median"], 2)}
                        for n, r in runs[name].items()}
    for n, r in ratios["on"].items():  # what batching could reach here (the off server runs one row at a time)
        r["local_floor_latency"] = local[f"floor_latency_vs_{one}"][n]
        r["local_paged_latency"] = local[f"paged_latency_vs_{one}"][n]
    return ratios


def run_shape(shape: str, args, workdir: str) -> dict:
    from client.loop import run_sync
    from client.remote_sequence import RemoteSequence
    from swarm.config import ClientConfig
    from swarm.local_swarm import LocalSwarm

    model_dir = make_model(workdir, shape, args.blocks)
    dtype = getattr(torch, args.dtype)
    hidden_size = SHAPES[shape]["hidden_size"]
    hidden = torch.randn(1, 1, hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    common = ["--num-threads", str(args.server_threads), "--device", args.device, "--dtype", args.dtype,
              "--cache-tokens", str(args.cache_tokens), "--max-batch-tokens", str(args.max_batch_tokens),
              "--max-session-length", str(max(4096, args.fit_max_length, args.stall_prefill + 1)),
              # one client process stands for many users here: lift the per-peer quotas
              "--peer-cache-share", "1.0", "--max-sessions-per-peer", str(max(args.sessions) + args.cache_tokens // 16 + 8)]
    result: dict = {"shape": {"blocks": args.blocks, **SHAPES[shape]}, "dtype": args.dtype, "device": args.device}
    with LocalSwarm() as swarm:
        swarm.start_dht()
        for name, flag in (("on", "--batching"), ("off", "--no-batching")):
            swarm.start_server(model_dir, f"0:{args.blocks}", "--dht-prefix", f"bench-{name}", flag, *common,
                               timeout=1800)
        config = {name: ClientConfig(initial_peers=tuple(swarm.initial_peers), dht_prefix=f"bench-{name}",
                                     request_timeout=600, retry_deadline=1e-3, verify_rate=0.0,
                                     step_frames=args.step_frames)
                  for name in ("on", "off")}
        sequences = {name: RemoteSequence(config[name], f"bench-{name}", args.blocks, model_dir) for name in config}
        try:
            for name in ("on", "off"):  # warm-up: connections, the servers' first steps
                run_sync(measure(sequences[name], 2, hidden, argparse.Namespace(**{**vars(args), "steps": 3})))
            runs: dict = {"on": {}, "off": {}}
            for n in args.sessions:
                both = measure_both(sequences, n, hidden, args, shape)
                for name in runs:
                    runs[name][n] = both[name]
            result["batching_on"], result["batching_off"] = runs["on"], runs["off"]
            local = result["local"] = local_floor(model_dir, hidden, args)
            result["vs_one_session"] = vs_one(runs, local, args)
            if args.lora_rank:
                lora: dict = {"on": {}, "off": {}}
                for name in ("on", "off"):
                    with_lora(sequences[name], shape, args.blocks, args.lora_rank)
                for n in args.sessions:
                    both = measure_both(sequences, n, hidden, args, f"{shape} lora")
                    for name in lora:
                        lora[name][n] = both[name]
                local = local_floor(model_dir, hidden, args, sequences["on"].session_fields)
                result["lora"] = {"rank": args.lora_rank, "batching_on": lora["on"], "batching_off": lora["off"],
                                  "local": local, "vs_one_session": vs_one(lora, local, args)}
                for name in ("on", "off"):
                    del sequences[name].session_fields  # back to the class's (no adapter)
            if args.fit_length:
                fit = run_sync(sessions_that_fit(sequences["on"], hidden, args.fit_length, args.fit_max_length,
                                                 limit=args.cache_tokens // 16 + 1))
                result["sessions_that_fit"] = {
                    "cache_tokens": args.cache_tokens, "max_length": args.fit_max_length,
                    "real_length": args.fit_length, "reserved_at_open_before": args.cache_tokens // args.fit_max_length,
                    "paged_now_measured": fit}
            if args.stall_prefill:
                result["prefill_stall"] = run_sync(prefill_stall(sequences["on"], hidden, args))
        finally:
            for sequence in sequences.values():
                run_sync(sequence.shutdown(), timeout=30)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs="+", default=["tiny", "wide"], choices=sorted(SHAPES))
    parser.add_argument("--blocks", type=int, default=4, help="blocks of the model (all on each server)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--steps", type=int, default=30, help="timed one-token steps per session")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per level and server, alternating; the median run is reported (bursts of load)")
    parser.add_argument("--prefill", type=int, default=16, help="tokens each session holds before its steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads per server (the client and p2pd daemons share the machine's cores)")
    parser.add_argument("--cache-tokens", type=int, default=16384)
    parser.add_argument("--max-batch-tokens", type=int, default=512)
    parser.add_argument("--fit-length", type=int, default=200, help="0 skips the sessions-that-fit count")
    parser.add_argument("--fit-max-length", type=int, default=2048)
    parser.add_argument("--step-frames", action=argparse.BooleanOptionalAction, default=True,
                        help="concurrent steps to a server in one frame (client.step_frames); off: one message each")
    parser.add_argument("--lora-rank", type=int, default=0, help="also run with a LoRA adapter per session")
    parser.add_argument("--stall-prefill", type=int, default=2048, help="0 skips the prefill stall measurement")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "swarm-bench-concurrency"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(1)  # the client only moves tensors
    report = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                          "load_average_1min_at_start": round(os.getloadavg()[0], 2)}, "args": vars(args)}
    for shape in args.shape:
        report[shape] = run_shape(shape, args, args.workdir)
    report["machine"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)  # other work on the machine
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
