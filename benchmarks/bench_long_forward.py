"""How long inference steps stall behind a long forward pass, chunked vs not. Prints JSON.

    python benchmarks/bench_long_forward.py                       # 32,768 tokens through 2 tiny blocks
    python benchmarks/bench_long_forward.py --tokens 65536 --blocks 1

Starts a DHT peer and two servers holding the same blocks of the tiny random-weight Llama, one
with the default ``--forward-chunk-tokens`` and one that never chunks (``--forward-chunk-tokens``
larger than the request). On each: a session decodes one token at a time while another peer sends
one forward of ``--tokens`` tokens; reported are the forward's duration, the decode steps done
meanwhile, the longest step (the stall) and the ratio of the stalls, all measured in this run. A
last case abandons the chunked forward after 0.5 s and times a small forward sent right after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


async def _case(peer, server_id: str, other, tokens: int, blocks: int) -> dict:
    from swarm.transport import Stream
    from swarm.wire import ForwardRequest, ForwardResponse, InferenceStep, OpenSession, SessionOpened, StepOutput, \
        expect

    session = await Stream.open(peer.p2p, server_id, "inference", 30)
    session_id = uuid.uuid4().hex
    await session.send(OpenSession(session_id=session_id, start=0, end=blocks, max_length=4096))
    expect(await session.receive(30), SessionOpened)
    for position in range(8):  # warm-up: the session's first steps take new shapes
        await session.send(InferenceStep(session_id=session_id, hidden=torch.randn(1, 1, 64), start_position=position))
        expect(await session.receive(30), StepOutput)
    forward = await Stream.open(other.p2p, server_id, "forward", 30)
    began = time.perf_counter()
    await forward.send(ForwardRequest(hidden=torch.randn(1, tokens, 64), start=0, end=blocks))
    reply = asyncio.ensure_future(forward.receive(3600))
    waits, position = [], 8
    while not reply.done() and position < 4000 - 8:
        start = time.perf_counter()
        await session.send(InferenceStep(session_id=session_id, hidden=torch.randn(1, 1, 64), start_position=position))
        expect(await session.receive(3600), StepOutput)
        waits.append(time.perf_counter() - start)
        position += 1
    expect(await reply, ForwardResponse)
    total = time.perf_counter() - began
    session.close()
    forward.close()
    return {"forward_s": round(total, 3), "steps_meanwhile": len(waits), "max_step_s": round(max(waits), 4),
            "median_step_s": round(sorted(waits)[len(waits) // 2], 4)}


async def _abandoned(peer, server_id: str, other, tokens: int, blocks: int) -> float:
    from swarm.transport import Stream
    from swarm.wire import ForwardRequest, ForwardResponse, expect

    forward = await Stream.open(other.p2p, server_id, "forward", 30)
    await forward.send(ForwardRequest(hidden=torch.randn(1, tokens, 64), start=0, end=blocks))
    await asyncio.sleep(0.5)
    forward.close()
    short = await Stream.open(peer.p2p, server_id, "forward", 30)
    start = time.perf_counter()
    await short.send(ForwardRequest(hidden=torch.randn(1, 4, 64), start=0, end=blocks))
    expect(await short.receive(3600), ForwardResponse)
    short.close()
    return round(time.perf_counter() - start, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--blocks", type=int, default=2)
    args = parser.parse_args()

    from swarm.dht import NetworkConfig, Peer, fetch_servers
    from swarm.local_swarm import LocalSwarm
    from swarm.tiny import make_tiny_model

    workdir = tempfile.mkdtemp(prefix="bench-long-forward-")
    model = make_tiny_model(os.path.join(workdir, "tiny-llama"), "llama")
    span = f"0:{args.blocks}"
    common = ("--num-threads", "1", "--max-forward-tokens", str(max(65536, args.tokens)))
    with LocalSwarm(log_dir=os.path.join(workdir, "logs")) as swarm:
        swarm.start_dht()
        swarm.start_server(model, span, *common, "--dht-prefix", "chunked")
        swarm.start_server(model, span, *common, "--dht-prefix", "whole", "--forward-chunk-tokens", str(args.tokens))

        async def run() -> dict:
            start = dict(initial_peers=tuple(swarm.initial_peers), host_maddrs=("/ip4/127.0.0.1/tcp/0",),
                         client_mode=True)
            peer, other = await Peer.start(NetworkConfig(**start)), await Peer.start(NetworkConfig(**start))
            try:
                ids = {prefix: next(iter((await fetch_servers(peer, prefix, [0]))[0]))
                       for prefix in ("chunked", "whole")}
                result = {"tokens": args.tokens, "blocks": args.blocks}
                for prefix in ("whole", "chunked"):
                    result[prefix] = await _case(peer, ids[prefix], other, args.tokens, args.blocks)
                result["stall_ratio_whole_over_chunked"] = round(
                    result["whole"]["max_step_s"] / result["chunked"]["max_step_s"], 1)
                result["chunked_forward_time_ratio"] = round(
                    result["chunked"]["forward_s"] / result["whole"]["forward_s"], 2)
                result["small_forward_after_abandoned_s"] = await _abandoned(peer, ids["chunked"], other,
                                                                             args.tokens, args.blocks)
                return result
            finally:
                await peer.shutdown()
                await other.shutdown()

        print(json.dumps(asyncio.run(asyncio.wait_for(run(), 3600)), indent=1))


if __name__ == "__main__":
    main()
