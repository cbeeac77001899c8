"""The Petals side of ``bench_training.py``: Petals 2.2 deep prompt tuning on 127.0.0.1.

Runs in Petals' own venv (the one ``../shared/bench/petals_baseline.sh`` builds, pinned transformers
4.34 and hivemind 1.1.9): a DHT peer and servers started here, each in its own process group, and a
training client script written to the work directory; every group is stopped and the unix
sockets its daemons leave are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import time

import torch

from swarm.dht import clean_peer_sockets, peer_sockets
from swarm.local_swarm import _die_with_parent

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE_SCRIPT = os.path.join(HERE, "..", "..", "shared", "bench", "petals_baseline.sh")


PETALS_CLIENT = r'''"""Petals 2.2 deep prompt tuning training steps (written by Swarm's benchmarks/bench_training.py).
usage: python petals_train_client.py <model_dir> <initial_peer> <dht_prefix> <config json>"""
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import petals_shim  # noqa: F401,E402  (torch>=2.3 compat for hivemind 1.1.9)

import torch  # noqa: E402

M, PEER, PREFIX, CFG = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
torch.set_num_threads(CFG["client_threads"])
from petals import AutoDistributedModelForCausalLM  # noqa: E402

RES = {"client_threads": CFG["client_threads"]}
t = time.perf_counter()
model = AutoDistributedModelForCausalLM.from_pretrained(M, initial_peers=[PEER], dht_prefix=PREFIX,
                                                        torch_dtype=torch.float32, tuning_mode="deep_ptune",
                                                        pre_seq_len=CFG["pre_seq_len"])
RES["client_from_pretrained_s"] = round(time.perf_counter() - t, 3)
init = torch.load(CFG["init"])
prompts, deep = init["prompts"], init["deep"]  # [tokens, hidden], [blocks, tokens, hidden]
with torch.no_grad():
    model.model.prompt_embeddings.weight.copy_(prompts)
    # Petals keeps them as [tokens, blocks * hidden] and views them as [batch, tokens, blocks, hidden]
    model.model.intermediate_prompt_embeddings.weight.copy_(deep.permute(1, 0, 2).reshape(deep.shape[1], -1))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
RES["trainable_params"] = sum(p.numel() for p in params)
optimizer = torch.optim.AdamW(params, lr=CFG["lr"])
B, L = CFG["batch"], CFG["seq_len"]
fwd_bwd, steps, losses = [], [], []
for i in range(CFG["warmup"] + CFG["steps"]):
    ids = torch.randint(3, 1000, (B, L), generator=torch.Generator().manual_seed(1000 + i))
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    t1 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad()
    t2 = time.perf_counter()
    losses.append(loss.item())
    if i >= CFG["warmup"]:
        fwd_bwd.append(t1 - t0)
        steps.append(t2 - t0)
RES.update({
    "tokens_per_step": B * L,
    "fwd_bwd_tokens_per_s_median": round(B * L / statistics.median(fwd_bwd), 1),
    "s_per_optimizer_step_median": round(statistics.median(steps), 4),
    "step_times_s": [round(t, 4) for t in steps],
    "losses": [round(x, 6) for x in losses],
    "first_step_loss": losses[0],
})
print("PETALS_TRAIN_JSON " + json.dumps(RES), flush=True)
os._exit(0)  # skip hivemind's slow shutdown of the client DHT
'''

PETALS_SHIM = '''"""torch>=2.3 compat for hivemind 1.1.9 (as in petals_baseline.sh)."""
import runpy
import sys

import torch.amp.grad_scaler as _gs
import torch.cuda.amp.grad_scaler as _cgs

if not hasattr(_cgs, "_refresh_per_optimizer_state"):
    _cgs._refresh_per_optimizer_state = _gs._refresh_per_optimizer_state

if __name__ == "__main__":
    _mod = sys.argv[1]
    sys.argv = [_mod] + sys.argv[2:]
    runpy.run_module(_mod, run_name="__main__", alter_sys=True)
'''

SAVE_TINY_LLAMA = '''import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
LlamaForCausalLM(cfg).eval().save_pretrained(sys.argv[1], safe_serialization=True)
'''


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PetalsProcs:
    """Petals processes, each in its own session (process group); :meth:`close` stops every group."""

    def __init__(self, run_dir: str, env: dict):
        self.run_dir, self.env = run_dir, env
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def spawn(self, name: str, cmd: list[str]) -> str:
        log_path = os.path.join(self.run_dir, f"{name}.log")
        with open(log_path, "w") as log:
            popen = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        self.procs.append((name, popen))
        return log_path

    def wait_for(self, name: str, pattern: str, timeout: float) -> re.Match:
        popen = dict(self.procs)[name]
        log_path = os.path.join(self.run_dir, f"{name}.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(log_path, errors="replace") as f:
                match = re.search(pattern, f.read())
            if match:
                return match
            if popen.poll() is not None:
                break
            time.sleep(0.2)
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        state = f"exited with code {popen.returncode}" if popen.poll() is not None else f"timed out ({timeout:.0f}s)"
        raise RuntimeError(f"Petals {name} {state} before printing {pattern!r}; its log:\n{tail}")

    def close(self) -> None:
        for _, popen in reversed(self.procs):
            try:
                os.killpg(popen.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        for _, popen in self.procs:
            try:
                popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _, popen in self.procs:  # p2pd children, or a process that ignored SIGTERM
            try:
                os.killpg(popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                pass


def ensure_petals(workdir: str) -> tuple[str, str, str, dict]:
    """The Petals venv's python, the shim, the model dir (written by Petals' transformers 4.34) and
    what was done to get them."""
    info: dict = {}
    venv_python = os.path.join(workdir, "venv-petals", "bin", "python")
    if not os.path.exists(venv_python):
        t0 = time.monotonic()
        out = subprocess.run(["bash", BASELINE_SCRIPT, workdir], capture_output=True, text=True, timeout=2400,
                             start_new_session=True)
        info["ran_petals_baseline_sh_s"] = round(time.monotonic() - t0, 1)
        if not os.path.exists(venv_python):
            raise RuntimeError(f"petals_baseline.sh did not create {venv_python} (code {out.returncode}):\n"
                               f"{(out.stdout + out.stderr)[-3000:]}")
    shim = os.path.join(workdir, "petals_shim.py")
    if not os.path.exists(shim):
        with open(shim, "w") as f:
            f.write(PETALS_SHIM)
    model_dir = os.path.join(workdir, "models", "petals-tiny-llama")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        subprocess.run([venv_python, "-c", SAVE_TINY_LLAMA, model_dir], check=True, timeout=600,
                       capture_output=True)
        info["wrote_model"] = model_dir
    return venv_python, shim, model_dir, info


def run_petals(workdir: str, venv_python: str, shim: str, model_dir: str, args: argparse.Namespace,
               prompts: torch.Tensor, deep: torch.Tensor) -> dict:
    """Deep prompt tuning steps through Petals servers on ``args.spans``, starting from ``prompts``
    [tokens, hidden] and ``deep`` [blocks, tokens, hidden]."""
    init_path = os.path.join(workdir, "petals_train_init.pt")
    torch.save({"prompts": prompts, "deep": deep}, init_path)
    client_path = os.path.join(workdir, "petals_train_client.py")
    with open(client_path, "w") as f:
        f.write(PETALS_CLIENT)
    run_dir = os.path.join(workdir, "petals_train_run")
    os.makedirs(run_dir, exist_ok=True)
    port = args.dht_port if _port_free(args.dht_port) else _free_port()
    prefix = "tiny-llama-train"
    res: dict = {"dht_port": port, "server_torch_threads": args.server_threads}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": str(args.server_threads), "MKL_NUM_THREADS": str(args.server_threads)}
    procs = PetalsProcs(run_dir, env)
    sockets_before = peer_sockets()
    try:
        procs.spawn("dht", [venv_python, shim, "petals.cli.run_dht", "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}",
                            "--identity_path", os.path.join(run_dir, "dht.id"), "--no_relay"])
        peer = procs.wait_for("dht", rf"initial_peers (/ip4/127\.0\.0\.1/tcp/{port}/p2p/\w+)", 90).group(1)
        # as petals_baseline.sh: --throughput 1 skips the throughput test (and its speedtest), no reachability
        # check (health.petals.dev), no relays on loopback
        server_args = ["--dht_prefix", prefix, "--initial_peers", peer, "--device", "cpu", "--torch_dtype", "float32",
                       "--host_maddrs", "/ip4/127.0.0.1/tcp/0", "--throughput", "1", "--skip_reachability_check",
                       "--no_auto_relay"]
        starts = []
        for span in args.spans.split(","):
            name = "server_" + span.replace(":", "_")
            t0 = time.monotonic()
            procs.spawn(name, [venv_python, shim, "petals.cli.run_server", model_dir, "--block_indices", span,
                               *server_args])
            procs.wait_for(name, r"\[INFO\] Started", 240)
            starts.append(round(time.monotonic() - t0, 2))
        res["server_start_s"] = starts
        config = {"client_threads": args.client_threads, "pre_seq_len": args.pre_seq_len, "lr": args.lr,
                  "batch": args.batch, "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
                  "init": init_path}
        # Output to a file, not a pipe: hivemind forks a DHT process that keeps inherited pipes open after the
        # client's main process is gone. Its whole process group is stopped afterwards.
        client_log = os.path.join(run_dir, "client.log")
        with open(client_log, "w") as log:
            client = subprocess.Popen([venv_python, client_path, model_dir, peer, prefix, json.dumps(config)],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**env, "OMP_NUM_THREADS": str(args.client_threads)},
                                      start_new_session=True, preexec_fn=_die_with_parent)
        procs.procs.append(("client", client))
        try:
            client.wait(args.petals_client_timeout)
        except subprocess.TimeoutExpired:
            pass
        with open(client_log, errors="replace") as f:
            out = f.read()
        if client.poll() is None:
            raise RuntimeError(f"the Petals client ran past {args.petals_client_timeout}s:\n{out[-3000:]}")
        match = re.search(r"^PETALS_TRAIN_JSON (.*)$", out, re.M)
        if not match:
            raise RuntimeError(f"the Petals client failed (code {client.returncode}):\n{out[-4000:]}")
        res.update(json.loads(match.group(1)))
    finally:
        procs.close()
        clean_peer_sockets(keep=sockets_before)
    return res
