"""benchmarks/bench_gpu.py (a 7B-shaped Llama on a GPU, two servers against local transformers) has not run
on a GPU here; its steps run on the CPU with a tiny shape, so the script is known to work end to end."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_gpu  # noqa: E402

pytestmark = pytest.mark.integration


def test_pieces():
    assert bench_gpu.even_spans(32, 2) == ["0:16", "16:32"] and bench_gpu.even_spans(4, 3) == ["0:1", "1:3", "3:4"]
    log = "Memory budget: ...\nDevice cuda:0 (NVIDIA H200, 139.2 of 139.8 GiB free; torch 2.7.0 CUDA 12.8 build)\n"
    assert bench_gpu.picked_device(log) == "cuda:0" and bench_gpu.picked_device("nothing") is None
    config = bench_gpu.shape_config("7b")
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (4096, 32, 11008)
    assert bench_gpu.free_memory(torch.device("cpu")) is None


def test_tiny_run_on_the_cpu(tmp_path, capsys):
    from server.loading import block_bytes

    report = bench_gpu.main(["--shape", "tiny", "--device", "cpu", "--new-tokens", "6", "--repeats", "1",
                             "--steps", "3", "--workdir", str(tmp_path)])
    assert '"tokens_per_s_ratio_swarm_over_local"' in capsys.readouterr().out  # the JSON report
    swarm = report["swarm"]
    assert swarm["device_auto_picked"] == ["cpu", "cpu"] and swarm["auto_picked_cuda"] is False
    assert swarm["servers"] == ["0:2", "2:4"]
    assert swarm["tokens_per_s"] > 0 and report["local_hf"]["tokens_per_s"] > 0
    assert swarm["step_1token_median_ms"] > 0 and report["local_hf"]["step_1token_median_ms"] > 0
    config = __import__("transformers").AutoConfig.for_model("llama", **bench_gpu.shape_config("tiny"))
    assert swarm["memory_per_block"]["weights_bytes"] == block_bytes(config, torch.float32)
    assert swarm["memory_per_block"]["measured_device_bytes"] is None  # a CPU has no device-wide free memory
    exact = report["exactness"]
    assert exact["forward_logits_max_abs_diff"] <= 1e-4 and exact["within_tolerance"]  # float32 on one CPU
    assert exact["greedy_tokens_equal"]
