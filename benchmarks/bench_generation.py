"""Generation speed through a swarm on 127.0.0.1, optionally side by side with Petals. Prints JSON.

    python benchmarks/bench_generation.py                 # Swarm only, tiny Llama (hidden 64, 4 layers)
    python benchmarks/bench_generation.py --petals        # also ../shared/bench/petals_baseline.sh, same model

Measures: generate tokens/s (64 new tokens, greedy, median of 10 after a warm-up, with server-to-server
push and without, interleaved; this machine is
noisy, so the per-run times are printed too), 1-token
inference step latency (median of 50), 8x128 forward time (median of 5), server start to ONLINE,
and exactness against local transformers. With --petals the Petals baseline runs first in the
same invocation on the same model directory, and the ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def petals_script() -> str:
    """``shared/bench/petals_baseline.sh`` next to the checkout or a folder above it ($PETALS_BASELINE overrides)."""
    if os.environ.get("PETALS_BASELINE"):
        return os.environ["PETALS_BASELINE"]
    folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    while True:
        candidate = os.path.join(folder, "..", "shared", "bench", "petals_baseline.sh")
        if os.path.isfile(candidate) or os.path.dirname(folder) == folder:
            return os.path.normpath(candidate)
        folder = os.path.dirname(folder)


def run_petals(workdir: str, model_dir: str | None, env: dict[str, str] | None = None) -> tuple[dict, str]:
    """Runs ../shared/bench/petals_baseline.sh (``env``: its settings, e.g. SPANS, SERVER_ARGS_FOR)."""
    script = petals_script()
    env = {**os.environ, **(env or {})}
    if model_dir:
        env["MODEL"] = model_dir
    from swarm.dht import clean_peer_sockets, peer_sockets

    sockets_before = peer_sockets()
    try:
        out = subprocess.run(["bash", script, workdir], env=env, capture_output=True, text=True, timeout=1800)
    finally:  # Petals' daemons leave their unix sockets behind when the script stops them
        clean_peer_sockets(keep=sockets_before)
    text = out.stdout + out.stderr
    match = re.search(r"^\{.*^\}", text, re.S | re.M)
    if not match:  # its client may print results and still exit non-zero (its own timeouts on a busy machine)
        raise RuntimeError(f"petals baseline failed (code {out.returncode}):\n{text[-3000:]}")
    result = json.loads(match.group(0))
    result["script_exit_code"] = out.returncode
    starts = [float(x) for x in re.findall(r"server_\d+_\d+_startup_s=([\d.]+)", text)]
    result["server_start_s"] = starts
    return result, model_dir or os.path.join(workdir, "models", "petals-tiny-llama")


def run_swarm(model_dir: str, spans: list[str], server_threads: int | None, client_threads: int | None,
              repeats: int = 10) -> dict:
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm

    res: dict = {"spans": spans}
    if client_threads:
        torch.set_num_threads(client_threads)
    extra = ["--num-threads", str(server_threads)] if server_threads else []
    with LocalSwarm() as swarm:
        swarm.start_dht()
        starts = []
        for span in spans:
            t0 = time.monotonic()
            swarm.start_server(model_dir, span, *extra)
            starts.append(round(time.monotonic() - t0, 2))
        res["server_start_to_online_s"] = starts
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = local.generation_config.eos_token_id = None
        torch.manual_seed(0)
        prompt = torch.randint(3, 1000, (1, 8))
        kwargs = dict(do_sample=False, pad_token_id=0)
        no_push = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                  use_push=False)
        no_push.generation_config.eos_token_id = None
        model.generate(prompt, max_new_tokens=16, **kwargs)  # warm-up: connections, caches
        no_push.generate(prompt, max_new_tokens=16, **kwargs)
        times, no_push_times, outs = [], [], []
        for _ in range(repeats):  # interleaved, so that both see the same machine load
            t0 = time.perf_counter()
            outs.append(model.generate(prompt, max_new_tokens=64, **kwargs))
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            outs.append(no_push.generate(prompt, max_new_tokens=64, **kwargs))
            no_push_times.append(time.perf_counter() - t0)
        no_push.shutdown()
        res["generate_64_times_s"] = [round(t, 4) for t in times]
        res["generate_64_tokens_per_s_median"] = round(64 / statistics.median(times), 1)
        res["generate_64_no_push_tokens_per_s_median"] = round(64 / statistics.median(no_push_times), 1)
        res["all_runs_identical"] = all(torch.equal(o, outs[0]) for o in outs)
        with torch.inference_mode():
            res["generate_64_equal_local_hf"] = bool(torch.equal(
                outs[0], local.generate(prompt, max_new_tokens=64, **kwargs)))
            t0 = time.perf_counter()
            local.generate(prompt, max_new_tokens=64, **kwargs)
            res["local_hf_generate_64_tokens_per_s"] = round(64 / (time.perf_counter() - t0), 1)

            with model.inference_session(max_length=128) as session:
                hidden = model.get_input_embeddings()(prompt)
                session.step(hidden)
                lat = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    session.step(hidden[:, -1:])
                    lat.append(time.perf_counter() - t0)
            res["inference_step_1token_median_ms"] = round(statistics.median(lat) * 1000, 2)

            x = torch.randint(3, 1000, (8, 128))
            model(x)
            fwd = []
            for _ in range(5):
                t0 = time.perf_counter()
                logits = model(x).logits
                fwd.append(time.perf_counter() - t0)
            res["forward_8x128_median_s"] = round(statistics.median(fwd), 4)
            res["forward_max_abs_diff_vs_local_hf"] = float((logits - local(x).logits).abs().max())
        model.shutdown()
    return res


def _pair(p: dict, s: dict) -> dict:
    """One Petals run and the Swarm run after it: tokens/s, the ratio, and local HF speed (a load gauge)."""
    return {"petals_tokens_per_s": p["generate_64_tokens_per_s_median"],
            "swarm_tokens_per_s": s["generate_64_tokens_per_s_median"],
            "swarm_no_push_tokens_per_s": s["generate_64_no_push_tokens_per_s_median"],
            "local_hf_tokens_per_s": s["local_hf_generate_64_tokens_per_s"],
            "ratio": round(s["generate_64_tokens_per_s_median"] / p["generate_64_tokens_per_s_median"], 2),
            "forward_8x128_s": s["forward_8x128_median_s"],
            "step_ratio": round(s["inference_step_1token_median_ms"] / p["inference_session_1token_step_median_ms"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local Llama directory (default: a tiny random Llama)")
    parser.add_argument("--petals", action="store_true", help="run the Petals baseline in the same invocation")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "swarm-bench"))
    parser.add_argument("--spans", default="0:2,2:4")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch threads per server (3 processes share this machine's cores)")
    parser.add_argument("--client-threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=1,
                        help="with --petals: run Petals then Swarm this many times, alternating, and report the "
                             "median of the per-pair ratios (load on a shared machine comes in bursts)")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)

    report: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}}
    model_dir = args.model
    if args.petals:
        report["petals"], model_dir = run_petals(args.workdir, args.model)
    if model_dir is None:
        from swarm.tiny import make_tiny_model

        model_dir = make_tiny_model(os.path.join(args.workdir, "tiny-llama"))
    report["model"] = model_dir
    report["swarm"] = run_swarm(model_dir, args.spans.split(","), args.server_threads, args.client_threads)
    if args.petals:
        p, s = report["petals"], report["swarm"]
        report["ratios_swarm_over_petals"] = {
            "generate_64_tokens_per_s": round(s["generate_64_tokens_per_s_median"]
                                              / p["generate_64_tokens_per_s_median"], 2),
            "inference_step_latency": round(s["inference_step_1token_median_ms"]
                                            / p["inference_session_1token_step_median_ms"], 3),
            "forward_8x128_time": round(s["forward_8x128_median_s"] / p["forward_8x128_median_s"], 3),
            "server_start_time": round(statistics.mean(s["server_start_to_online_s"])
                                       / statistics.mean(p["server_start_s"]), 3) if p["server_start_s"] else None,
        }
        pairs = [_pair(p, s)]
        for _ in range(args.pairs - 1):
            p, _ = run_petals(args.workdir, args.model)
            pairs.append(_pair(p, run_swarm(model_dir, args.spans.split(","), args.server_threads,
                                            args.client_threads, repeats=5)))
        if args.pairs > 1:
            report["pairs"] = pairs
            report["median_pair_ratio_tokens_per_s"] = statistics.median(pair["ratio"] for pair in pairs)
            report["median_swarm_tokens_per_s"] = statistics.median(pair["swarm_tokens_per_s"] for pair in pairs)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.exit(main())
