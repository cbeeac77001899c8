"""A 7B-shaped Llama on one GPU: two Swarm servers against local transformers ``generate``. Prints JSON.

    python benchmarks/bench_gpu.py                          # Llama-2-7B shape, bfloat16, random weights, cuda
    python benchmarks/bench_gpu.py --shape tiny --device cpu   # the same steps on a tiny model: a check, not a benchmark

Steps: build a random-weight Llama of the shape (hidden 4096, 32 layers, 11008 MLP, 32 heads, vocab
32000: 6.7B parameters, 13.5 GB in bfloat16) on the device and save it (kept in ``--workdir`` for
the next run); measure local transformers on the device (greedy ``generate`` of ``--new-tokens``
tokens, median of ``--repeats`` after a warm-up, and the 1-token decode step), keep its logits and
tokens, free it; start a DHT peer and two servers on 127.0.0.1 holding half of the blocks each with
``--device auto`` (the log line says what it picked); the client keeps its embeddings and head on
the same device. Reports tokens/s of both and their ratio (target >= 0.8), step latencies, memory
per block (weights computed from the config; measured: the device's free memory before and after
the servers loaded, per block, which includes each server process's CUDA context), whether ``auto``
picked CUDA, and exactness against the local model (forward logits, greedy tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

import torch

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, pad_token_id=0),
}
# max |swarm - local| of the forward logits, relative to max |local|: bfloat16 keeps 8 bits of mantissa
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def shape_config(shape: str) -> dict:
    from swarm.tiny import TINY_LLAMA

    return dict(TINY_LLAMA) if shape == "tiny" else dict(SHAPES[shape])


def even_spans(num_blocks: int, servers: int) -> list[str]:
    bounds = [round(i * num_blocks / servers) for i in range(servers + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


def synchronize(device: torch.device) -> None:
    from swarm.devices import synchronize as sync

    sync(device)


def free_memory(device: torch.device) -> int | None:
    """Free bytes on ``device`` as its runtime says (device-wide: other processes' use counts); None on a CPU."""
    backend = getattr(torch, device.type, None)
    if device.type == "cpu" or not callable(getattr(backend, "mem_get_info", None)):
        return None
    return int(backend.mem_get_info(device)[0])


def build_model(shape: str, dtype: torch.dtype, device: torch.device, workdir: str):
    """The random-weight model on ``device`` and its saved copy's directory (reused when already saved)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(workdir, f"llama-{shape}-{str(dtype).removeprefix('torch.')}")
    config = AutoConfig.for_model("llama", **shape_config(shape))
    config.dtype = dtype
    if os.path.isfile(os.path.join(path, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    else:
        torch.manual_seed(0)
        with torch.device(device):  # initialise where it runs: 6.7B parameters are slow to draw on a CPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.save_pretrained(path, safe_serialization=True, max_shard_size="2GB")
    model.generation_config.eos_token_id = None
    return model.eval(), path


def time_generate(model, prompt: torch.Tensor, new_tokens: int, repeats: int, device: torch.device,
                  **kwargs) -> tuple[float, torch.Tensor]:
    """(median tokens/s over ``repeats`` greedy generations after a warm-up, the generated ids)."""
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **kwargs)
    out = model.generate(prompt, **kwargs)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times), out


@torch.inference_mode()
def bench_local(model, prompt: torch.Tensor, args, device: torch.device) -> dict:
    tokens_per_s, out = time_generate(model, prompt, args.new_tokens, args.repeats, device)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(prompt, cache=cache, use_cache=True)
    step = prompt[:, -1:]
    latencies = []
    for i in range(args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        model(step, cache=cache, use_cache=True,
              cache_position=torch.tensor([prompt.shape[1] + i], device=device))
        synchronize(device)
        latencies.append(time.perf_counter() - t0)
    logits = model(prompt).logits.float().cpu()
    return {"tokens_per_s": round(tokens_per_s, 2), "step_1token_median_ms": round(statistics.median(latencies) * 1e3, 3),
            "tokens": out.cpu(), "logits": logits}


def picked_device(log: str) -> str | None:
    """The device a server's ``--device auto`` verdict named (``Device cuda:0 (...)``), from its log."""
    match = re.search(r"^Device (\S+) \(", log, re.M)
    return match[1] if match else None


def bench_swarm(model_dir: str, prompt: torch.Tensor, args, device: torch.device, dtype: torch.dtype,
                config) -> dict:
    from server.loading import block_bytes
    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm
    from swarm.models import kv_bytes_per_token

    res: dict = {}
    spans = even_spans(config.num_hidden_layers, args.servers)
    free_before = free_memory(device)
    with LocalSwarm() as swarm:
        swarm.start_dht()
        t0 = time.monotonic()
        procs = [swarm.start_server(model_dir, span, "--dtype", str(dtype).removeprefix("torch."), wait=False)
                 for span in spans]
        for proc in procs:
            proc.wait_for("Server ONLINE", args.server_timeout)
        res["servers"] = spans
        res["server_start_to_online_s"] = round(time.monotonic() - t0, 1)
        res["device_auto_picked"] = [picked_device(proc.log()) for proc in procs]
        res["auto_picked_cuda"] = all((d or "").startswith("cuda") for d in res["device_auto_picked"])
        free_after = free_memory(device)
        weights = block_bytes(config, dtype)
        res["memory_per_block"] = {
            "weights_bytes": weights,
            "kv_cache_bytes_per_token": kv_bytes_per_token(config, dtype),
            "measured_device_bytes": (free_before - free_after) // config.num_hidden_layers
            if free_before is not None and free_after is not None else None,
        }
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                dtype=dtype, request_timeout=120)
        model.generation_config.eos_token_id = None
        model = model.to(device)
        try:
            with torch.inference_mode():
                tokens_per_s, out = time_generate(model, prompt, args.new_tokens, args.repeats, device)
                res["tokens_per_s"] = round(tokens_per_s, 2)
                res["tokens"] = out.cpu()
                res["logits"] = model(prompt).logits.float().cpu()
                with model.inference_session(max_length=prompt.shape[1] + args.steps + 1) as session:
                    hidden = model.get_input_embeddings()(prompt)
                    session.step(hidden)
                    latencies = []
                    for _ in range(args.steps):
                        synchronize(device)
                        t0 = time.perf_counter()
                        session.step(hidden[:, -1:])
                        synchronize(device)
                        latencies.append(time.perf_counter() - t0)
                res["step_1token_median_ms"] = round(statistics.median(latencies) * 1e3, 3)
        finally:
            model.shutdown()
    return res


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--device", default="cuda", help="where local transformers and the client run")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default: bfloat16 for 7b, float32 for tiny")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="1-token steps timed for the step latency")
    parser.add_argument("--server-timeout", type=float, default=900, help="seconds a server may take to load")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "swarm-bench-gpu"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.shape == "7b" else "float32"))
    os.makedirs(args.workdir, exist_ok=True)

    report: dict = {"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "dtype": str(dtype).removeprefix("torch."),
                    "device": str(device), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    t0 = time.monotonic()
    model, model_dir = build_model(args.shape, dtype, device, args.workdir)
    report["build_or_load_model_s"] = round(time.monotonic() - t0, 1)
    config = model.config
    report["parameters"] = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    local = bench_local(model, prompt, args, device)
    del model  # the servers get the device to themselves
    if device.type == "cuda":
        torch.cuda.empty_cache()
    swarm = bench_swarm(model_dir, prompt, args, device, dtype, config)

    diff = float((swarm["logits"] - local["logits"]).abs().max())
    scale = float(local["logits"].abs().max())
    report["local_hf"] = {k: v for k, v in local.items() if k not in ("tokens", "logits")}
    report["swarm"] = {k: v for k, v in swarm.items() if k not in ("tokens", "logits")}
    report["tokens_per_s_ratio_swarm_over_local"] = round(swarm["tokens_per_s"] / local["tokens_per_s"], 3)
    report["meets_0_8x_target"] = report["tokens_per_s_ratio_swarm_over_local"] >= 0.8
    report["exactness"] = {
        "forward_logits_max_abs_diff": diff, "relative_to_max_logit": diff / scale if scale else diff,
        "tolerance_relative": LOGITS_TOLERANCE[dtype],
        "within_tolerance": (diff / scale if scale else diff) <= LOGITS_TOLERANCE[dtype],
        # random weights give near-uniform logits, so in half precision a tie may break differently
        "greedy_tokens_equal": bool(torch.equal(swarm["tokens"], local["tokens"])),
    }
    print(json.dumps(report, indent=1), flush=True)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
