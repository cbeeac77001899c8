"""First contact: each common first mistake gets a short answer that names its fix, and the swarm
copes with what a new user does to it.

Every test runs the real command (``python -m swarm.cli ...``) or the real client call and checks
the exit code, that the answer is a few lines without a traceback, and the fix it names. Mistakes
in flags are refused before torch is imported (checked, not timed); mistakes that only show when
joining run a real ``p2pd``. Tests that need a swarm share one (:func:`fc_swarm`): a DHT peer with
an identity file and two servers of a tiny Llama (with a tokenizer) placed automatically and
started at the same moment.
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
    out: str
    seconds: float


def swarm_command(*args: str, timeout: float = 120) -> Result:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "swarm.cli", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    return Result(done.returncode, done.stdout + done.stderr, time.monotonic() - t0)


def assert_short_answer(result: Result, *fixes: str, rc: int = 2, max_lines: int = 3) -> None:
    """Exit code ``rc``, no traceback, at most ``max_lines`` lines, the last one the error naming ``fixes``."""
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert result.rc == rc, result.out[-3000:]
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
import sys, json
from swarm.cli import main
rc = main(json.loads(sys.argv[1]))
print("imported: " + " ".join(m for m in ("torch", "hivemind", "transformers") if m in sys.modules))
sys.exit(rc)
"""


def run_cli_without_torch(args: list[str]) -> tuple[Result, str]:
    """``swarm ARGS`` in a Python that says afterwards which heavy packages it imported: (result, their names)."""
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps(args)], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    imported = done.stdout.splitlines()[-1].removeprefix("imported:").strip()
    return Result(done.returncode, done.stderr, time.monotonic() - t0), imported


def test_version():
    result = swarm_command("--version")
    assert result.rc == 0 and result.out.strip() == "swarm 0.1.0"


@pytest.mark.parametrize("args, fixes", [
    (["serve", "--model", "Qwen/Qwen2.5-7B-Instruct", "--blocks", "abc"], ["--blocks 'abc' is not START:END"]),
    (["serve", "--model", "Qwen/Qwen2.5-7B-Instruct", "--num-blocks", "0"], ["--num-blocks must be positive"]),
    (["serve", "--model", "/no/such/models/tiny-llama"], ["no such directory", "hub id"]),
    (["serve", "--model", "{empty}"], ["has no config.json", "pass the directory that holds"]),
    (["serve", "--model", "{file}"], ["is a file: pass the directory"]),
    (["serve", "--model", "Qwen/Qwen2.5-7B-Instruct", "--initial-peers", f"/ip4/300.0.0.1/tcp/31337/p2p/{PEER_ID}"],
     ["--initial-peers", "'300.0.0.1' is not an IPv4 address", "as printed by `swarm dht` or `swarm serve`"]),
    (["health", "--initial-peers", "10.0.0.5:31337"], ["--initial-peers '10.0.0.5:31337' is not a full multiaddr"]),
    (["finetune", "--model", "./no-such-dir", "--data", "d.json", "--output", "o", "--initial-peers",
      f"/ip4/127.0.0.1/tcp/1/p2p/{PEER_ID}"], ["no such directory"]),
], ids=["blocks-abc", "num-blocks-0", "mistyped-path", "no-config-json", "a-file", "bad-ip", "not-a-multiaddr",
        "finetune-path"])
def test_mistyped_flags_are_refused_before_torch_loads(args, fixes, tmp_path):
    (tmp_path / "weights").mkdir()  # a directory without config.json
    (tmp_path / "model.safetensors").write_bytes(b"")  # a file where the directory was due
    args = [a.replace("{empty}", str(tmp_path / "weights")).replace("{file}", str(tmp_path / "model.safetensors"))
            for a in args]
    result, imported = run_cli_without_torch(args)
    assert imported == "", result.out  # refused before any heavy import
    assert_short_answer(result, *fixes)
    assert result.seconds < 3  # a Python start and argparse: ~0.2 s here


def test_old_prefix_flag_still_works_with_a_note():
    result, _ = run_cli_without_torch(["serve", "--model", "Qwen/Qwen2.5-7B-Instruct", "--prefix", "x", "--blocks",
                                       "9"])
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
    serve = swarm_command("serve", "--model", chat_llama, "--blocks", "0:4", "--device", "cpu", "--initial-peers", peer)
    assert_short_answer(serve, message)
    health = swarm_command("health", "--initial-peers", peer, "--port", "0")
    assert_short_answer(health, message)
    output = tmp_path / "adapter"
    finetune = swarm_command("finetune", "--model", chat_llama, "--data", data_file, "--output", str(output),
                             "--initial-peers", peer)
    assert_short_answer(finetune, message, max_lines=5)  # after the data and LoRA lines it logs
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
def test_a_busy_port_is_refused(chat_llama):
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = swarm_command("serve", "--model", chat_llama, "--blocks", "0:4", "--device", "cpu", "--port",
                               str(port))
        assert_short_answer(result, f"port {port} is already in use", "pass another --port")
        result = swarm_command("dht", "--port", str(port))
        assert_short_answer(result, f"port {port} is already in use")


@pytest.mark.integration
def test_finetune_refuses_a_model_without_a_tokenizer(tiny_llama, data_file, tmp_path):
    output = tmp_path / "adapter"
    result = swarm_command("finetune", "--model", tiny_llama, "--data", data_file, "--output", str(output),
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
    result = swarm_command("models", "--initial-peers", *swarm.initial_peers)
    assert result.rc == 0 and "Traceback" not in result.out, result.out
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
        with caplog.at_level(logging.WARNING, logger="client.remote_sequence"):
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
    result = swarm_command(*args, "--identity-path", identity)
    assert_short_answer(result, f"--identity-path {identity} is in use by another peer", "its own identity file")
    dht_port = int(swarm.initial_peers[0].split("/")[4])  # two servers silently sharing a port, unless refused
    result = swarm_command(*args, "--port", str(dht_port))
    assert_short_answer(result, f"port {dht_port} is already in use")


@pytest.mark.integration
def test_sigterm_to_the_whole_process_group_leaves_cleanly(fc_swarm, chat_llama):
    from swarm.dht import NetworkConfig, Peer, fetch_servers
    from swarm.records import ServerState

    swarm, _, _ = fc_swarm
    proc = swarm.start_server(chat_llama, "0:1", "--num-threads", "1", "--remeasure-throughput", name="leaver")
    peer_id = proc.wait_for("Server ONLINE", 5).rsplit(" as ", 1)[1].strip()
    daemons = _p2pd_children(proc.popen.pid)
    assert daemons and all(os.getpgid(d) != proc.popen.pid for d in daemons)  # p2pd runs in a group of its own
    os.killpg(proc.popen.pid, signal.SIGTERM)  # systemd, `timeout`, `kill -- -PGID`
    assert proc.popen.wait(30) == 0
    log = proc.log()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]
    assert "(measured in" in log  # --remeasure-throughput measured although the cache had this setup
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
