"""``swarm doctor``: the report for machines with each vendor's accelerators (their tools' outputs are
fixtures, tests/fixtures/smi/), and one real run on this machine with a real peer to reach."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import swarm.accelerators
import swarm.devices
import swarm.doctor
from swarm.command_config import DoctorConfig
from swarm.devices import TorchView
from swarm.local_swarm import LocalSwarm
from tests.test_devices import _fake_machine, smi

VENDORS = {
    "nvidia": ({"nvidia-smi --query": (0, smi("nvidia-smi-query.csv")), "nvidia-smi": (0, smi("nvidia-smi.txt"))},
               "torch 2.13.0+cpu is a CPU build but nvidia-smi sees 2 GPUs (NVIDIA A40)", "whl/cu124"),
    "amd": ({"rocm-smi": (0, smi("rocm-smi-mi300x.txt"))},
            "torch 2.13.0+cpu is a CPU build but rocm-smi sees 2 GPUs (AMD Instinct MI300X OAM)", "whl/rocm"),
    "hygon": ({"hy-smi": (0, smi("hy-smi-z100.txt"))},
              "torch 2.13.0+cpu is a CPU build but hy-smi sees 2 DCUs (Z100SM)", "DTK"),
    "ascend": ({"npu-smi": (0, smi("npu-smi-910b3.txt"))},
               "npu-smi sees 8 NPUs (Ascend 910B3) but torch_npu is not installed", "pip install torch-npu==2.13.0.*"),
}


@pytest.fixture
def offline_network(monkeypatch):
    async def no_network(initial_peers, timeout):
        return {"ok": True, "seconds": 0.0, "maddrs": []}, []

    monkeypatch.setattr(swarm.doctor, "network_check", no_network)


@pytest.mark.parametrize("vendor", sorted(VENDORS))
def test_doctor_names_each_vendors_mismatch_and_its_fix(vendor, monkeypatch, offline_network, capsys):
    outputs, what, fix = VENDORS[vendor]
    kwargs, _ = _fake_machine(outputs)
    real_probe = swarm.accelerators.probe_os
    monkeypatch.setattr(swarm.accelerators, "probe_os", lambda: real_probe(**kwargs))
    monkeypatch.setattr(swarm.devices, "inspect_torch", lambda want_npu=False, memory=True: TorchView(
        "2.13.0+cpu", npu_tried=want_npu, npu_error="ModuleNotFoundError: No module named 'torch_npu'"
        if want_npu else None))
    report = swarm.doctor.examine(DoctorConfig(initial_peers=()))
    assert report["ok"] is False and report["verdict"]["device"] is None
    assert [p["what"] for p in report["problems"]] == [what]
    assert fix in report["problems"][0]["fix"]
    assert {a["vendor"] for a in report["os_accelerators"]} == {vendor}
    assert report["matmul"][0]["device"] == "cpu" and report["matmul"][0]["ok"]
    json.dumps(report)  # the --json document

    assert swarm.doctor.run_doctor(DoctorConfig(initial_peers=())) == 1
    screen = capsys.readouterr().out
    assert "Refusing to fall back to the CPU" in screen and f"1. {what}" in screen and "fix: " in screen


def test_doctor_on_this_machine_with_a_real_peer(tmp_path):
    """The real run: this machine's torch and tools, a real p2pd, a real DHT peer to reach and an address
    where nobody listens."""
    with LocalSwarm(log_dir=str(tmp_path)) as local:
        maddr = local.start_dht()
        peer_id = maddr.rsplit("/p2p/", 1)[1]
        nobody = f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id}"
        done = subprocess.run([sys.executable, "-m", "swarm.cli", "doctor", "--json", "--timeout", "10",
                               "--initial-peers", nobody, maddr], capture_output=True, text=True, timeout=180)
    report = json.loads(done.stdout)
    assert done.returncode == 1, done.stderr[-2000:]  # the unreachable peer is a problem
    assert report["torch"]["build"] == "CPU build" and report["torch_devices"] == []
    assert report["os_accelerators"] == [] and report["verdict"]["device"] == "cpu"
    (cpu,) = report["matmul"]
    assert cpu["ok"] and cpu["gflops"] > 0 and cpu["max_rel_error"] < 1e-4
    assert report["p2pd"]["ok"] and 0 < report["p2pd"]["seconds"] < 10
    unreachable, reachable = report["initial_peers"]
    assert not unreachable["ok"] and unreachable["maddr"] == nobody
    assert reachable["ok"] and 0 < reachable["seconds"] < 10
    assert [p["what"] for p in report["problems"]] == [f"initial peer {nobody} is not reachable: "
                                                       f"{unreachable['error']}"]
    assert report["ram"]["available_bytes"] > 0 and report["slurm"] is None


def test_doctor_refuses_malformed_peers(capsys):
    from swarm.cli import main

    assert main(["doctor", "--initial-peers", "10.0.0.5:31337"]) == 2
    assert "is not a full multiaddr" in capsys.readouterr().err
