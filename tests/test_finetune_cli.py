"""``swarm finetune`` end to end on real peers: a DHT peer and two servers of a tiny Llama (with a
tokenizer and chat template built on the fly), a 20-example alpaca file, the command as a user runs
it. One run goes straight through; another is killed (SIGKILL, whole process group) after its first
checkpoint and run again: it resumes from the latest checkpoint and ends at the same step with the
same adapter as the run that was never interrupted (dropout 0, float32: the servers compute the same).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from swarm.local_swarm import LocalSwarm
from swarm.tiny import make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.integration

EXAMPLES = [{"instruction": f"What is {a} plus {b}?", "input": "" if a % 2 else "Answer briefly.",
             "output": f"{a} plus {b} is {a + b}."} for a in range(4) for b in range(5)]
EPOCHS, SAVE_EVERY = 3, 5
TOTAL_STEPS = EPOCHS * len(EXAMPLES)
RUN_TIMEOUT = 150


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("models") / "tiny-chat-llama")
    make_tiny_model(path, "llama", initializer_range=0.2)  # a head with room to fit the data (0.02: ~0.1 nats)
    make_tiny_tokenizer(path, texts=[f"{e['instruction']} {e['input']} {e['output']}" for e in EXAMPLES])
    return path


@pytest.fixture(scope="module")
def chat_swarm(chat_llama, tmp_path_factory):
    with LocalSwarm(log_dir=str(tmp_path_factory.mktemp("finetune-swarm"))) as swarm:
        swarm.start_dht()
        for span in ("0:2", "2:4"):
            swarm.start_server(chat_llama, span, "--num-threads", "1", "--throughput", "100", wait=False)
        for proc in swarm.procs[1:]:
            proc.wait_for("Server ONLINE", 180)
        yield swarm


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(EXAMPLES, indent=1))
    return str(path)


def finetune(model: str, data: str, output: str, swarm: LocalSwarm, log_path: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "swarm.cli", "finetune", "--model", model, "--data", data, "--output", output,
            "--initial-peers", *swarm.initial_peers, "--epochs", str(EPOCHS), "--save-every", str(SAVE_EVERY),
            "--lr", "0.01", "--lora-dropout", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log_path, "w") as log:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def wait(proc: subprocess.Popen, log_path: str) -> str:
    try:
        proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log = open(log_path, errors="replace").read()
    assert proc.returncode == 0, f"swarm finetune exited with {proc.returncode}; its log:\n{log[-4000:]}"
    return log


def trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


def test_finetune_runs_end_to_end_and_resumes_after_kill(chat_llama, chat_swarm, data_file, tmp_path):
    # one run straight through
    whole = str(tmp_path / "whole")
    t0 = time.monotonic()
    log = wait(finetune(chat_llama, data_file, whole, chat_swarm, str(tmp_path / "whole.log")),
               str(tmp_path / "whole.log"))
    whole_s = time.monotonic() - t0
    assert f"Done: {TOTAL_STEPS} steps" in log and "Resuming" not in log
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json",
            "tokenizer_config.json"} <= set(os.listdir(whole))
    state = trainer_state(whole)
    assert state["step"] == TOTAL_STEPS
    losses = [entry["loss"] for entry in state["log_history"]]
    first, last = sum(losses[:len(EXAMPLES)]) / len(EXAMPLES), sum(losses[-len(EXAMPLES):]) / len(EXAMPLES)
    assert last < 0.8 * first, f"the loss did not go down: epoch means {first:.3f} -> {last:.3f}"
    assert f"checkpoint-{TOTAL_STEPS}" in os.listdir(whole)
    with open(os.path.join(whole, "adapter_config.json")) as f:
        adapter_config = json.load(f)
    assert adapter_config["r"] == 8 and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]  # found in the block

    # another run, killed after its first checkpoint, then started again
    killed = str(tmp_path / "killed")
    log_path = str(tmp_path / "killed.log")
    proc = finetune(chat_llama, data_file, killed, chat_swarm, log_path)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not os.path.isdir(os.path.join(killed, f"checkpoint-{SAVE_EVERY}")):
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{open(log_path).read()[-3000:]}"
        assert time.monotonic() < deadline, f"no checkpoint within {RUN_TIMEOUT}s:\n{open(log_path).read()[-3000:]}"
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its p2pd
    proc.wait(10)
    saved = max(int(name.split("-")[1]) for name in os.listdir(killed) if name.startswith("checkpoint-"))
    assert SAVE_EVERY <= saved < TOTAL_STEPS

    t0 = time.monotonic()
    log = wait(finetune(chat_llama, data_file, killed, chat_swarm, str(tmp_path / "resumed.log")),
               str(tmp_path / "resumed.log"))
    resumed_s = time.monotonic() - t0
    assert f"Resuming from {os.path.join(killed, f'checkpoint-{saved}')}: step {saved} of {TOTAL_STEPS}" in log
    assert f"Done: {TOTAL_STEPS} steps" in log
    resumed = trainer_state(killed)
    assert resumed["step"] == TOTAL_STEPS
    assert [entry["step"] for entry in resumed["log_history"]] == list(range(1, TOTAL_STEPS + 1))
    # the same run: same data order, same optimizer state, same adapter (up to float noise)
    assert resumed["log_history"][-1]["loss"] == pytest.approx(state["log_history"][-1]["loss"], rel=1e-3)
    mine = load_file(os.path.join(killed, "adapter_model.safetensors"))
    theirs = load_file(os.path.join(whole, "adapter_model.safetensors"))
    assert mine.keys() == theirs.keys()
    for name in theirs:
        assert torch.allclose(mine[name], theirs[name], rtol=1e-3, atol=1e-5), name
    print(f"\nwhole run {whole_s:.1f}s, resumed run {resumed_s:.1f}s")
