"""Memory and speed of quantized blocks (``swarm serve --quant``) on 7B-shaped Llama blocks. Prints JSON.

    python benchmarks/bench_quant.py                    # on the CPU
    python benchmarks/bench_quant.py --device cuda      # on a GPU

Builds a random-weight Llama checkpoint with Llama-2-7B's block shape (hidden 4096, intermediate
11008, 32 heads) and ``--blocks`` blocks, saved in bfloat16 safetensors in a temp dir. Then, for
each setup (compute dtype x quant), in fresh processes:

- a worker loads the span as a server does (``server.loading.load_span``) and reports the bytes one
  block stores (parameters + buffers), the process RSS (all, anonymous, file-backed) after one step
  through every block and its peak (VmHWM; on a GPU: allocated and peak allocated device memory),
  and step latency through one block: a 1-token step
  into a KV cache (median of ``--steps``, after a 16-token prefill) and a 128-token prefill (median of 3);
- a real ``swarm serve --quant ... --blocks 0:N`` process (its own swarm, no throughput probe): its
  RSS once ONLINE and its peak RSS.

``bfloat16:none:mapped`` is ``bfloat16:none`` with the weights swapped back, after loading, for views of
the memory-mapped checkpoint file (what a server of the checkpoint's own dtype served before the loader
copied weights into memory of their own): the worker only, no server.

Ratios are taken against bfloat16 without quantization, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
             vocab_size=1024, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SETUPS = ("float32:none", "bfloat16:none", "bfloat16:none:mapped", "bfloat16:int8", "bfloat16:nf4", "float32:int8",
          "float32:nf4")


def build_checkpoint(path: str, blocks: int, shape: dict) -> str:
    """A random-weight Llama of ``shape`` with ``blocks`` blocks, in bfloat16, built one block at a time."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=blocks, **shape)
    config.dtype = "bfloat16"
    config.save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    top = {"model.embed_tokens.weight": randn(shape["vocab_size"], hidden), "model.norm.weight":
           torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": randn(shape["vocab_size"], hidden)}
    weight_map = {name: "top.safetensors" for name in top}
    save_file(top, os.path.join(path, "top.safetensors"), metadata={"format": "pt"})
    for i in range(blocks):
        p = f"model.layers.{i}."
        block = {p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                 **{p + f"self_attn.{n}.weight": randn(hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                 p + "mlp.gate_proj.weight": randn(inter, hidden), p + "mlp.up_proj.weight": randn(inter, hidden),
                 p + "mlp.down_proj.weight": randn(hidden, inter)}
        name = f"block-{i}.safetensors"
        save_file(block, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({key: name for key in block})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def _status_kib(pid: int | str, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _rss(pid: int | str) -> dict:
    """Resident memory: all of it, anonymous (owned by the process) and file pages (memory-mapped
    checkpoint tensors: the weights of a span served in the checkpoint's dtype, or pages quantizing read)."""
    return {f"{name}_mib": round(_status_kib(pid, field) / 1024)
            for name, field in (("rss", "VmRSS"), ("rss_anon", "RssAnon"), ("rss_file", "RssFile"))}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(run, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def map_weights(span, model: str) -> None:
    """Replaces every weight of ``span`` by the same tensor as a view of the memory-mapped checkpoint."""
    from safetensors import safe_open

    with open(os.path.join(model, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    files: dict = {}
    for i, block in zip(range(span.start, span.end), span.blocks):
        for name, param in list(block.named_parameters()):
            key = f"model.layers.{i}.{name}"
            if weight_map[key] not in files:
                files[weight_map[key]] = safe_open(os.path.join(model, weight_map[key]), framework="pt")
            mapped = files[weight_map[key]].get_tensor(key)
            if mapped.dtype != param.dtype or not torch.equal(mapped, param):
                raise RuntimeError(f"{key} is not stored in the checkpoint as it is served")
            path, _, attr = name.rpartition(".")
            setattr(block.get_submodule(path), attr, torch.nn.Parameter(mapped, requires_grad=False))


def worker(args: argparse.Namespace) -> dict:
    """One setup in this process: load the span as the server does, then measure it."""
    from server.loading import load_span
    from swarm.models import DTYPES, load_config
    from swarm.quant import check_scheme, module_bytes
    from swarm.weights import Checkpoint

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    check_scheme(args.quant, device, dtype)
    config = load_config(args.model)
    t0 = time.perf_counter()
    span = load_span(Checkpoint(args.model), config, 0, config.num_hidden_layers, dtype, device, quant=args.quant)
    if args.mapped:
        map_weights(span, args.model)
    _sync(device)
    result: dict = {"load_s": round(time.perf_counter() - t0, 1), "bytes_per_block": module_bytes(span.blocks[0]),
                    "peak_rss_mib": round(_status_kib("self", "VmHWM") / 1024)}
    with torch.inference_mode():  # touch every weight: memory-mapped ones become resident only when read
        span(torch.zeros(1, 1, config.hidden_size, device=device, dtype=dtype))
    result.update(_rss("self"))
    if device.type == "cuda":
        result["device_allocated_mib"] = round(torch.cuda.memory_allocated(device) / 2**20)
        result["device_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 145, config.hidden_size, generator=generator).to(device, dtype)  # [batch, seq, hidden]
    with torch.inference_mode():
        cache = span.new_cache()
        span(hidden[:, :16], cache, 0, 0, 1)  # prefill 16 tokens into block 0's cache
        position = 16

        def step() -> None:
            nonlocal position
            span(hidden[:, position:position + 1], cache, position, 0, 1)
            position += 1

        step()  # warm-up
        result["step_1_token_ms"] = _median_ms(step, device, args.steps)
        span(hidden[:, :128], span.new_cache(), 0, 0, 1)  # warm-up
        result["prefill_128_ms"] = _median_ms(lambda: span(hidden[:, :128], span.new_cache(), 0, 0, 1), device, 3)
    return result


def server_rss(model: str, device: str, dtype: str, quant: str, blocks: int, threads: int | None) -> dict:
    """RSS of a real ``swarm serve`` process holding the span, once it is ONLINE."""
    from swarm.local_swarm import LocalSwarm

    extra = ["--device", device, "--dtype", dtype, "--quant", quant, "--throughput", "1", "--cache-tokens", "1024"]
    if threads:
        extra += ["--num-threads", str(threads)]
    with LocalSwarm() as swarm:
        t0 = time.monotonic()
        proc = swarm.start_server(model, f"0:{blocks}", *extra, timeout=900)
        pid = proc.popen.pid
        return {"server_start_to_online_s": round(time.monotonic() - t0, 1),
                **{f"server_{key}": value for key, value in _rss(pid).items()},
                "server_peak_rss_mib": round(_status_kib(pid, "VmHWM") / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--blocks", type=int, default=4, help="blocks in the checkpoint (all are loaded)")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS),
                        help="DTYPE:QUANT pairs (DTYPE:none:mapped: weights as views of the memory-mapped file)")
    parser.add_argument("--steps", type=int, default=10, help="1-token steps timed per setup")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-server", action="store_true", help="skip the swarm serve RSS measurement")
    parser.add_argument("--hidden-size", type=int, default=SHAPE["hidden_size"], help="(a smaller block: a quick check)")
    parser.add_argument("--intermediate-size", type=int, default=SHAPE["intermediate_size"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--quant", help=argparse.SUPPRESS)
    parser.add_argument("--mapped", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return

    shape = {**SHAPE, "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size}
    results: dict = {"device": args.device, "blocks": args.blocks, "torch": torch.__version__,
                     "threads": args.threads or torch.get_num_threads(), "shape": shape, "setups": {}}
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        model = build_checkpoint(os.path.join(tmp, "llama"), args.blocks, shape)
        for setup in args.setups:
            dtype, quant, *how = setup.split(":")
            mapped = how == ["mapped"]
            cmd = [sys.executable, __file__, "--worker", "--model", model, "--device", args.device, "--dtype", dtype,
                   "--quant", quant, "--steps", str(args.steps)] + (["--threads", str(args.threads)] if args.threads else [])
            cmd += ["--mapped"] if mapped else []
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if out.returncode != 0:
                results["setups"][setup] = {"error": out.stderr[-2000:]}
                continue
            entry = json.loads(out.stdout.strip().splitlines()[-1])
            if not args.no_server and not mapped:
                entry.update(server_rss(model, args.device, dtype, quant, args.blocks, args.threads))
            results["setups"][setup] = entry
            print(f"{setup}: {entry}", file=sys.stderr, flush=True)
    base = results["setups"].get("bfloat16:none", {})
    if "bytes_per_block" in base:
        results["vs_bfloat16"] = {
            setup: {key: round(entry[key] / base[key], 3) for key in
                    ("bytes_per_block", "rss_anon_mib", "server_rss_anon_mib", "step_1_token_ms", "prefill_128_ms")
                    if key in entry and base.get(key)}
            for setup, entry in results["setups"].items() if "error" not in entry}
        ratios = results["vs_bfloat16"]
        results["targets"] = {name: ratios[setup]["bytes_per_block"] <= limit for name, setup, limit in (
            ("nf4_bytes_per_block_le_0.3x", "bfloat16:nf4", 0.3), ("int8_bytes_per_block_le_0.55x", "bfloat16:int8", 0.55))
            if "bytes_per_block" in ratios.get(setup, {})}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
