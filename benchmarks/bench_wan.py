"""Generation over emulated WAN links, with Petals 2.2 under the same emulation in the same run. Prints JSON.

    python benchmarks/bench_wan.py                             # 2 and 4 servers at 0, 10, 25, 50 ms one way
    python benchmarks/bench_wan.py --petals --workdir /tmp/pb  # and Petals 2.2 behind the same proxies
    python benchmarks/bench_wan.py --delays 25 --servers 4 --petals

Links: every server listens behind a delaying proxy (swarm/wan.py) that it announces, so every link to
it, from the client and from other servers, costs ``delay`` one way (2 * delay a round trip). Petals'
servers get the same proxies (``--announce_maddrs``, through petals_baseline.sh's SERVER_ARGS_FOR).
``--client-downlink B`` puts every server behind one proxy process whose answers to their dialers share
one link of B bytes/s: the client's downlink (the servers of a chain dial the next one to push).

Model: tiny Llama (hidden 64, or ``--hidden``) with 8 layers whose last 6 add little (swarm.tiny
``quiet_after=2``), so that its first 2 layers (the draft: same embeddings, norm and head) predict most of
its tokens. The servers split the 8 layers evenly (2 servers: 4 each; 4 servers: 2 each), one torch
thread each.

Per (delay, servers), each configuration generates ``--tokens`` new tokens greedily after an 8-token
prompt, ``--repeats`` times interleaved (median): ``defaults`` (ClientConfig's defaults: push, 5% of
span steps verified on other servers, hence with echo), and without verification: no push (every hop
back through the client), push with echo (each server also sends its output back to the client), push
without echo (pushed steps are only acknowledged), and push without echo with speculative decoding
(``assistant_model=`` the 2-layer draft, draft length chosen by the client). A generate call opens its
own session, as Petals' does. Every output is checked against local transformers' greedy output. Also
reported: the draft's acceptance (accepted / drafted) and its agreement rate (accepted / (accepted +
rejections): how often the model keeps a draft token it checks), and with delay 0 in the run,
``legs_per_token``: (ms per token at d - at 0) / d, the one-way link crossings on a token's critical path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPT = 8
ACCESS_FROM = "127.0.0.2"  # with --client-downlink the client listens (and so dials) here, on the loopback
CONFIGS = {  # name: (client options, generate options); no verification re-runs but in "defaults"
    "defaults": ({}, {}),  # ClientConfig's defaults: push, 5% of span steps verified, so with echo
    "no_push": (dict(use_push=False, verify_rate=0.0), {}),
    "push_echo": (dict(use_push=True, push_echo=True, verify_rate=0.0), {}),  # every output also back to the client
    "push": (dict(use_push=True, push_echo=False, verify_rate=0.0), {}),  # push without echo
    "push_spec": (dict(use_push=True, push_echo=False, verify_rate=0.0), dict(speculative=True)),
}


def spans_for(servers: int, layers: int) -> list[str]:
    step = layers // servers
    return [f"{i * step}:{(i + 1) * step}" for i in range(servers)]


def run_swarm(model_dir: str, delay: float, spans: list[str], tokens: int, repeats: int, log_dir: str,
              downlink: float = 0.0, configs: dict | None = None, compression: str | None = None) -> dict:
    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm
    from swarm.tiny import load_draft
    from swarm.wan import LinkShape

    from transformers import AutoModelForCausalLM

    configs = configs or CONFIGS
    common = {} if compression is None else {"compression": compression}
    if downlink:
        common["host_maddrs"] = (f"/ip4/{ACCESS_FROM}/tcp/0",)  # dials from there: the proxy knows the client
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    local.generation_config.eos_token_id = None
    draft = load_draft(model_dir, 2)
    prompt = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    expected = local.generate(prompt, max_new_tokens=tokens, do_sample=False)
    res: dict = {}
    with LocalSwarm(log_dir=log_dir, wan=LinkShape(delay)) as swarm:
        swarm.start_dht()
        names = [f"server{i}" for i in range(len(spans))]
        if downlink:  # every server behind one proxy: what they send back to the client shares its downlink
            swarm.start_shared_proxy(names, LinkShape(delay), downlink, access_from=ACCESS_FROM)
        procs = [swarm.start_server(model_dir, span, "--num-threads", "1", "--throughput", "100", wait=False,
                                    name=name) for name, span in zip(names, spans)]
        for proc in procs:
            proc.wait_for("Server ONLINE", 180)
        clients = {}
        for name, (options, _) in configs.items():
            clients[name] = AutoDistributedModelForCausalLM.from_pretrained(
                model_dir, initial_peers=swarm.initial_peers, **common, **options)
            clients[name].generation_config.eos_token_id = None
        times: dict[str, list[float]] = {name: [] for name in configs}
        stats = {"drafted": 0, "accepted": 0, "rounds": 0, "rejections": 0}
        exact = True
        try:
            for repeat in range(repeats + 1):  # the first is a warm-up: connections, pings, caches
                for name, (_, options) in configs.items():
                    model = clients[name]
                    with model.inference_session(max_length=PROMPT + tokens) as session:
                        kwargs = dict(assistant_model=draft) if options.get("speculative") else {}
                        t0 = time.perf_counter()
                        out = model.generate(prompt, max_new_tokens=tokens, do_sample=False, session=session,
                                             **kwargs)
                        elapsed = time.perf_counter() - t0
                    exact = exact and bool(torch.equal(out, expected))
                    if repeat == 0:
                        continue
                    times[name].append(elapsed)
                    if options.get("speculative"):
                        spec = session.speculation
                        stats["drafted"] += spec.drafted
                        stats["accepted"] += spec.accepted
                        stats["rounds"] += spec.rounds
                        stats["rejections"] += spec.rejections
        finally:
            for model in clients.values():
                model.shutdown()
    for name, values in times.items():
        median = statistics.median(values)
        res[name] = {"tokens_per_s": round(tokens / median, 2), "ms_per_token": round(median / tokens * 1000, 1),
                     "times_s": [round(t, 3) for t in values]}
    if "push_spec" in res:
        res["push_spec"]["acceptance"] = round(stats["accepted"] / max(stats["drafted"], 1), 3)
        res["push_spec"]["agreement"] = round(stats["accepted"] / max(stats["accepted"] + stats["rejections"], 1), 3)
        res["push_spec"]["tokens_per_round"] = round(tokens * repeats / max(stats["rounds"], 1), 2)
    res["equal_local_greedy"] = exact
    return res


def run_petals_wan(model_dir: str, delay: float, spans: list[str], workdir: str, log_dir: str) -> dict:
    """Petals 2.2 (petals_baseline.sh) with each server behind a proxy of the same shape, announced."""
    from bench_generation import run_petals

    from swarm.local_swarm import LocalSwarm
    from swarm.wan import LinkShape

    with LocalSwarm(log_dir=log_dir) as proxies:
        script = os.path.join(log_dir, "petals_server_args.sh")
        lines = ["#!/usr/bin/env bash", 'case "$1" in']
        for span in spans:
            args = proxies.listen_args(f"petals_{span.replace(':', '_')}", LinkShape(delay), flag="--{}_maddrs")
            lines.append(f"  {span}) printf '%s\\n' {' '.join(args)} ;;")
        lines.append("esac")
        with open(script, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.chmod(script, 0o755)
        result, _ = run_petals(workdir, model_dir, env={"SPANS": " ".join(spans), "SERVER_ARGS_FOR": script})
    return {"tokens_per_s": result["generate_64_tokens_per_s_median"],
            "ms_per_token": round(1000 / result["generate_64_tokens_per_s_median"], 1),
            "generate_64_times_s": result["generate_64_times_s"],
            "equal_local_greedy": result["generate_32_equal_local_hf"],
            "step_1token_ms": result["inference_session_1token_step_median_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", default="0,10,25,50", help="one-way delays per link, ms")
    parser.add_argument("--servers", default="2,4", help="server counts")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generate (Petals' runs use 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--petals", action="store_true", help="run Petals 2.2 under the same emulation too")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "swarm-bench-wan"))
    parser.add_argument("--client-downlink", type=float, default=0.0,
                        help="bytes/s of the client's downlink, one link every server's answers share (0: none)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model (4 heads)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="which configurations to run")
    parser.add_argument("--compression", default=None, help="every client's compression (default: its default)")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(1)  # the client shares this machine's cores with the servers

    from swarm.tiny import make_tiny_model

    layers = 8
    suffix = "" if args.hidden == 64 else f"-h{args.hidden}"
    model_dir = make_tiny_model(os.path.join(args.workdir, f"tiny-llama-8q{suffix}"), num_hidden_layers=layers,
                                quiet_after=2, hidden_size=args.hidden, intermediate_size=2 * args.hidden)
    configs = {name: CONFIGS[name] for name in args.configs.split(",")}
    report: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "model": model_dir,
                    "configs": list(configs), "compression": args.compression or "default",
                    "hidden": args.hidden, "client_downlink_bytes_per_s": args.client_downlink,
                    "tokens": args.tokens, "repeats": args.repeats, "runs": []}
    for delay_ms in [float(d) for d in args.delays.split(",")]:
        for servers in [int(n) for n in args.servers.split(",")]:
            spans = spans_for(servers, layers)
            tag = f"d{delay_ms:g}_s{servers}"
            row: dict = {"delay_ms": delay_ms, "servers": servers, "spans": spans}
            if args.petals:
                row["petals"] = run_petals_wan(model_dir, delay_ms / 1000, spans, args.workdir,
                                               os.path.join(args.workdir, f"logs-petals-{tag}"))
            row.update(run_swarm(model_dir, delay_ms / 1000, spans, args.tokens, args.repeats,
                                 os.path.join(args.workdir, f"logs-{tag}{suffix}"), args.client_downlink, configs,
                                 args.compression))
            row["ratios"] = {f"{a}_over_{b}": round(row[a]["tokens_per_s"] / row[b]["tokens_per_s"], 2)
                             for a, b in (("push", "defaults"), ("push", "no_push"), ("push", "push_echo"),
                                          ("push_spec", "push"), ("push", "petals"), ("push_spec", "petals"))
                             if a in row and b in row}
            report["runs"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    report["legs_per_token"] = legs_per_token(report["runs"])
    print(json.dumps(report, indent=1))


def legs_per_token(runs: list[dict]) -> list[dict]:
    """Where a token's time goes: (ms per token at delay d - ms per token at 0) / d, the one-way link
    crossings on a token's critical path, per configuration (needs delay 0 in the same run)."""
    out = []
    for run in runs:
        base = next((r for r in runs if r["servers"] == run["servers"] and r["delay_ms"] == 0), None)
        if base is None or run["delay_ms"] == 0:
            continue
        names = [name for name in ("petals", *CONFIGS) if name in run and name in base]
        out.append({"delay_ms": run["delay_ms"], "servers": run["servers"], **{
            name: round((run[name]["ms_per_token"] - base[name]["ms_per_token"]) / run["delay_ms"], 2)
            for name in names}})
    return out


if __name__ == "__main__":
    sys.exit(main())
