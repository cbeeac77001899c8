"""First contact: each common first mistake gets a short answer that names its fix, and the swarm
copes with what a new user does to it.

Every test runs the real command or the real client call and checks the exit code, that the
answer is a few lines without a traceback, and the fix it names. The command runs in this process
(``swarm.cli.main``, what the ``swarm`` script calls: :func:`run_swarm`) unless the test is about
the process itself (signals, what it imports): mistakes in flags are refused before torch is
imported, checked in one fresh interpreter for all of them; mistakes that only show when joining
run a real ``p2pd``. Tests that need a swarm share one (:func:`fc_swarm`): a DHT peer with an
identity file and two servers of a tiny Llama (with a tokenizer) placed automatically and started
at the same moment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from swarm.dht import join_failure
from swarm.errors import MissingBlocksError, ServerUnavailable
from swarm.local_swarm import LocalSwarm
from swarm.tiny import make_tiny_model, make_tiny_tokenizer

PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
PREFIX = "fc-llama"
EXAMPLES = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}."}
            for a in range(3) for b in range(3)]


@dataclasses.dataclass
class Result:
    rc: int
    out: str  # stdout and stderr
    seconds: float
    problems: tuple[str, ...] = ()  # log records at ERROR or with a traceback


def run_swarm(*args: str) -> Result:
    """``swarm ARGS`` in this process: ``swarm.cli.main``, with its output and every log record (hivemind's
    included) captured. The command's own logging setup is left out: in this process it would install
    handlers on streams that outlive the test; while it runs the root logger has no handler but the catcher
    (handlers earlier tests left there may write to closed streams)."""
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    import hivemind.utils.logging as hivemind_logging

    import swarm.cli

    records: list[logging.LogRecord] = []
    catcher = logging.Handler(logging.INFO)
    catcher.emit = records.append  # type: ignore[method-assign]
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, hivemind_logging._current_mode, swarm.cli._setup_logging,
             swarm.cli._route_hivemind_logs)
    swarm.cli._setup_logging = lambda verbose: None
    swarm.cli._route_hivemind_logs = lambda: hivemind_logging.use_hivemind_log_handler("nowhere")  # to the root
    root.handlers = [catcher]
    root.setLevel(logging.INFO)
    out = io.StringIO()
    t0 = time.monotonic()
    try:
        with redirect_stdout(out), redirect_stderr(out):
            try:
                rc = swarm.cli.main(list(args))
            except SystemExit as e:  # argparse: --version, --help
                rc = e.code if isinstance(e.code, int) else 2
    finally:
        handlers, level, mode, swarm.cli._setup_logging, swarm.cli._route_hivemind_logs = saved
        hivemind_logging.use_hivemind_log_handler(mode)  # before the root's level: it sets that level
        root.handlers = handlers
        root.setLevel(level)
    problems = tuple(f"{r.levelname} {r.name}: {r.getMessage()}"
                     + ("".join(traceback.format_exception(*r.exc_info)) if r.exc_info else "")
                     for r in records if r.levelno >= logging.ERROR or r.exc_info)
    return Result(rc, out.getvalue(), time.monotonic() - t0, problems)


def assert_short_answer(result: Result, *fixes: str, rc: int = 2, max_lines: int = 3) -> None:
    """Exit code ``rc``, no traceback or ERROR log, at most ``max_lines`` lines, the last one the error naming
    ``fixes``."""
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert result.rc == rc, result.out[-3000:]
    assert not result.problems, result.problems
    assert "Traceback" not in result.out and len(lines) <= max_lines, result.out[-3000:]
    assert lines[-1].startswith("error: "), result.out[-3000:]
    for fix in fixes:
        assert fix in lines[-1], f"{fix!r} not in {lines[-1]!r}"


def signal_group_when(args: list[str], log_path, sig: int, ready, timeout: float = 120) -> tuple[int, str]:
    """Runs ``swarm ARGS`` in a process group of its own, sends ``sig`` to the whole group once
    ``ready(log)`` is true, and returns (exit code, log)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "swarm.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + timeout
        while not ready(log_path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return rc, log_path.read_text()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def down_peer() -> str:
    """The address of a peer that is not running: nobody listens on the port."""
    return f"/ip4/127.0.0.1/tcp/{closed_port()}/p2p/{PEER_ID}"


# ---------------------------------------------------------------- flags, refused before torch loads

_NO_TORCH = """
import contextlib, io, json, sys, time
from swarm.cli import main
answers = {}
for name, args in json.loads(sys.argv[1]).items():
    out, t0 = io.StringIO(), time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code
    answers[name] = [rc, out.getvalue(), time.monotonic() - t0]
imported = [m for m in ("torch", "hivemind", "transformers") if m in sys.modules]
print(json.dumps({"answers": answers, "imported": imported}))
"""

FLAG_MISTAKES = {  # name: (args, what the answer names)
    "blocks-abc": (["serve", "--model", "Qwen/Qwen2.5-7B-Instruct", "--blocks", "abc"],
                   ["--blocks 'abc' is not START:END"]),
    "num-blocks-0": (["serve", "--model", "Qwen/Qwen2.5-7B-Instruct", "--num-blocks", "0"],
                     ["--num-blocks must be positive"]),
    "mistyped-path": (["serve", "--model", "/no/such/models/tiny-llama"], ["no such directory", "hub id"]),
    "no-config-json": (["serve", "--model", "{empty}"], ["has no config.json", "pass the directory that holds"]),
    "a-file": (["serve", "--model", "{file}"], ["is a file: pass the directory"]),
    "gguf-not-there": (["serve", "--model", "{empty}/model.Q4_K_M.gguf"],
                       ["does not exist", "--model ORG/REPO --gguf-file NAME.gguf"]),
    "gguf-file-not-in-dir": (["serve", "--model", "{empty}", "--gguf-file", "model.Q4_K_M.gguf"],
                             ["has no GGUF file 'model.Q4_K_M.gguf' (--gguf-file)"]),
    "bad-ip": (["serve", "--model", "Qwen/Qwen2.5-7B-Instruct", "--initial-peers",
                f"/ip4/300.0.0.1/tcp/31337/p2p/{PEER_ID}"],
               ["--initial-peers", "'300.0.0.1' is not an IPv4 address", "as printed by `swarm dht` or `swarm serve`"]),
    "not-a-multiaddr": (["health", "--initial-peers", "10.0.0.5:31337"],
                        ["--initial-peers '10.0.0.5:31337' is not a full multiaddr"]),
    "finetune-path": (["finetune", "--model", "./no-such-dir", "--data", "d.json", "--output", "o", "--initial-peers",
                       f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"], ["no such directory"]),
}


@pytest.fixture(scope="module")
def flag_answers(tmp_path_factory) -> tuple[dict[str, Result], list[str]]:
    """Every mistake of :data:`FLAG_MISTAKES` and ``--version`` (and the old ``--prefix``) answered by one fresh
    interpreter, which says afterwards which heavy packages it imported: (answers by name, those packages)."""
    root = tmp_path_factory.mktemp("flags")
    (root / "weights").mkdir()  # a directory without config.json
    (root / "model.safetensors").write_bytes(b"")  # a file where the directory was due
    cases = {name: [a.replace("{empty}", str(root / "weights")).replace("{file}", str(root / "model.safetensors"))
                    for a in args] for name, (args, _) in FLAG_MISTAKES.items()}
    cases["version"] = ["--version"]
    cases["old-prefix"] = ["serve", "--model", "Qwen/Qwen2.5-7B-Instruct", "--prefix", "x", "--blocks", "9"]
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    return {name: Result(*answer) for name, answer in report["answers"].items()}, report["imported"]


def test_version(flag_answers):
    answers, _ = flag_answers
    assert answers["version"].rc == 0 and answers["version"].out.strip() == "swarm 0.1.0"


@pytest.mark.parametrize("name", FLAG_MISTAKES)
def test_mistyped_flags_are_refused_before_torch_loads(flag_answers, name):
    answers, imported = flag_answers
    assert imported == []  # none of the commands imported torch, hivemind or transformers
    assert_short_answer(answers[name], *FLAG_MISTAKES[name][1])
    assert answers[name].seconds < 1  # argparse and a few stat calls: milliseconds


def test_old_prefix_flag_still_works_with_a_note(flag_answers):
    answers, _ = flag_answers
    result = answers["old-prefix"]
    assert "note: --prefix is deprecated; use --dht-prefix" in result.out
    assert result.rc == 2 and "--blocks '9' is not START:END" in result.out


# ---------------------------------------------------------------- joining: the one message of every role


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / PREFIX)
    make_tiny_model(path, "llama")
    make_tiny_tokenizer(path, texts=[f"{e['instruction']} {e['output']}" for e in EXAMPLES])
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(EXAMPLES))
    return str(path)


@pytest.mark.integration
def test_unreachable_initial_peers_get_the_same_answer_in_every_role(chat_llama, data_file, tmp_path):
    peer = down_peer()
    message = join_failure([peer], "failed to connect to bootstrap peers")
    serve = run_swarm("serve", "--model", chat_llama, "--blocks", "0:4", "--device", "cpu", "--initial-peers", peer)
    assert_short_answer(serve, message)
    health = run_swarm("health", "--initial-peers", peer, "--port", "0")
    assert_short_answer(health, message)
    output = tmp_path / "adapter"
    finetune = run_swarm("finetune", "--model", chat_llama, "--data", data_file, "--output", str(output),
                         "--initial-peers", peer)
    assert_short_answer(finetune, message)
    assert not output.exists()  # joining comes before anything is written

    from swarm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(chat_llama, initial_peers=[peer])
    try:
        with pytest.raises(ServerUnavailable) as info, torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        assert str(info.value) == message
    finally:
        model.shutdown()


@pytest.mark.integration
def test_a_malformed_peer_id_is_refused_in_one_line():
    # the IP and port are checked before torch loads; the peer id only p2pd can judge (a multihash)
    result = run_swarm("dht", "--initial-peers", f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID[:-3]}")
    assert_short_answer(result, f'failed to parse multiaddr "/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID[:-3]}"',
                        "as printed by `swarm dht` or `swarm serve`")


@pytest.mark.integration
def test_a_busy_port_is_refused(chat_llama):
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_swarm("serve", "--model", chat_llama, "--blocks", "0:4", "--device", "cpu", "--port", str(port))
        assert_short_answer(result, f"port {port} is already in use", "pass another --port")
        result = run_swarm("dht", "--port", str(port))
        assert_short_answer(result, f"port {port} is already in use")


@pytest.mark.integration
def test_finetune_refuses_a_model_without_a_tokenizer(tiny_llama, data_file, tmp_path):
    output = tmp_path / "adapter"
    result = run_swarm("finetune", "--model", tiny_llama, "--data", data_file, "--output", str(output),
                       "--initial-peers", down_peer())
    assert_short_answer(result, "has no tokenizer", "copy the base model's tokenizer files")
    assert not output.exists()


@pytest.mark.integration
@pytest.mark.parametrize("when", ["importing", "joining"])
def test_ctrl_c_in_the_first_seconds_prints_no_traceback(tiny_llama, tmp_path, when):
    args = ["serve", "--model", tiny_llama, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--num-threads", "1"]
    started = time.monotonic()
    rc, text = signal_group_when(args, tmp_path / "serve.log", signal.SIGINT,  # what a terminal does
                                 lambda log: time.monotonic() - started > 0.3 if when == "importing"
                                 else "Started a new swarm" in log)
    assert rc in (0, 130) and "Traceback" not in text and "ERROR" not in text, text[-3000:]


# ---------------------------------------------------------------- mistakes that need a swarm


@pytest.fixture(scope="module")
def fc_swarm(chat_llama, tmp_path_factory):
    """A DHT peer (with an identity file) and two servers started at the same moment, each asked for 2 of
    the 4 blocks and left to place themselves; small KV caches (256 tokens)."""
    root = tmp_path_factory.mktemp("first-contact")
    identity = str(root / "dht.key")
    with LocalSwarm(log_dir=str(root)) as swarm:
        swarm.start_dht("--identity-path", identity)
        servers = [swarm.start_server(chat_llama, None, "--num-blocks", "2", "--cache-tokens", "256", "--throughput",
                                      "100", "--num-threads", "1", wait=False, name=f"auto{i}") for i in range(2)]
        lines = [proc.wait_for("Server ONLINE", 180) for proc in servers]
        yield swarm, identity, lines


def _span(line: str) -> str:
    return re.search(r"blocks (\d+:\d+)", line)[1]


@pytest.mark.integration
def test_servers_started_together_split_the_model_at_once(fc_swarm):
    swarm, _, lines = fc_swarm
    assert sorted(_span(line) for line in lines) == ["0:2", "2:4"], lines
    for proc in swarm.procs[1:3]:
        assert "Moving from" not in proc.log()  # placed before loading, not moved by rebalancing later


@pytest.mark.integration
def test_swarm_models_lists_what_the_swarm_serves(fc_swarm):
    swarm, _, _ = fc_swarm
    result = run_swarm("models", "--initial-peers", *swarm.initial_peers)
    assert result.rc == 0 and "Traceback" not in result.out and not result.problems, result.out
    assert f"'{PREFIX}' (" in result.out and "llama, 4 blocks, 2 server(s)): healthy" in result.out


@pytest.mark.integration
def test_the_client_finds_the_model_in_a_folder_of_another_name(fc_swarm, chat_llama, tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    from swarm import AutoDistributedModelForCausalLM

    swarm, _, _ = fc_swarm
    copy = shutil.copytree(chat_llama, tmp_path / "my-copy-of-the-weights")
    model = AutoDistributedModelForCausalLM.from_pretrained(str(copy), initial_peers=swarm.initial_peers)
    try:
        model.generation_config.eos_token_id = None
        prompt = torch.tensor([[5, 6, 7, 8]])
        with caplog.at_level(logging.WARNING, logger="client.routing"):
            out = model.generate(prompt, max_new_tokens=5, do_sample=False)
        local = AutoModelForCausalLM.from_pretrained(chat_llama, dtype=torch.float32).eval()
        local.generation_config.eos_token_id = None
        assert out.tolist() == local.generate(prompt, max_new_tokens=5, do_sample=False).tolist()
        assert model.remote.prefix == PREFIX
        assert any(f"using '{PREFIX}'" in r.getMessage() and "dht_prefix" in r.getMessage() for r in caplog.records)
    finally:
        model.shutdown()


@pytest.mark.integration
def test_missing_blocks_name_the_prefix_and_the_models_served(fc_swarm, chat_llama):
    from swarm import AutoDistributedModelForCausalLM

    swarm, _, _ = fc_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(chat_llama, initial_peers=swarm.initial_peers,
                                                            dht_prefix="no-such-model", missing_blocks_timeout=1)
    try:
        with pytest.raises(MissingBlocksError) as info, torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        message = str(info.value)
        assert "blocks 0:4" in message and "0 server(s) seen" in message and "free cache" not in message
        assert f"Looked under DHT prefix 'no-such-model', which no server announced; the swarm serves '{PREFIX}'" \
            in message and "pass dht_prefix=" in message

        model.remote.prefix = PREFIX  # the right model, but a session longer than the servers' caches
        with pytest.raises(MissingBlocksError) as info, model.inference_session(max_length=300) as session:
            session.step(torch.zeros(1, 1, 64))
        assert "no online server with 300 free cache tokens: their servers have at most 256 free" in str(info.value)
    finally:
        model.shutdown()


@pytest.mark.integration
def test_the_same_identity_twice_and_a_port_in_use_are_refused(fc_swarm, chat_llama):
    swarm, identity, _ = fc_swarm
    args = ["serve", "--model", chat_llama, "--blocks", "0:1", "--device", "cpu", "--initial-peers",
            *swarm.initial_peers]
    result = run_swarm(*args, "--identity-path", identity)
    assert_short_answer(result, f"--identity-path {identity} is in use by another peer", "its own identity file")
    dht_port = int(swarm.initial_peers[0].split("/")[4])  # two servers silently sharing a port, unless refused
    result = run_swarm(*args, "--port", str(dht_port))
    assert_short_answer(result, f"port {dht_port} is already in use")


def _seed_throughput_cache(cache_dir, model: str) -> tuple[str, float]:
    """A throughput cache in ``cache_dir`` whose entry for ``model``'s blocks (on this CPU, float32, one
    thread: what a server started with --num-threads 1 looks up) says 1 token/s: (its key, that value)."""
    from server import throughput as probe
    from swarm.devices import adapt_to_device
    from swarm.models import load_config

    config = load_config(model)
    adapt_to_device(config, torch.device("cpu"))
    key = probe.speed_key(config, torch.device("cpu"), torch.float32, 1)
    probe.store_cached(key, probe.ComputeSpeed(1.0, 1.0), cache_dir / probe.CACHE_FILE)
    return key, 1.0


@pytest.mark.integration
def test_sigterm_to_the_whole_process_group_leaves_cleanly(fc_swarm, chat_llama, tmp_path):
    from server import throughput as probe
    from swarm.dht import NetworkConfig, Peer, fetch_servers
    from swarm.records import ServerState

    swarm, _, _ = fc_swarm
    key, busy = _seed_throughput_cache(tmp_path, chat_llama)  # as if measured while the machine was busy
    proc = swarm.start_server(chat_llama, "0:1", "--num-threads", "1", "--remeasure-throughput", name="leaver",
                              env={probe.CACHE_DIR_ENV: str(tmp_path)})
    peer_id = proc.wait_for("Server ONLINE", 5).rsplit(" as ", 1)[1].strip()
    daemons = _p2pd_children(proc.popen.pid)
    assert daemons and all(os.getpgid(d) != proc.popen.pid for d in daemons)  # p2pd runs in a group of its own
    os.killpg(proc.popen.pid, signal.SIGTERM)  # systemd, `timeout`, `kill -- -PGID`
    assert proc.popen.wait(30) == 0
    log = proc.log()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    # --remeasure-throughput measured although the cache had this setup, and replaced the busy value
    entries = json.loads((tmp_path / probe.CACHE_FILE).read_text())["entries"]
    assert "(measured in" in log and list(entries) == [key] and entries[key]["forward_rps"] != busy
    assert all(not os.path.exists(f"/proc/{d}") or _zombie(d) for d in daemons), "p2pd outlived its server"

    async def announced_state() -> ServerState:
        peer = await Peer.start(NetworkConfig(initial_peers=tuple(swarm.initial_peers),
                                              host_maddrs=("/ip4/127.0.0.1/tcp/0",), client_mode=True))
        try:
            return (await fetch_servers(peer, PREFIX, [0]))[0][peer_id].state
        finally:
            await peer.shutdown()

    assert asyncio.run(asyncio.wait_for(announced_state(), 60)) == ServerState.OFFLINE


def _p2pd_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "p2pd"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


@pytest.mark.integration
def test_finetune_leaves_a_checkpoint_on_sigterm(fc_swarm, chat_llama, data_file, tmp_path):
    swarm, _, _ = fc_swarm
    output = tmp_path / "adapter"
    args = ["finetune", "--model", chat_llama, "--data", data_file, "--output", str(output), "--initial-peers",
            *swarm.initial_peers, "--epochs", "200", "--save-every", "100000"]
    rc, text = signal_group_when(args, tmp_path / "finetune.log", signal.SIGTERM,
                                 lambda log: re.search(r"\| *[1-9]\d*/\d+ \[", log))  # the progress bar: a step done
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    step = int(re.search(r"Interrupted at step (\d+); run the same command again to resume", text)[1])
    assert step >= 1 and (output / f"checkpoint-{step}" / "trainer_state.json").is_file()


# ---------------------------------------------------------------- several roles on one machine share the cores


def test_local_roles_share_the_cores_out(monkeypatch, tmp_path):
    import swarm.local_swarm as local_swarm

    monkeypatch.setattr(local_swarm.os, "cpu_count", lambda: 2)
    assert local_swarm.threads_per_process(3) == 1 and local_swarm.threads_per_process(1) == 2
    monkeypatch.setattr(local_swarm.os, "cpu_count", lambda: 16)
    assert local_swarm.threads_per_process(3) == 5
    started: list[list[str]] = []
    monkeypatch.setattr(LocalSwarm, "_spawn", lambda self, name, args, env=None: started.append(args))
    with LocalSwarm(log_dir=str(tmp_path), threads=5) as swarm:
        swarm.start_server("m", "0:1", wait=False)
        swarm.start_server("m", "1:2", "--num-threads", "2", wait=False)  # a server's own flag wins
    assert started[0][started[0].index("--num-threads") + 1] == "5" and started[1].count("--num-threads") == 1
