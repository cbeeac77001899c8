"""Verification: false bans on honest servers, its cost in tokens/s, and how fast a slightly wrong server is caught.

    python benchmarks/bench_verify.py --soak-seconds 600 --trials 10     # the run docs/faults.md reports
    python benchmarks/bench_verify.py --pairs 0 --soak-seconds 0 --trials 20     # detection only

A DHT peer and five honest servers of a tiny Llama on 127.0.0.1: blocks 0:2 on two float32 servers,
blocks 2:4 on two float32 servers and one bfloat16 server (so honest servers of different dtypes
check each other). Three phases, printed as JSON:

1. overhead: generations (64 new tokens) alternating ``verify_rate=0`` and the default rate, paired,
   tokens/s of each (median) and their ratio;
2. soak: one client generates in a loop for ``--soak-seconds`` at the default rate; every step is
   counted, and every check, disagreement and server found wrong (all honest: any is a false ban);
3. detection: a rogue float32 server of blocks 0:4 that adds relative error 1e-2 to a random 10% of
   its outputs joins; in each trial a fresh client whose first choice is the rogue generates (sessions
   of 40 steps) until it catches it (at most 400 steps); reported: the steps it took, and how many of
   them went through the rogue, and any honest server blamed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

PREFIX = "bench-verify"
ROGUE = "inference:perturb=0.01@0.1,forward:perturb=0.01@0.1"  # relative error 1e-2 on 10% of its answers
SERVERS = (("a0", "0:2", "float32"), ("a1", "0:2", "float32"), ("b0", "2:4", "float32"), ("b1", "2:4", "float32"),
           ("b2", "2:4", "bfloat16"))


class _Counter:
    """A streamer counting steps; with ``peer_id``, also the steps whose session went through it, and the step
    (of either count) at which it was first distrusted."""

    def __init__(self, model=None, peer_id: str | None = None):
        self.model, self.peer_id, self.session = model, peer_id, None
        self.steps = self.steps_through = 0
        self.caught_at = self.caught_at_through = None

    def put(self, value):
        self.steps += 1
        if self.peer_id is None or self.caught_at is not None:
            return
        if self.session is not None and self.peer_id in [link.peer_id for link in self.session.chain]:
            self.steps_through += 1
        if self.peer_id in self.model.remote.bans.distrusted():
            self.caught_at, self.caught_at_through = self.steps, self.steps_through

    def end(self):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args()

    from swarm import AutoDistributedModelForCausalLM
    from swarm.config import ClientConfig
    from swarm.local_swarm import LocalSwarm
    from swarm.tiny import make_tiny_model

    work = tempfile.mkdtemp(prefix="bench-verify-")
    model_dir = make_tiny_model(os.path.join(work, "tiny-llama"))
    default_rate = ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/1/p2p/x",)).verify_rate
    result: dict = {"verify_rate": default_rate, "servers": [f"{span} {dtype}" for _, span, dtype in SERVERS]}

    def client(**kwargs):
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                dht_prefix=PREFIX, **kwargs)
        model.generation_config.eos_token_id = None
        return model

    def prompt(seed: int) -> torch.Tensor:
        return torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(seed))

    with LocalSwarm(log_dir=os.path.join(work, "logs")) as swarm:
        swarm.start_dht()
        procs = [swarm.start_server(model_dir, span, "--num-threads", "1", "--prefix", PREFIX, "--dtype", dtype,
                                    wait=False, name=name) for name, span, dtype in SERVERS]
        names = [proc.wait_for("Server ONLINE", 300).rsplit(" as ", 1)[1].strip() for proc in procs]

        # 1. overhead, paired (--pairs 0: skipped)
        if args.pairs:
            models = {0.0: client(verify_rate=0.0), default_rate: client()}
            speeds: dict[float, list[float]] = {rate: [] for rate in models}
            try:
                for pair in range(args.pairs + 1):
                    for rate, model in models.items():
                        t0 = time.perf_counter()
                        model.generate(prompt(pair), max_new_tokens=64, do_sample=False)
                        if pair:  # the first pair warms up
                            speeds[rate].append(64 / (time.perf_counter() - t0))
                result["overhead"] = {
                    "tokens_per_s_without": round(statistics.median(speeds[0.0]), 1),
                    "tokens_per_s_with": round(statistics.median(speeds[default_rate]), 1),
                    "ratio": round(statistics.median(speeds[default_rate]) / statistics.median(speeds[0.0]), 3),
                    "checks": models[default_rate].remote.verifier.stats.checks,
                }
            finally:
                for model in models.values():
                    model.shutdown()
            print(json.dumps({"overhead": result["overhead"]}), flush=True)

        # 2. soak on honest servers (--soak-seconds 0: skipped)
        if args.soak_seconds > 0:
            model = client()
            counter = _Counter()
            deadline = time.monotonic() + args.soak_seconds
            generations = failures = 0
            try:
                for i in range(1_000_000):  # bounded by the deadline
                    if time.monotonic() > deadline:
                        break
                    try:
                        model.generate(prompt(1000 + i), max_new_tokens=64, do_sample=False, streamer=counter)
                        generations += 1
                    except Exception as e:  # counted, and the first few reported
                        failures += 1
                        if failures <= 3:
                            print(f"generation failed: {type(e).__name__}: {e}", flush=True)
                stats = model.remote.verifier.stats
                result["soak"] = {
                    "seconds": args.soak_seconds, "generations": generations, "failed": failures,
                    "steps": counter.steps, "checks": stats.checks, "tokens_rechecked": stats.tokens,
                    "unverifiable": stats.unverifiable, "disagreements": stats.disagreements,
                    "false_bans": len(model.remote.bans.distrusted()),
                    "largest_agreeing_error": stats.largest_agreeing_error,
                }
            finally:
                model.shutdown()
            print(json.dumps({"soak": result["soak"]}), flush=True)

        # 3. detection of a rogue
        rogue_proc = swarm.start_server(model_dir, "0:4", "--num-threads", "1", "--prefix", PREFIX, name="rogue",
                                        env={"SWARM_TEST_FAULTS": ROGUE})
        rogue = rogue_proc.wait_for("Server ONLINE", 300).rsplit(" as ", 1)[1].strip()
        names.append(rogue)
        caught: list[int | None] = []
        caught_through: list[int | None] = []
        honest_blamed: set[str] = set()
        for trial in range(args.trials):
            model = client()
            counter = _Counter(model, rogue)
            try:
                for session_index in range(10):  # 40 steps a session: at most 400 steps
                    for peer_id in names:  # the rogue is its first choice (others' round trips look longer)
                        model.remote.pings[peer_id] = (0.0001 if peer_id == rogue else 0.05, time.monotonic())
                    with model.inference_session(max_length=48) as session:
                        counter.session = session
                        model.generate(prompt(5000 + 100 * trial + session_index), max_new_tokens=39,
                                       do_sample=False, session=session, streamer=counter)
                    if counter.caught_at is not None:
                        break
                caught.append(counter.caught_at)
                caught_through.append(counter.caught_at_through)
                honest_blamed |= model.remote.bans.distrusted() - {rogue}
            finally:
                model.shutdown()
            print(f"trial {trial}: caught at step {counter.caught_at} ({counter.caught_at_through} through it)",
                  flush=True)
        found = [c for c in caught if c is not None]
        result["detection"] = {"trials": args.trials, "caught": len(found), "steps": caught,
                               "steps_through_it": caught_through,
                               "median_steps": statistics.median(found) if found else None,
                               "max_steps": max(found) if found else None, "false_bans": len(honest_blamed)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
