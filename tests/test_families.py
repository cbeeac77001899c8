"""Every supported family end to end on real peers, against local transformers.

One DHT peer serves every family. Each family gets three float32 servers with uneven spans
(0:1, 1:3, 3:4) and one bfloat16 server (0:4), each a real ``swarm serve`` process with its own
``--prefix`` (the remote-code case: one float32 server). Servers of many families start
concurrently, in waves: a third of the available memory holds two waves (each server process
takes ~370 MiB, so all 17 families at once would need ~25 GiB), and the next wave starts while the
tests of the current one run. pytest groups the tests by family (the ``family`` fixture is
module-scoped), so each wave starts once. Killing a wave also kills the DHT nodes that held some
records of the next one: servers re-announce every 10 s, and clients wait up to 30 s for them.

Tolerances: float32 servers, float32 client: logits within 1e-4 of the local model, greedy tokens
identical, incremental steps (prefill, then a multi-token step, past the sliding window) within
1e-4 of the full forward. bfloat16 servers, float32 client: logits within 2% of the logit range
(max |logit| of the float32 model) of the local bfloat16 model; measured: at most 0.53%.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch

import family_cases
from family_cases import CASES, FamilyCase
from swarm.dht import clean_peer_sockets, peer_sockets
from swarm.local_swarm import LocalSwarm, Proc

pytestmark = pytest.mark.integration

ATOL = 1e-4
BF16_RELATIVE = 0.02
BF16_CASES = [case for case in CASES if case.bf16]
SERVERS_PER_FAMILY = max(len(case.spans) + case.bf16 for case in CASES)
SERVER_BYTES = 450 << 20  # one `swarm serve` process with a tiny model, and its p2pd (measured ~370 MiB)
ONLINE_TIMEOUT = 600.0  # a wave's servers start together on 2 cores
UPDATE_PERIOD = 10  # seconds between a server's re-announcements (records live 2.5x this)


def _families_in_memory() -> int:
    """How many families' servers a third of the available memory holds (``SWARM_TEST_FAMILIES_IN_MEMORY``
    overrides): other test runs may share the machine."""
    if os.environ.get("SWARM_TEST_FAMILIES_IN_MEMORY"):
        return max(1, int(os.environ["SWARM_TEST_FAMILIES_IN_MEMORY"]))
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return 4
    return max(1, min(len(CASES), available // 3 // (SERVER_BYTES * SERVERS_PER_FAMILY)))


class FamilySwarms:
    """One DHT peer for all families, and their servers in waves.

    Two waves live at a time: the one under test and the next, which starts while the tests of the
    current one run (they mostly wait on the network, so its start-up takes CPU they leave idle).
    """

    def __init__(self, root: str, log_dir: str, families_in_memory: int) -> None:
        self.sockets_before = peer_sockets()
        self.swarm = LocalSwarm(log_dir=log_dir, env={"HF_MODULES_CACHE": os.path.join(root, "hf-modules")})
        self.swarm.start_dht()
        self.paths = {case.name: family_cases.build(case, root) for case in CASES}
        size = max(1, families_in_memory // 2)
        self.waves = [CASES[i:i + size] for i in range(0, len(CASES), size)]
        self.running: dict[int, list[Proc]] = {}  # wave index -> its servers
        self.current: int | None = None

    def ready(self, case: FamilyCase) -> None:
        """Returns once every server of ``case``'s wave is ONLINE; stops earlier waves, starts the next one."""
        index = next(i for i, wave in enumerate(self.waves) if case in wave)
        if index == self.current:
            return
        for other in [i for i in self.running if i not in (index, index + 1)]:
            self._stop(other)
        if index not in self.running:
            self._start(index)
        for proc in self.running[index]:
            proc.wait_for("Server ONLINE", ONLINE_TIMEOUT)
        self.current = index
        if index + 1 < len(self.waves) and index + 1 not in self.running:
            self._start(index + 1)

    def _start(self, index: int) -> None:
        servers = self.running[index] = []
        for member in self.waves[index]:
            path, _ = self.paths[member.name]
            # a given --throughput skips the start-up speed probe: these tests do not route by speed.
            # --update-period: a record may live on the DHT nodes of servers of an earlier wave, lost
            # when they are killed; re-announcing every 10 s restores it while clients wait for it.
            common = ("--num-threads", "1", "--device", "cpu", "--throughput", "100", "--update-period",
                      str(UPDATE_PERIOD), *member.server_args)
            for span in member.spans:
                servers.append(self.swarm.start_server(
                    path, span, "--dht-prefix", member.name, "--dtype", "float32", *common, wait=False,
                    name=f"{member.name}_{span.replace(':', '_')}"))
            if member.bf16:
                servers.append(self.swarm.start_server(
                    path, "0:4", "--dht-prefix", f"{member.name}-bf16", "--dtype", "bfloat16", *common, wait=False,
                    name=f"{member.name}_bf16"))

    def _stop(self, index: int) -> None:
        """Kills the wave's servers and their p2pd, and removes the sockets they leave. Not SIGTERM: a
        graceful exit (tested in test_integration.py) costs each server about a second of CPU, a minute
        over the matrix."""
        for proc in self.running.pop(index):
            self.swarm.stop(proc, signal.SIGKILL)
            self.swarm.procs.remove(proc)  # reaped: close() must not signal its (reusable) group id again
        clean_peer_sockets(keep=self.sockets_before)  # now, not at close(): other test runs look for leaks

    def close(self) -> None:
        for index in list(self.running):
            self._stop(index)
        self.swarm.close()


@pytest.fixture(scope="session")
def family_swarms(tmp_path_factory):
    swarms = FamilySwarms(str(tmp_path_factory.mktemp("family-models")),
                          str(tmp_path_factory.mktemp("family-logs")), _families_in_memory())
    try:
        yield swarms
    finally:
        swarms.close()


@dataclasses.dataclass
class Family:
    case: FamilyCase
    path: str
    reference: str
    initial_peers: list[str]
    local: Any  # transformers, float32
    remote: Any = None  # the float32 client of the float32 servers

    def client(self, prefix: str) -> Any:
        from swarm import AutoDistributedModelForCausalLM

        model = AutoDistributedModelForCausalLM.from_pretrained(
            self.path, initial_peers=self.initial_peers, dht_prefix=prefix, dtype=torch.float32,
            missing_blocks_timeout=3 * UPDATE_PERIOD, **self.case.client_args)
        model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
        return model


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.name)
def family(request, family_swarms: FamilySwarms):
    case: FamilyCase = request.param
    family_swarms.ready(case)
    path, reference = family_swarms.paths[case.name]
    family = Family(case, path, reference, list(family_swarms.swarm.initial_peers),
                    local=family_cases.load_reference(case, reference))
    family.remote = family.client(case.name)
    try:
        yield family
    finally:
        family.remote.shutdown()


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 500, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_local(family: Family) -> None:
    ids = _ids(2, 16, seed=0)
    with torch.no_grad():
        remote = family.remote(ids, labels=ids)
        local = family.local(ids, labels=ids)
    diff = (remote.logits - local.logits).abs().max().item()
    print(f"{family.case.name}: float32 max logit diff {diff:.2e}")
    assert remote.logits.shape == local.logits.shape
    assert diff <= ATOL
    assert abs(remote.loss.item() - local.loss.item()) <= ATOL


def test_greedy_generate_is_identical(family: Family) -> None:
    ids = _ids(1, 7, seed=1)
    remote = family.remote.generate(ids, max_new_tokens=12, do_sample=False)
    local = family.local.generate(ids, max_new_tokens=12, do_sample=False)
    assert remote.shape == (1, 7 + 12)
    assert torch.equal(remote, local)


def test_incremental_session_equals_full_forward(family: Family) -> None:
    """Prefill 5, then a 4-token step, then 1 and 2: past the sliding window of 5, across every span."""
    ids = _ids(2, 12, seed=2)
    with torch.no_grad():
        hidden = family.local.get_input_embeddings()(ids)  # [2, 12, hidden]
        full = family.remote.remote_forward(hidden)
        with family.remote.inference_session(max_length=16) as session:
            steps = [session.step(hidden[:, a:b]) for a, b in ((0, 5), (5, 9), (9, 10), (10, 12))]
            assert session.position == 12
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= ATOL


@pytest.mark.parametrize("family", BF16_CASES, ids=lambda case: case.name, indirect=True)
def test_bfloat16_servers_are_close_to_local_bfloat16(family: Family) -> None:
    ids = _ids(2, 16, seed=3)
    remote = family.client(f"{family.case.name}-bf16")
    try:
        local16 = family_cases.load_reference(family.case, family.reference, torch.bfloat16)
        with torch.no_grad():
            logits = remote(ids).logits
            expected = local16(ids).logits.float()
            scale = family.local(ids).logits.abs().max().item()
    finally:
        remote.shutdown()
    assert logits.dtype == torch.float32
    diff = (logits - expected).abs().max().item()
    print(f"{family.case.name}: bfloat16 max logit diff {diff:.2e} ({diff / scale:.2%} of the logit range)")
    assert diff <= BF16_RELATIVE * scale


def test_serve_refuses_remote_code_without_the_flag(family_swarms: FamilySwarms) -> None:
    case = next(c for c in CASES if c.writer == "remote_code")
    path, _ = family_swarms.paths[case.name]
    done = subprocess.run([sys.executable, "-m", "swarm.cli", "serve", "--model", path, "--host-maddrs",
                           "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--trust-remote-code" in done.stderr and "needs its own code" in done.stderr
