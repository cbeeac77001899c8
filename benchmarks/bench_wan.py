"""Generation over emulated WAN links, with Petals 2.2 under the same emulation in the same run. Prints JSON.

    python benchmarks/bench_wan.py                             # 2 and 4 servers at 0, 10, 25, 50 ms one way
    python benchmarks/bench_wan.py --petals --workdir /tmp/pb  # and Petals 2.2 behind the same proxies
    python benchmarks/bench_wan.py --delays 25 --servers 4 --petals --out d25s4.json
    python benchmarks/bench_wan.py --combine d0.json d25s4.json    # floors and legs across separate runs

Links: every server listens behind a delaying proxy (swarm/wan.py) that it announces, so every link to
it, from the client and from other servers, costs ``delay`` one way (2 * delay a round trip). Petals'
servers get the same proxies (``--announce_maddrs``, through petals_baseline.sh's SERVER_ARGS_FOR).
``--client-downlink B`` puts every server behind one proxy process whose answers to their dialers share
one link of B bytes/s: the client's downlink (the servers of a chain dial the next one to push); several
widths, comma-separated, run one after another.

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
own session, as Petals' does. Every output is checked against local transformers' greedy output
(``equal_local_greedy``, per configuration), and the warm-up's logits against theirs (``max_logit_error``).
Also reported: the draft's acceptance (accepted / drafted) and its agreement rate (accepted / (accepted +
rejections): how often the model keeps a draft token it checks).

Floors (benchmarks/wan_floor.py): per configuration, the one-way delays on a token's critical path
(2N without push, N + 1 with push, (N + 1) / tokens per round with speculation), the floor that sets with
the same configuration's ms per token at 0 ms (from a 0 ms run of the same servers), the ceiling tokens/s
and the fraction of it reached (``of_ceiling``), and the measured legs; ``legs_fit`` is the slope of ms
per token against delay over the run's delays. ``--out`` writes a report; ``--combine`` merges reports
of separate runs (e.g. one delay each) and computes the floors across them.

Narrow links: ``--link-bandwidth W`` limits every server's link (both ways), where compression pays
(``--configs push_none,push_auto,push_int8``: push without echo with each policy; the servers then
announce every 5 s so that the client knows their links' bandwidth before it starts).
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
    # push without echo with each compression policy (swarm/compression.py), for runs on narrow links
    "push_none": (dict(use_push=True, push_echo=False, verify_rate=0.0, compression="none"), {}),
    "push_auto": (dict(use_push=True, push_echo=False, verify_rate=0.0, compression="auto"), {}),
    "push_int8": (dict(use_push=True, push_echo=False, verify_rate=0.0, compression="int8"), {}),
}
DEFAULT_CONFIGS = "defaults,no_push,push_echo,push,push_spec"


def spans_for(servers: int, layers: int) -> list[str]:
    step = layers // servers
    return [f"{i * step}:{(i + 1) * step}" for i in range(servers)]


def run_swarm(model_dir: str, delay: float, spans: list[str], tokens: int, repeats: int, log_dir: str,
              downlink: float = 0.0, configs: dict | None = None, compression: str | None = None,
              link_bandwidth: float = 0.0) -> dict:
    from swarm import AutoDistributedModelForCausalLM
    from swarm.local_swarm import LocalSwarm
    from swarm.tiny import load_draft
    from swarm.wan import LinkShape

    from transformers import AutoModelForCausalLM

    configs = configs or {name: CONFIGS[name] for name in DEFAULT_CONFIGS.split(",")}
    common = {} if compression is None else {"compression": compression}
    if downlink:
        common["host_maddrs"] = (f"/ip4/{ACCESS_FROM}/tcp/0",)  # dials from there: the proxy knows the client
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    local.generation_config.eos_token_id = None
    draft = load_draft(model_dir, 2)
    prompt = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    expected = local.generate(prompt, max_new_tokens=tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    res: dict = {}
    shape = LinkShape(delay, link_bandwidth)
    # on narrow links servers publish their successors' bandwidth soon (compression needs it), not a minute late
    period = ["--update-period", "5"] if link_bandwidth else []
    with LocalSwarm(log_dir=log_dir, wan=shape) as swarm:
        swarm.start_dht()
        names = [f"server{i}" for i in range(len(spans))]
        if downlink:  # every server behind one proxy: what they send back to the client shares its downlink
            swarm.start_shared_proxy(names, shape, downlink, access_from=ACCESS_FROM)
        procs = [swarm.start_server(model_dir, span, "--num-threads", "1", "--throughput", "100", *period,
                                    wait=False, name=name) for name, span in zip(names, spans)]
        for proc in procs:
            proc.wait_for("Server ONLINE", 180)
        clients = {}
        for name, (options, _) in configs.items():
            clients[name] = AutoDistributedModelForCausalLM.from_pretrained(
                model_dir, initial_peers=swarm.initial_peers, **{**common, **options})
            clients[name].generation_config.eos_token_id = None
        times: dict[str, list[float]] = {name: [] for name in configs}
        stats = {"drafted": 0, "accepted": 0, "rounds": 0, "rejections": 0}
        exact = {name: True for name in configs}
        errors: dict[str, float] = {}
        compressed: dict[str, int] = {}
        try:
            if link_bandwidth:
                _wait_for_next_bandwidth(next(iter(clients.values())), len(spans))
            for repeat in range(repeats + 1):  # the first is a warm-up: connections, pings, caches
                for name, (_, options) in configs.items():
                    model = clients[name]
                    with model.inference_session(max_length=PROMPT + tokens) as session:
                        kwargs = dict(assistant_model=draft) if options.get("speculative") else {}
                        if repeat == 0 and not options.get("speculative"):  # warm-up: the logits' error too
                            kwargs = dict(output_logits=True, return_dict_in_generate=True)
                        t0 = time.perf_counter()
                        out = model.generate(prompt, max_new_tokens=tokens, do_sample=False, session=session,
                                             **kwargs)
                        elapsed = time.perf_counter() - t0
                    if repeat == 0 and not options.get("speculative"):
                        errors[name] = max((a - b).abs().max().item() for a, b in zip(out.logits, expected.logits))
                        compressed[name] = session.compressed_links
                        out = out.sequences
                    exact[name] = exact[name] and bool(torch.equal(out, expected.sequences))
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
                     "times_s": [round(t, 3) for t in values], "equal_local_greedy": exact[name]}
        if name in errors:  # the warm-up's logits against local transformers' (float32 on one machine)
            res[name]["max_logit_error"] = float(f"{errors[name]:.3g}")
            res[name]["compressed_links_warmup"] = compressed[name]
    if "push_spec" in res:
        res["push_spec"]["acceptance"] = round(stats["accepted"] / max(stats["drafted"], 1), 3)
        res["push_spec"]["agreement"] = round(stats["accepted"] / max(stats["accepted"] + stats["rejections"], 1), 3)
        res["push_spec"]["tokens_per_round"] = round(tokens * repeats / max(stats["rounds"], 1), 2)
    res["equal_local_greedy"] = all(exact.values())
    return res


def _wait_for_next_bandwidth(model, servers: int, timeout: float = 60) -> None:
    """Waits until every server but the last publishes its successors' bandwidth (compression chooses a
    scheme for a link by it; the servers announce every 5 s here)."""
    from client.loop import run_sync

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = run_sync(model.remote.servers(force=True))
        published = {peer for block, found in records.items() for peer, r in found.items() if r.next_bandwidth}
        if len(published) >= servers - 1:
            return
        time.sleep(1)
    print(f"servers did not publish their successors' bandwidth within {timeout:.0f}s", file=sys.stderr)


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
    parser.add_argument("--client-downlink", default="0",
                        help="bytes/s of the client's downlink, one link every server's answers share (0: none); "
                             "several, comma-separated, run one after another")
    parser.add_argument("--link-bandwidth", type=float, default=0.0, help="bytes/s of every server's link (0: unlimited)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size of the tiny model (4 heads)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"which configurations to run, of {list(CONFIGS)}")
    parser.add_argument("--compression", default=None, help="every client's compression (default: its default)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    parser.add_argument("--combine", nargs="+", default=None, metavar="REPORT",
                        help="run nothing: merge these reports (--out files) and compute floors and legs across them")
    args = parser.parse_args()
    if args.combine:
        runs = []
        for path in args.combine:
            with open(path) as f:
                runs += json.load(f)["runs"]
        report = {"combined": args.combine, "runs": runs}
        _finish(report, args.out)
        return
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
                    "tokens": args.tokens, "repeats": args.repeats, "runs": []}
    for downlink in [float(b) for b in args.client_downlink.split(",")]:
        for delay_ms in [float(d) for d in args.delays.split(",")]:
            for servers in [int(n) for n in args.servers.split(",")]:
                spans = spans_for(servers, layers)
                tag = f"d{delay_ms:g}_s{servers}_b{downlink:g}_l{args.link_bandwidth:g}"
                row: dict = {"delay_ms": delay_ms, "servers": servers, "spans": spans, "hidden": args.hidden,
                             "client_downlink_bytes_per_s": downlink,
                             "link_bandwidth_bytes_per_s": args.link_bandwidth,
                             "compression": args.compression or "auto", "tokens": args.tokens,
                             "repeats": args.repeats}
                if args.petals:
                    row["petals"] = run_petals_wan(model_dir, delay_ms / 1000, spans, args.workdir,
                                                   os.path.join(args.workdir, f"logs-petals-{tag}"))
                row.update(run_swarm(model_dir, delay_ms / 1000, spans, args.tokens, args.repeats,
                                     os.path.join(args.workdir, f"logs-{tag}{suffix}"), downlink, configs,
                                     args.compression, args.link_bandwidth))
                report["runs"].append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    _finish(report, args.out)


RATIOS = (("push", "defaults"), ("push", "no_push"), ("push", "push_echo"), ("push_spec", "push"),
          ("push_spec", "defaults"), ("defaults", "petals"), ("push", "petals"), ("push_spec", "petals"),
          ("push_auto", "push_none"), ("push_int8", "push_none"))


def _finish(report: dict, out: str | None) -> None:
    """Ratios of configurations measured in the same run, floors, legs; prints the report (and writes ``out``)."""
    from wan_floor import add_floors

    for row in report["runs"]:
        row["ratios"] = {f"{a}_over_{b}": round(row[a]["tokens_per_s"] / row[b]["tokens_per_s"], 2)
                         for a, b in RATIOS if a in row and b in row}
    report["legs_fit"] = add_floors(report["runs"])
    text = json.dumps(report, indent=1)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
