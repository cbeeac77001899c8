"""``swarm demo``: a whole swarm on 127.0.0.1 streaming one generation, then torn down.

With no ``--model`` it builds a small random-weight Llama from a config (no network, no
downloads) and streams token ids; with ``--model`` it uses that model and its tokenizer.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time


def even_spans(num_blocks: int, num_servers: int) -> list[str]:
    """Splits ``num_blocks`` into ``num_servers`` contiguous spans, as even as possible."""
    num_servers = max(1, min(num_servers, num_blocks))
    bounds = [round(i * num_blocks / num_servers) for i in range(num_servers + 1)]
    return [f"{a}:{b}" for a, b in zip(bounds, bounds[1:])]


class _ChainStreamer:
    """A ``generate`` streamer that first prints the chain the session went through, then tokens."""

    def __init__(self, session, tokenizer, server_names: dict[str, str]):
        self.session, self.tokenizer, self.server_names = session, tokenizer, server_names
        self.seen_prompt = False
        self.printed_chain = False
        self.tokens: list[int] = []

    def put(self, value) -> None:
        if not self.seen_prompt:  # generate passes the prompt first
            self.seen_prompt = True
            return
        if not self.printed_chain:
            self.printed_chain = True
            print("Route of this session:")
            for link in self.session.chain:
                name = self.server_names.get(link.peer_id, "")
                print(f"  blocks {link.start}:{link.end} -> server {link.peer_id[-8:]} {name}")
            print("Generated:", end=" ", flush=True)
        ids = value.reshape(-1).tolist()
        self.tokens.extend(ids)
        if self.tokenizer is not None:
            print(self.tokenizer.decode(ids), end="", flush=True)
        else:
            print(" ".join(str(i) for i in ids), end=" ", flush=True)

    def end(self) -> None:
        print(flush=True)


def run_demo(model: str | None = None, num_servers: int = 2, prompt: str = "A swarm of small machines",
             max_new_tokens: int = 24) -> int:
    import torch

    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm, threads_per_process
    from swarm.models import load_config
    from swarm.tiny import make_tiny_model

    workdir = tempfile.mkdtemp(prefix="swarm-demo-")
    tokenizer = None
    if model is None:
        model = make_tiny_model(os.path.join(workdir, "tiny-llama"))
        print(f"Built a random-weight tiny Llama (4 blocks, hidden 64) in {model}")
    config = load_config(model)
    spans = even_spans(config.num_hidden_layers, num_servers)
    threads = threads_per_process(len(spans) + 1)  # the servers and this process (the client) share the cores
    torch.set_num_threads(threads)
    t0 = time.monotonic()
    with LocalSwarm(log_dir=workdir, threads=threads) as swarm:
        print("Starting a DHT peer on 127.0.0.1 ...", flush=True)
        swarm.start_dht()
        print(f"  join address: {swarm.initial_peers[0]}")
        names: dict[str, str] = {}
        for i, span in enumerate(spans):
            print(f"Starting server {i} for blocks {span} ...", flush=True)
            proc = swarm.start_server(model, span, "--public-name", f"demo-server-{i}")
            line = proc.wait_for("Server ONLINE", 5)
            names[line.rsplit(" ", 1)[-1].strip()] = f"(demo-server-{i}, log {proc.log_path})"
        print(f"Swarm ready in {time.monotonic() - t0:.1f}s: {len(spans)} servers, logs in {workdir}", flush=True)

        distributed = AutoDistributedModelForCausalLM.from_pretrained(model, initial_peers=swarm.initial_peers)
        if os.path.isfile(os.path.join(model, "tokenizer_config.json")) or not os.path.isdir(model):
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model)
            except Exception as e:  # a model without a tokenizer still demos on token ids
                print(f"(no tokenizer: {e}; streaming token ids)")
        if tokenizer is not None:
            input_ids = tokenizer(prompt, return_tensors="pt").input_ids
            print(f"Prompt: {prompt!r}")
        else:
            torch.manual_seed(0)
            input_ids = torch.randint(3, config.vocab_size, (1, 8))
            print(f"Prompt token ids: {input_ids[0].tolist()}")
        distributed.generation_config.eos_token_id = None
        with distributed.inference_session(max_length=input_ids.shape[1] + max_new_tokens) as session:
            streamer = _ChainStreamer(session, tokenizer, names)
            t1 = time.perf_counter()
            distributed.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                 session=session, pad_token_id=0)
            elapsed = time.perf_counter() - t1
        print(f"{len(streamer.tokens)} tokens in {elapsed:.2f}s ({len(streamer.tokens) / elapsed:.0f} tokens/s)")
        distributed.shutdown()
        print("Stopping the swarm ...", flush=True)
    print("Done.")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
