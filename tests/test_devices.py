"""Device logic (swarm/accelerators.py, swarm/devices.py): vendor tool outputs, what torch can use, the
verdict ``swarm serve --device`` and ``swarm doctor`` give, and the dtype/attention each backend runs.

The machines that run this suite have no GPU, DCU or NPU: the vendor tools' outputs are fixtures in
the formats real machines print (tests/fixtures/smi/README.md says where they come from) and torch's
side is a :class:`TorchView` value. The real run on this machine is the last test of each part.
"""

from __future__ import annotations

import pathlib
import types

import pytest
import torch

from swarm import devices
from swarm.accelerators import (
    MIB,
    Accelerator,
    OsView,
    parse_npu_smi,
    parse_nvidia_cuda_version,
    parse_nvidia_query,
    parse_rocm_smi,
    probe_os,
)
from swarm.devices import TorchDevice, TorchView, attention_for, bf16_rule, choose, diagnose, normalize
from swarm.errors import ConfigError

SMI = pathlib.Path(__file__).parent / "fixtures" / "smi"
CPU_TORCH = TorchView("2.13.0+cpu")


def smi(name: str) -> str:
    return (SMI / name).read_text()


# ---------------------------------------------------------------- parsers


def test_nvidia_query_and_header():
    gpus = parse_nvidia_query(smi("nvidia-smi-query.csv"))
    assert [(g.vendor, g.index, g.name, g.arch) for g in gpus] == [("nvidia", 0, "NVIDIA A40", "8.6"),
                                                                   ("nvidia", 1, "NVIDIA A40", "8.6")]
    assert gpus[0].total_bytes == 46068 * MIB and gpus[1].free_bytes == 45128 * MIB
    assert gpus[0].torch_type == "cuda"
    assert parse_nvidia_cuda_version(smi("nvidia-smi.txt")) == "12.4"
    assert parse_nvidia_cuda_version(smi("nvidia-smi-failed.txt")) is None
    (mig,) = parse_nvidia_query(smi("nvidia-smi-query-mig.csv"))
    assert mig.total_bytes == 81920 * MIB and mig.free_bytes is None  # "[N/A]" is unknown, not zero
    assert parse_nvidia_query("Field \"compute_cap\" is not a valid field to query.") == []


def test_rocm_smi_text_and_json():
    gpus = parse_rocm_smi(smi("rocm-smi-mi300x.txt"))
    assert [(g.vendor, g.index, g.name, g.arch) for g in gpus] == [
        ("amd", 0, "AMD Instinct MI300X OAM", "gfx942"), ("amd", 1, "AMD Instinct MI300X OAM", "gfx942")]
    assert gpus[0].total_bytes == 206141652992 and gpus[0].free_bytes == 206141652992 - 293269504
    (card,) = parse_rocm_smi(smi("rocm-smi-rx7900.json"))
    assert (card.vendor, card.name, card.arch) == ("amd", "Radeon RX 7900 XTX", "gfx1100")
    assert card.free_bytes == 25753026560 - 1073741824
    assert parse_rocm_smi("garbage\nGPU[x] : nothing") == [] and parse_rocm_smi("{not json") == []


def test_hy_smi_names_hygon_dcus_in_mib():
    dcus = parse_rocm_smi(smi("hy-smi-z100.txt"), tool="hy-smi")
    assert [(d.vendor, d.index, d.name) for d in dcus] == [("hygon", 0, "Z100SM"), ("hygon", 1, "Z100SM")]
    assert dcus[1].total_bytes == 16368 * MIB and dcus[1].free_bytes == (16368 - 12290) * MIB
    assert dcus[0].torch_type == "cuda"  # through torch's HIP build
    # the same lines printed by the DTK's rocm-smi are Hygon's too (DCU[n] labels)
    assert {d.vendor for d in parse_rocm_smi(smi("hy-smi-z100.txt"), tool="rocm-smi")} == {"hygon"}


def test_npu_smi_tables():
    npus = parse_npu_smi(smi("npu-smi-910b3.txt"))
    assert len(npus) == 8 and {n.name for n in npus} == {"Ascend 910B3"}
    assert [n.index for n in npus] == list(range(8))  # torch numbers visible chips from 0
    assert npus[0].total_bytes == 65536 * MIB and npus[0].free_bytes == (65536 - 3338) * MIB  # HBM, not DDR 0/0
    (p3,) = parse_npu_smi(smi("npu-smi-310p3.txt"))
    assert (p3.name, p3.total_bytes, p3.free_bytes) == ("Ascend 310P3", 21527 * MIB, (21527 - 1832) * MIB)
    assert p3.torch_type == "npu"
    assert parse_npu_smi("| 0 0 | x | 1 / 2 |") == []  # a chip row with no NPU row above it


def _fake_machine(outputs: dict[str, tuple[int, str]], nodes: tuple[str, ...] = (), sysfs: dict | None = None):
    """probe_os arguments for a machine whose PATH holds the tools in ``outputs`` (first word -> answer)."""
    calls: list[list[str]] = []

    def run(argv):
        calls.append(argv)
        key = argv[0] if argv[0] != "nvidia-smi" or len(argv) == 1 else "nvidia-smi --query"
        return outputs.get(key, (127, f"{argv[0]}: not found"))

    tools = {k.split()[0] for k in outputs}
    return dict(which=lambda name: f"/usr/bin/{name}" if name in tools else None, run=run,
                glob_paths=lambda pattern: [n for n in nodes if n.startswith(pattern.rstrip("*"))],
                read=lambda path: (sysfs or {}).get(path, ""), platform="linux"), calls


def test_probe_os_runs_each_vendor_tool():
    kwargs, calls = _fake_machine({"nvidia-smi --query": (0, smi("nvidia-smi-query.csv")),
                                   "nvidia-smi": (0, smi("nvidia-smi.txt")),
                                   "npu-smi": (0, smi("npu-smi-310p3.txt"))})
    view = probe_os(**kwargs)
    assert [a.vendor for a in view.accelerators] == ["nvidia", "nvidia", "ascend"]
    assert view.driver_cuda == "12.4" and view.errors == {}
    assert view.tools == {"nvidia-smi": "/usr/bin/nvidia-smi", "rocm-smi": None, "hy-smi": None,
                          "npu-smi": "/usr/bin/npu-smi"}
    assert ["npu-smi", "info"] in calls

    kwargs, _ = _fake_machine({"hy-smi": (0, smi("hy-smi-z100.txt")), "rocm-smi": (0, smi("rocm-smi-mi300x.txt"))})
    assert [a.vendor for a in probe_os(**kwargs).accelerators] == ["hygon", "hygon"]  # hy-smi first, once


def test_probe_os_falls_back_to_device_nodes_when_the_tool_fails():
    kwargs, _ = _fake_machine({"nvidia-smi --query": (9, smi("nvidia-smi-failed.txt"))},
                              nodes=("/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm",
                                     "/dev/davinci3", "/dev/davinci_manager", "/dev/kfd",
                                     "/sys/class/drm/renderD128", "/sys/class/drm/renderD129"),
                              sysfs={"/sys/class/drm/renderD128/device/vendor": "0x1d94",
                                     "/sys/class/drm/renderD129/device/vendor": "0x8086"})
    view = probe_os(**kwargs)
    assert view.errors["nvidia-smi"].startswith("NVIDIA-SMI has failed")
    assert [(a.vendor, a.index, a.source) for a in view.accelerators] == [
        ("nvidia", 0, "/dev/nvidia0"), ("nvidia", 1, "/dev/nvidia1"), ("ascend", 3, "/dev/davinci3"),
        ("hygon", 0, "/dev/dri/renderD128"), ("intel", 0, "/dev/dri/renderD129")]
    assert [a.vendor for a in view.required] == ["nvidia", "nvidia", "ascend", "hygon"]  # Intel is only shown


def test_probe_os_on_this_machine():
    """The real thing: this machine has no accelerator, and probing it must say so without raising."""
    view = probe_os()
    assert view.required == [] and all(isinstance(a, Accelerator) for a in view.accelerators)
    assert set(view.tools) == {"nvidia-smi", "rocm-smi", "hy-smi", "npu-smi"}


# ---------------------------------------------------------------- verdicts


def _os(*names: str, driver_cuda: str | None = None) -> OsView:
    parsed = {"nvidia": lambda: parse_nvidia_query(smi("nvidia-smi-query.csv")),
              "amd": lambda: parse_rocm_smi(smi("rocm-smi-mi300x.txt")),
              "hygon": lambda: parse_rocm_smi(smi("hy-smi-z100.txt"), "hy-smi"),
              "ascend": lambda: parse_npu_smi(smi("npu-smi-910b3.txt")),
              "apple": lambda: [Accelerator("apple", 0, "Apple M2 Pro GPU", "sysctl")],
              "intel": lambda: [Accelerator("intel", 0, "Intel GPU", "/dev/dri/renderD128")]}
    return OsView(tuple(a for name in names for a in parsed[name]()), driver_cuda=driver_cuda)


GIB = 2**30
A40 = TorchDevice("cuda", 0, "NVIDIA A40", 45 * GIB, 44 * GIB, "8.6")
MI300X = TorchDevice("cuda", 0, "AMD Instinct MI300X OAM", 192 * GIB, 191 * GIB, "gfx942")
NPU = TorchDevice("npu", 0, "Ascend910B3", 64 * GIB, 60 * GIB)


def test_cpu_torch_next_to_nvidia_gpus_is_refused_with_the_fix():
    verdict = choose("auto", _os("nvidia", driver_cuda="12.4"), CPU_TORCH, env={})
    assert verdict.device is None
    assert "Refusing to fall back to the CPU" in verdict.line and "Pass --device cpu" in verdict.line
    (problem,) = verdict.problems
    assert problem.what == "torch 2.13.0+cpu is a CPU build but nvidia-smi sees 2 GPUs (NVIDIA A40)"
    assert "pip install 'torch==2.13.0' --index-url https://download.pytorch.org/whl/cu124" in problem.fix
    assert "--no-deps" in problem.fix and "docs/hpc.md" in problem.fix
    accepted = choose("cpu", _os("nvidia"), CPU_TORCH, env={})
    assert accepted.device == "cpu" and "2 accelerator(s) present, unused" in accepted.line


def test_nvidia_cases():
    cuda = TorchView("2.7.0+cu128", cuda="12.8", devices=(A40,))
    good = choose("auto", _os("nvidia"), cuda, env={})
    assert good.device == "cuda:0" and good.problems == ()
    assert good.line == "Device cuda:0 (NVIDIA A40, 44.0 of 45.0 GiB free; torch 2.7.0+cu128 CUDA 12.8 build)"
    old_driver = TorchView("2.7.0+cu128", cuda="12.8")
    (problem,) = diagnose(_os("nvidia", driver_cuda="12.4"), old_driver, env={})
    assert problem.what == "torch 2.7.0+cu128 needs CUDA 12.8 but the NVIDIA driver runs CUDA 12.4 at most"
    assert "whl/cu124" in problem.fix
    (hidden,) = diagnose(_os("nvidia"), old_driver, env={"CUDA_VISIBLE_DEVICES": ""})
    assert hidden.what == "CUDA_VISIBLE_DEVICES='' hides the devices that nvidia-smi shows from torch"
    assert "--gres=gpu:N" in hidden.fix
    (wrong_vendor,) = diagnose(_os("nvidia"), TorchView("2.5.1+rocm6.2", hip="6.2.41133"), env={})
    assert "is a ROCm build" in wrong_vendor.what


def test_amd_and_hygon_cases():
    hip = TorchView("2.5.1+rocm6.2", hip="6.2.41133", devices=(MI300X,))
    verdict = choose("auto", _os("amd"), hip, env={})
    assert verdict.device == "cuda:0" and "ROCm/HIP 6.2.41133 build" in verdict.line and not verdict.problems
    assert choose("rocm", _os("amd"), hip, env={}).device == "cuda:0"
    (cpu,) = diagnose(_os("amd"), CPU_TORCH, env={})
    assert cpu.what == "torch 2.13.0+cpu is a CPU build but rocm-smi sees 2 GPUs (AMD Instinct MI300X OAM)"
    assert "download.pytorch.org/whl/rocm" in cpu.fix and "--no-deps" in cpu.fix
    (dcu,) = diagnose(_os("hygon"), TorchView("2.4.0+cu121", cuda="12.1"), env={})
    assert dcu.what == "hy-smi sees 2 DCUs (Z100SM) but torch 2.4.0+cu121 is a CUDA build (NVIDIA only)"
    assert "DTK" in dcu.fix and "generic ROCm wheels do not run on DCUs" in dcu.fix
    (no_access,) = diagnose(_os("amd"), TorchView("2.5.1+rocm6.2", hip="6.2"), env={})
    assert "render and video groups" in no_access.fix and "gfx942" in no_access.fix


def test_ascend_cases():
    missing = TorchView("2.5.1", npu_error="ModuleNotFoundError: No module named 'torch_npu'", npu_tried=True)
    verdict = choose("auto", _os("ascend"), missing, env={})
    assert verdict.device is None
    (problem,) = verdict.problems
    assert problem.what == "npu-smi sees 8 NPUs (Ascend 910B3) but torch_npu is not installed"
    assert "pip install torch-npu==2.5.1.*" in problem.fix and "set_env.sh" in problem.fix
    broken = TorchView("2.5.1", npu_error="ImportError: libascendcl.so: cannot open shared object file",
                       npu_tried=True)
    (problem,) = diagnose(_os("ascend"), broken, env={})
    assert "libascendcl.so" in problem.what and "set_env.sh" in problem.fix
    usable = TorchView("2.5.1", devices=(NPU,), npu_tried=True)
    assert choose("auto", _os("ascend"), usable, env={}).device == "npu:0"
    assert choose("npu:0", _os("ascend"), usable, env={}).device == "npu:0"
    refused = choose("npu", OsView(), TorchView("2.13.0+cpu", npu_error="ModuleNotFoundError: No module named "
                                                "'torch_npu'", npu_tried=True), env={})
    assert refused.device is None and "torch_npu" in refused.line


def test_apple_intel_and_plain_cpu():
    (rosetta,) = diagnose(_os("apple"), TorchView("2.5.1"), env={})
    assert "Rosetta" in rosetta.what and "arm64" in rosetta.fix
    mps = TorchView("2.5.1", devices=(TorchDevice("mps", 0, "Apple MPS"),), mps_built=True)
    assert choose("auto", _os("apple"), mps, env={}).line.startswith("Device mps (Apple MPS;")
    intel_only = choose("auto", _os("intel"), CPU_TORCH, env={})  # integrated graphics never block the CPU
    assert intel_only.device == "cpu" and intel_only.problems == ()
    plain = choose("auto", OsView(), CPU_TORCH, env={})
    assert plain.device == "cpu" and plain.line == "Device cpu (no accelerator found; torch 2.13.0+cpu CPU build)"
    assert choose("cuda:1", _os("nvidia"), TorchView("2.7.0", cuda="12.8", devices=(A40,)), env={}).device is None


def test_device_aliases():
    assert normalize("auto") == "auto" and normalize("DCU:1") == "cuda:1" and normalize("rocm") == "cuda"
    assert normalize("hip:0") == "cuda:0" and normalize("npu:3") == "npu:3" and normalize("cpu") == "cpu"


def test_pick_device_on_this_machine(capsys):
    assert devices.pick_device("auto") == torch.device("cpu")
    assert capsys.readouterr().out.startswith("Device cpu (no accelerator found; torch ")
    assert devices.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="sees no cuda device"):
        devices.pick_device("cuda")
    with pytest.raises(ConfigError, match="torch_npu"):
        devices.pick_device("npu")
    with pytest.raises(ConfigError, match="not a torch device"):
        devices.pick_device("quantum:7")


def test_serve_refuses_the_cpu_when_the_os_shows_a_gpu(monkeypatch):
    kwargs, _ = _fake_machine({"nvidia-smi --query": (0, smi("nvidia-smi-query.csv")),
                               "nvidia-smi": (0, smi("nvidia-smi.txt"))})
    monkeypatch.setattr(devices, "probe_os", lambda: probe_os(**kwargs))
    with pytest.raises(ConfigError, match=r"Refusing to fall back to the CPU: torch .* is a CPU build but "
                                          r"nvidia-smi sees 2 GPUs \(NVIDIA A40\)"):
        devices.pick_device("auto")
    assert devices.pick_device("cpu") == torch.device("cpu")


# ---------------------------------------------------------------- what each backend runs


def test_bf16_rules():
    assert bf16_rule("cuda", capability=(8, 0)) and bf16_rule("cuda", capability=(9, 0))
    assert not bf16_rule("cuda", capability=(7, 0))  # V100
    assert not bf16_rule("cuda", "gfx906:sramecc+:xnack-", hip=True)  # MI50/MI60, Hygon Z100
    assert bf16_rule("cuda", "gfx90a:sramecc+:xnack-", hip=True) and bf16_rule("cuda", "gfx942", hip=True)
    assert bf16_rule("mps", macos=(14, 2)) and not bf16_rule("mps", macos=(13, 6))
    assert bf16_rule("cpu")


def test_bf16_on_npu_asks_torch_npu(monkeypatch):
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_bf16_supported=lambda: False), raising=False)
    assert not devices.bf16_supported(types.SimpleNamespace(type="npu"))  # 910A/310P
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_bf16_supported=lambda: True), raising=False)
    assert devices.bf16_supported(types.SimpleNamespace(type="npu"))  # 910B


def test_dtype_auto_takes_float16_where_bf16_is_missing(monkeypatch, tiny_llama):
    import swarm.models as models

    config = models.load_config(tiny_llama)
    config.dtype = torch.bfloat16
    gpu = types.SimpleNamespace(type="cuda")
    monkeypatch.setattr(models, "bf16_supported", lambda device: False)
    assert models.resolve_dtype("auto", config, gpu) == torch.float16
    with pytest.raises(ConfigError, match="no native bfloat16; use --dtype float16"):
        models.resolve_dtype("bfloat16", config, gpu)
    monkeypatch.setattr(models, "bf16_supported", lambda device: True)
    assert models.resolve_dtype("auto", config, gpu) == torch.bfloat16
    assert models.resolve_dtype("auto", config, torch.device("cpu")) == torch.float32


def test_attention_choices(tiny_llama):
    assert attention_for("npu", None) == "eager" and attention_for("npu", "2.0.1") == "eager"
    assert attention_for("npu", "2.1.0.post10") is None and attention_for("npu", "2.5.1.dev20250218") is None
    assert attention_for("cuda") is None and attention_for("cpu") is None
    from swarm.models import load_config

    config = load_config(tiny_llama)
    before = config._attn_implementation
    devices.adapt_to_device(config, torch.device("cpu"))
    assert config._attn_implementation == before == "sdpa"
