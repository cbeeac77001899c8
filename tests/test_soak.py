"""Soak: 3 clients generate in loops while servers are killed (-9) and restarted.

Short by default (``SWARM_SOAK_SECONDS``, 20 s) so that CI runs it on every change; run the long
version with ``SWARM_SOAK_SECONDS=180 pytest tests/test_soak.py``. Every generation must succeed
and equal local greedy output.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest
import torch

from swarm.local_swarm import LocalSwarm

pytestmark = pytest.mark.integration

SOAK_SECONDS = float(os.environ.get("SWARM_SOAK_SECONDS", "20"))
SPANS = ("0:2", "0:2", "2:4", "2:4")


def test_generations_survive_servers_dying_and_coming_back(tiny_llama, local_llama, tmp_path):
    from swarm import AutoDistributedModelForCausalLM

    prompts = [torch.randint(3, 1000, (1, 5), generator=torch.Generator().manual_seed(100 + i)) for i in range(3)]
    expected = [local_llama.generate(p, max_new_tokens=12, do_sample=False) for p in prompts]
    results = {"ok": 0, "wrong": 0, "failed": []}
    lock = threading.Lock()
    stop = threading.Event()
    server_args = ("--num-threads", "1", "--dht-prefix", "soak-llama")

    with LocalSwarm(log_dir=str(tmp_path)) as swarm:
        swarm.start_dht()
        alive = [swarm.start_server(tiny_llama, span, *server_args, wait=False) for span in SPANS]
        for proc in alive:
            proc.wait_for("Server ONLINE", 180)

        def client(index: int) -> None:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                tiny_llama, initial_peers=swarm.initial_peers, dht_prefix="soak-llama", request_timeout=15,
                missing_blocks_timeout=30)
            model.generation_config.eos_token_id = None
            try:
                for _ in range(10_000):  # bounded; the loop ends when the soak time is over
                    if stop.is_set():
                        break
                    try:
                        out = model.generate(prompts[index], max_new_tokens=12, do_sample=False)
                    except Exception as e:  # counted and reported below, never swallowed
                        with lock:
                            results["failed"].append(f"client {index}: {type(e).__name__}: {e}")
                        continue
                    with lock:
                        results["ok" if torch.equal(out, expected[index]) else "wrong"] += 1
            finally:
                model.shutdown()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
        for thread in threads:
            thread.start()
        rng = random.Random(0)
        kills = 0
        deadline = time.monotonic() + SOAK_SECONDS
        try:
            while time.monotonic() < deadline:
                # kill one server of a span that has two, then bring a fresh one up for that span
                victim_index = rng.randrange(len(alive))
                span = SPANS[victim_index]
                swarm.stop(alive[victim_index], sig=signal.SIGKILL, timeout=5)
                kills += 1
                alive[victim_index] = swarm.start_server(tiny_llama, span, *server_args, timeout=120)
        finally:
            stop.set()
            for thread in threads:
                thread.join(120)

    print(f"soak: {SOAK_SECONDS:.0f}s, {kills} kills, {results['ok']} generations ok, {results['wrong']} wrong, "
          f"{len(results['failed'])} failed")
    assert kills >= 1
    assert not results["failed"], results["failed"][:5]
    assert results["wrong"] == 0
    assert results["ok"] >= 3, results
