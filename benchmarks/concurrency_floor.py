"""The local floor of bench_concurrency.py: what N sessions' steps cost the hardware, in this process.

The same blocks as the servers hold (loaded from the same checkpoint, same dtype, same torch thread
count), stepped with N rows at once against one row, with KV caches of the lengths the swarm's
sessions hold (``--prefill`` tokens, ``--warmup`` steps, then ``--steps`` timed one-token steps):

- ``floor``: the span's own transformers decoder layers over transformers' ``DynamicCache``, N rows
  in one batch (``Span.forward``, what a local model runs; contiguous caches, no paging). Its
  latency ratio (N rows against one) is what batching on this machine can reach at best.
- ``paged``: the server's batched step in process (``server.batching.run_rows`` over the paged KV
  cache, N sessions of one row each): the floor plus the server's gathers and bookkeeping, minus
  the network, the client and the server's event loop.

Every level steps in turn within one loop (a burst of load hits all of them), and each level's
median step is reported.
"""

from __future__ import annotations

import statistics
import time

import torch


def _span(model_dir: str, blocks: int, dtype: torch.dtype, device: torch.device):
    from server.loading import load_span
    from swarm.models import load_config
    from swarm.weights import Checkpoint

    return load_span(Checkpoint(model_dir), load_config(model_dir), 0, blocks, dtype, device)


@torch.inference_mode()
def measure_floor(model_dir: str, blocks: int, sessions: list[int], hidden: torch.Tensor, prefill: int,
                  warmup: int, steps: int, threads: int, dtype: torch.dtype, device: torch.device,
                  lora_fields=None) -> dict:
    """Median step ms of ``n`` rows for every ``n`` in ``sessions``, as ``floor`` and ``paged`` (above), and
    their ratios against the first level. ``lora_fields(start, end)``: every paged session also runs its own
    LoRA adapter (the floor has none: it is the base model's)."""
    from server.batching import Part, run_rows
    from server.kv_cache import PagedKV, PagePool, SessionCache
    from swarm.lora import AppliedLora

    was = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        span = _span(model_dir, blocks, dtype, device)
        x = hidden.to(device, dtype)
        pool = PagePool(max(sessions) * -(-(prefill + warmup + steps + 1) // 16) * 16 * 2 + 64, blocks,
                        1)  # bytes only matter for charged memory; none is charged here
        kv = PagedKV(pool, 0, blocks, device)

        def adapter(seed: int) -> AppliedLora | None:
            if lora_fields is None:
                return None
            torch.manual_seed(seed)
            fields = lora_fields(0, blocks)
            modules = [(span.blocks[int(name.split(".")[0])].get_submodule(name.split(".", 1)[1]),
                        a.to(device, dtype), b.to(device, dtype))
                       for name, a, b in zip(fields["lora_modules"], fields["lora_a"], fields["lora_b"])]
            return AppliedLora(modules, fields["lora_scaling"])

        levels = {}
        for n in sessions:
            caches = [SessionCache(pool, 1) for _ in range(n)]
            loras = [adapter(i) for i in range(n)]
            dynamic = span.new_cache()
            span(x.expand(n, prefill, -1).contiguous(), dynamic, 0)
            for cache, lora in zip(caches, loras):
                run_rows(span, kv, [Part(cache, x.expand(1, prefill, -1).contiguous(), 0, lora=lora)], 0, blocks,
                         dtype)
            levels[n] = {"dynamic": dynamic, "caches": caches, "loras": loras, "position": prefill,
                         "floor": [], "paged": []}

        for step in range(warmup + steps):
            for n, level in levels.items():
                position, rows = level["position"], x.expand(n, 1, -1).contiguous()
                t0 = time.perf_counter()
                span(rows, level["dynamic"], position)
                t1 = time.perf_counter()
                run_rows(span, kv, [Part(cache, x, position, lora=lora)
                                    for cache, lora in zip(level["caches"], level["loras"])], 0, blocks, dtype)
                t2 = time.perf_counter()
                level["position"] += 1
                if step >= warmup:
                    level["floor"].append(t1 - t0)
                    level["paged"].append(t2 - t1)
        for level in levels.values():
            for cache in level["caches"]:
                cache.close()
    finally:
        torch.set_num_threads(was)
    result: dict = {}
    one = sessions[0]
    for name in ("floor", "paged"):
        ms = {n: statistics.median(level[name]) * 1e3 for n, level in levels.items()}
        result[f"{name}_step_ms"] = {n: round(v, 2) for n, v in ms.items()}
        result[f"{name}_latency_vs_{one}"] = {n: round(v / ms[one], 2) for n, v in ms.items()}
    return result
