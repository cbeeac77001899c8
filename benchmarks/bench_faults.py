"""Servers killed (-9), frozen (SIGSTOP) or restarted mid-generation, trial after trial. Prints JSON.

    python benchmarks/bench_faults.py --trials 40 --fault kill     # the 40 SIGKILL trials of docs/faults.md
    python benchmarks/bench_faults.py --trials 10 --fault stop --request-timeout 10
    python benchmarks/bench_faults.py --trials 10 --fault restart
    python benchmarks/bench_faults.py --trials 8 --fault restart --restart-delay 40   # a slow restart

A DHT peer and servers of a tiny Llama on 127.0.0.1, each with a stable identity. ``kill`` and
``stop``: two servers hold blocks 0:2, two hold 2:4; after a random number of tokens a random server
of the session's chain is killed (or frozen, with its p2pd); the victim is then restarted with the
same identity (a frozen one is killed first), and the next trial starts once it is ONLINE again, so
every span always has a replica. ``restart``: two servers hold 0:2 and one alone holds 2:4; it is
killed mid-generation and at once started again with the same identity, so the generation can only
finish by waiting for it; ``--restart-delay`` starts it that many seconds after the kill (a machine too
busy to start a server quickly; longer than the client's ``missing_blocks_timeout``). Each trial generates 16 tokens greedily; the output must equal local
transformers'. Reported: exact / wrong / failed trials, failovers and hedges, the slowest token of
each trial (the stall the fault caused) and the client's ``request_timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time

import torch

SPANS = {"a": "0:2", "b": "0:2", "c": "2:4", "d": "2:4"}
RESTART_SPANS = {"a": "0:2", "b": "0:2", "c": "2:4"}  # c alone holds 2:4
PREFIX = "bench-faults"


class _Fault:
    """A streamer that faults a server of the session's chain once ``after`` tokens are out."""

    def __init__(self, act, after: int):
        self.act, self.after, self.count, self.times, self.victim = act, after, -1, [], None

    def put(self, value):
        self.count += 1
        self.times.append(time.monotonic())
        if self.count == self.after:
            self.victim = self.act()

    def end(self):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--fault", choices=("kill", "stop", "restart"), default="kill")
    parser.add_argument("--request-timeout", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restart-delay", type=float, default=0.0,
                        help="seconds between the kill and the restart (--fault restart)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm
    from swarm.tiny import make_tiny_model

    work = tempfile.mkdtemp(prefix="bench-faults-")
    model_dir = make_tiny_model(os.path.join(work, "tiny-llama"))
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    local.generation_config.eos_token_id = None
    rng = random.Random(args.seed)
    results = {"fault": args.fault, "trials": args.trials, "request_timeout_s": args.request_timeout,
               "restart_delay_s": args.restart_delay, "seed": args.seed, "exact": 0,
               "wrong": 0, "failed": [], "failovers": 0, "hedges": 0, "slowest_token_s": []}

    spans = RESTART_SPANS if args.fault == "restart" else SPANS
    with LocalSwarm(log_dir=os.path.join(work, "logs")) as swarm:
        swarm.start_dht()
        procs, ids, starts = {}, {}, [0]

        def start(name: str):
            starts[0] += 1
            procs[name] = swarm.start_server(model_dir, spans[name], "--num-threads", "1", "--prefix", PREFIX,
                                             "--identity-path", os.path.join(work, f"{name}.key"), wait=False,
                                             name=f"{name}_{starts[0]}")
            return procs[name]

        done, later = threading.Event(), []

        def start_later(name: str):  # a server dies with the thread that started it: this one waits for `done`
            if not done.wait(args.restart_delay):
                start(name)
                done.wait()

        for name in spans:
            start(name)
        for name, proc in procs.items():
            ids[name] = proc.wait_for("Server ONLINE", 300).rsplit(" as ", 1)[1].strip()
        names = {peer_id: name for name, peer_id in ids.items()}
        model = AutoDistributedModelForCausalLM.from_pretrained(
            model_dir, initial_peers=swarm.initial_peers, dht_prefix=PREFIX, request_timeout=args.request_timeout)
        model.generation_config.eos_token_id = None
        try:
            for trial in range(args.trials):
                prompt = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(1000 + trial))
                expected = local.generate(prompt, max_new_tokens=16, do_sample=False)
                with model.inference_session(max_length=32) as session:
                    def act():
                        victim = "c" if args.fault == "restart" else names[rng.choice(session.chain).peer_id]
                        if args.fault == "stop":
                            os.killpg(procs[victim].popen.pid, signal.SIGSTOP)
                        else:
                            swarm.stop(procs[victim], sig=signal.SIGKILL, timeout=5)
                        if args.fault == "restart" and args.restart_delay > 0:
                            later.append(threading.Thread(target=start_later, args=(victim,)))
                            later[-1].start()
                        elif args.fault == "restart":
                            start(victim)  # the same identity; the generation must wait for it
                        return victim

                    fault = _Fault(act, after=rng.randint(2, 12))
                    try:
                        out = model.generate(prompt, max_new_tokens=16, do_sample=False, session=session,
                                             streamer=fault)
                        results["exact" if torch.equal(out, expected) else "wrong"] += 1
                    except Exception as e:  # counted and reported, never hidden
                        results["failed"].append(f"trial {trial}: {type(e).__name__}: {e}"[:500])
                    results["failovers"] += session.failovers
                    results["hedges"] += session.hedges
                times = fault.times
                results["slowest_token_s"].append(round(max(b - a for a, b in zip(times, times[1:])), 3))
                if fault.victim is not None and args.fault == "restart":
                    deadline = time.monotonic() + args.restart_delay + 10
                    while procs[fault.victim].popen.poll() is not None and time.monotonic() < deadline:
                        time.sleep(0.5)  # a failed trial may end before the delayed restart
                    procs[fault.victim].wait_for("Server ONLINE", 300)
                elif fault.victim is not None:  # bring it back with the same identity before the next trial
                    if args.fault == "stop":
                        os.killpg(procs[fault.victim].popen.pid, signal.SIGCONT)
                    swarm.stop(procs[fault.victim], sig=signal.SIGKILL, timeout=5)
                    start(fault.victim).wait_for("Server ONLINE", 300)
                print(f"trial {trial}: exact {results['exact']}, failed {len(results['failed'])}, "
                      f"slowest token {results['slowest_token_s'][-1]}s", flush=True)
        finally:
            model.shutdown()
            done.set()
            for thread in later:
                thread.join(10)
    slowest = results["slowest_token_s"]
    results["slowest_token_median_s"] = statistics.median(slowest)
    results["slowest_token_max_s"] = max(slowest)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
