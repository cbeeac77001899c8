"""Time to first token and tokens/s through ``swarm api`` vs the Python client, on one swarm. Prints JSON.

    python benchmarks/bench_api.py              # tiny random Qwen2 (hidden 64, 4 blocks), servers 0:2 and 2:4

Both sides generate the same greedy tokens from the same prompt (tests/test_api.py proves they
are identical): the API through OpenAI's client (``/v1/completions``, token-id prompt, streamed),
the Python client through ``model.generate`` with a streamer, each in its own threads. For 1 and 16
concurrent streams, rounds alternate API and client (this machine is noisy) and the medians are
reported: time to first token (from the request to the first streamed token), each stream's
tokens/s after its first token, and the aggregate tokens/s of all streams over the round's wall
time. ``api_vs_client`` divides the API's figure by the client's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import tempfile
import time

import torch

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "A swarm of small machines serves a model together."]


def api_stream(client, model: str, prompt: list[int], max_tokens: int) -> dict:
    started = time.perf_counter()
    first = last = None
    tokens = 0
    for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        now = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        elif chunk.choices:
            first = first if first is not None else now
            last = now
    return {"ttft": first - started, "tokens": tokens, "decode_s": last - first}


def client_stream(model, prompt: torch.Tensor, max_tokens: int) -> dict:
    times: list[float] = []

    class Clock:
        def put(self, value: torch.Tensor) -> None:
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    started = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=max_tokens, do_sample=False, streamer=Clock())
    new = times[1:]  # the first put is the prompt
    return {"ttft": new[0] - started, "tokens": out.shape[1] - prompt.shape[1], "decode_s": new[-1] - new[0]}


def round_of(run, streams: int) -> dict:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: run(), range(streams)))
    wall = time.perf_counter() - started
    return {"ttft_ms": statistics.median(r["ttft"] for r in results) * 1000,
            "stream_tokens_per_s": statistics.median((r["tokens"] - 1) / r["decode_s"] for r in results
                                                     if r["decode_s"] > 0),
            "aggregate_tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "tokens_per_stream": statistics.median(r["tokens"] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "swarm-bench-api"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating API/client rounds per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--server-threads", type=int, default=1)
    args = parser.parse_args()

    import openai
    from transformers import AutoTokenizer

    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm, api_url
    from swarm.tiny import make_tiny_chat_model

    model_dir = make_tiny_chat_model(os.path.join(args.workdir, "tiny-chat"), "qwen2", texts=TEXTS, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer("A swarm of small machines").input_ids
    result: dict = {"model": "tiny random qwen2 (hidden 64, 4 blocks)", "spans": ["0:2", "2:4"],
                    "max_tokens": args.max_tokens, "prompt_tokens": len(prompt), "rounds": args.rounds}
    with LocalSwarm(log_dir=os.path.join(args.workdir, "logs")) as swarm:
        swarm.start_dht()
        servers = [swarm.start_server(model_dir, span, "--num-threads", str(args.server_threads), "--throughput",
                                      "100", wait=False) for span in ("0:2", "2:4")]
        api_proc = swarm.start_api("--max-concurrent", str(max(args.concurrency)))
        for proc in servers:
            proc.wait_for("Server ONLINE", 180)
        client = openai.OpenAI(base_url=api_url(api_proc) + "v1", api_key="none", max_retries=0, timeout=600)
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        ids = torch.tensor([prompt])
        try:
            run_api = lambda: api_stream(client, model_dir, prompt, args.max_tokens)  # noqa: E731
            run_client = lambda: client_stream(model, ids, args.max_tokens)  # noqa: E731
            run_api(), run_client()  # warm-up: the API loads the model, both open their first chains
            for streams in args.concurrency:
                rounds: dict[str, list[dict]] = {"api": [], "client": []}
                for _ in range(args.rounds):
                    rounds["api"].append(round_of(run_api, streams))
                    rounds["client"].append(round_of(run_client, streams))
                summary = {side: {key: round(statistics.median(r[key] for r in runs), 2) for key in runs[0]}
                           for side, runs in rounds.items()}
                summary["api_vs_client"] = {key: round(summary["api"][key] / summary["client"][key], 3)
                                            for key in ("ttft_ms", "stream_tokens_per_s", "aggregate_tokens_per_s")}
                summary["runs"] = rounds
                result[f"{streams}_streams"] = summary
        finally:
            model.shutdown()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
