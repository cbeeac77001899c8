"""The device a server computes on, and why: one place for ``swarm doctor`` and ``swarm serve``.

- :func:`inspect_torch` — what torch can use: its build (CUDA, ROCm/HIP, CPU), devices, free memory;
  imports ``torch_npu`` only when asked (``--device npu``, or ``npu-smi`` shows NPUs)
- :func:`diagnose` — every mismatch between what the OS shows (:mod:`swarm.accelerators`) and what torch
  can use, each with the exact fix (pure)
- :func:`choose` — ``--device`` -> a :class:`Verdict`: the device, its one-line summary, or why it is
  refused (pure; ``auto`` never falls back to the CPU while a GPU is present)
- :func:`pick_device` — ``swarm serve``'s entry: probe, choose, print the verdict line
- :func:`bf16_supported`, :func:`attention_for` — what each backend runs: dtype and attention choices
- :func:`available_ram` — RAM free for new allocations (the CPU's device memory; cgroup limits count)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping

import torch

from swarm.accelerators import OsView, probe_os
from swarm.errors import ConfigError

logger = logging.getLogger(__name__)

PREFERENCE = ("cuda", "npu", "xpu", "mps")  # what ``auto`` takes first
ALIASES = {"rocm": "cuda", "hip": "cuda", "dcu": "cuda", "gpu": "cuda"}  # HIP builds drive AMD/Hygon as "cuda"
VENDOR_TOOL = {"nvidia": "nvidia-smi", "amd": "rocm-smi", "hygon": "hy-smi", "ascend": "npu-smi", "apple": "macOS"}
VENDOR_NOUN = {"nvidia": "GPU", "amd": "GPU", "hygon": "DCU", "ascend": "NPU", "apple": "GPU"}
HIDING_ENV = {"cuda": ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"),
              "npu": ("ASCEND_RT_VISIBLE_DEVICES",)}
NO_BF16_GFX = ("gfx8", "gfx900", "gfx906")  # Vega 10/20 (MI25/MI50/MI60, Hygon Z100): no bfloat16 units
PROTECT_TORCH = "then keep pip from replacing it (pip install --no-deps, or a constraints file: docs/hpc.md)"


@dataclasses.dataclass(frozen=True)
class TorchDevice:
    type: str  # cuda | npu | xpu | mps
    index: int
    name: str
    total_bytes: int | None = None
    free_bytes: int | None = None
    arch: str = ""

    @property
    def label(self) -> str:
        return self.type if self.type == "mps" else f"{self.type}:{self.index}"


@dataclasses.dataclass(frozen=True)
class TorchView:
    """What this torch build can use."""

    version: str
    cuda: str | None = None  # torch.version.cuda
    hip: str | None = None  # torch.version.hip
    devices: tuple[TorchDevice, ...] = ()
    cuda_error: str | None = None  # why CUDA/HIP initialisation failed, if it did
    npu_error: str | None = None  # why torch_npu could not be used (None: fine, or not tried)
    npu_tried: bool = False
    mps_built: bool = False

    @property
    def build(self) -> str:
        if self.hip:
            return f"ROCm/HIP {self.hip} build"
        if self.cuda:
            return f"CUDA {self.cuda} build"
        return "CPU build" + (" + torch_npu" if self.npu_tried and self.npu_error is None else "")

    def of_type(self, kind: str) -> list[TorchDevice]:
        return [d for d in self.devices if d.type == kind]


@dataclasses.dataclass(frozen=True)
class Problem:
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.what}. Fix: {self.fix}"


@dataclasses.dataclass(frozen=True)
class Verdict:
    device: str | None  # a torch device string; None when refused
    line: str  # the one-line summary (or the refusal)
    problems: tuple[Problem, ...] = ()


# ---------------------------------------------------------------- torch side


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")


def inspect_torch(want_npu: bool = False, memory: bool = True) -> TorchView:
    """What torch can use here. ``memory=False`` skips ``mem_get_info`` (it creates a context on every GPU)."""
    devices: list[TorchDevice] = []
    cuda_error = npu_error = None
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                free, total = torch.cuda.mem_get_info(i) if memory else (None, props.total_memory)
                arch = (getattr(props, "gcnArchName", "") if torch.version.hip else "") or f"{props.major}.{props.minor}"
                devices.append(TorchDevice("cuda", i, props.name, total, free, arch))
    except Exception as e:  # a driver that fails to initialise is a finding, not a crash
        cuda_error = _error(e)
    if want_npu:
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)

            if torch.npu.is_available():
                for i in range(torch.npu.device_count()):
                    free, total = torch.npu.mem_get_info(i) if memory else (None, None)
                    devices.append(TorchDevice("npu", i, torch.npu.get_device_name(i), total, free))
            else:
                npu_error = "torch_npu loaded, but torch.npu.is_available() is False"
        except Exception as e:
            npu_error = _error(e)
    xpu = getattr(torch, "xpu", None)
    try:
        if xpu is not None and xpu.is_available():
            for i in range(xpu.device_count()):
                total = xpu.get_device_properties(i).total_memory
                free = xpu.mem_get_info(i)[0] if memory and hasattr(xpu, "mem_get_info") else None
                devices.append(TorchDevice("xpu", i, xpu.get_device_name(i), total, free))
    except Exception as e:
        logger.debug("torch.xpu is present but failed: %s", e)
    mps = getattr(torch.backends, "mps", None)
    mps_built = bool(mps is not None and mps.is_built())
    if mps is not None and mps.is_available():
        devices.append(TorchDevice("mps", 0, "Apple MPS"))
    return TorchView(torch.__version__, torch.version.cuda, getattr(torch.version, "hip", None), tuple(devices),
                     cuda_error, npu_error, want_npu, mps_built)


# ---------------------------------------------------------------- diagnosis (pure)


def _names(accelerators) -> str:
    names = sorted({a.name for a in accelerators})
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _seen(os_view: OsView, vendor: str) -> str:
    found = os_view.by_vendor(vendor)
    noun = VENDOR_NOUN[vendor] + ("s" if len(found) > 1 else "")
    return f"{found[0].source} sees {len(found)} {noun} ({_names(found)})"


def _base_version(version: str) -> str:
    return version.split("+")[0]


def _cuda_tag(driver_cuda: str | None) -> str:
    """The PyTorch wheel index tag for the newest CUDA a driver runs (12.4 -> cu124), if known."""
    match = re.fullmatch(r"(\d+)\.(\d+)", driver_cuda or "")
    return f"cu{match[1]}{match[2]}" if match else "cu124"


def _newer(a: str, b: str) -> bool:
    return tuple(int(x) for x in re.findall(r"\d+", a)[:2]) > tuple(int(x) for x in re.findall(r"\d+", b)[:2])


def _hidden(kind: str, env: Mapping[str, str]) -> str | None:
    for name in HIDING_ENV.get(kind, ()):
        value = env.get(name)
        if value is not None and value.strip() in ("", "-1", "none", "None", "NoDevFiles"):
            return f"{name}={value!r}"
    return None


def _build_problem(seen: str, version: str, wrong_build: str | None, has_build: bool, hidden: str | None,
                   fix: str, gres: str) -> Problem | None:
    """The problems every GPU vendor shares: torch built for the other vendor, for the CPU only, or the
    devices hidden by an environment variable. None: the build is right and nothing hides them."""
    if wrong_build:
        return Problem(f"{seen} but torch {version} is a {wrong_build}", fix)
    if not has_build:
        return Problem(f"torch {version} is a CPU build but {seen}", fix)
    if hidden:
        return Problem(f"{hidden} hides the devices that {seen.split(' sees ')[0]} shows from torch",
                       f"unset it (in a Slurm job, ask for them with --gres={gres}:N and Slurm sets it)")
    return None


def diagnose(os_view: OsView, tv: TorchView, env: Mapping[str, str] | None = None) -> list[Problem]:
    """Every accelerator the OS shows that torch cannot use, with the exact fix; plus failing vendor tools."""
    env = os.environ if env is None else env
    v = tv.version
    problems: list[Problem] = []
    for tool, error in os_view.errors.items():
        if tool == "nvidia-smi" and not os_view.by_vendor("nvidia"):
            problems.append(Problem(f"nvidia-smi fails: {error}",
                                    "the NVIDIA driver is not loaded or does not match its kernel module: reload or "
                                    "reinstall the driver (a reboot after a driver update often does it)"))
        elif tool != "nvidia-smi":
            problems.append(Problem(f"{tool} fails: {error}", f"check the driver with `{tool}` as this user"))

    if os_view.by_vendor("nvidia") and not (tv.of_type("cuda") and not tv.hip):
        seen = _seen(os_view, "nvidia")
        fix = (f"install the CUDA build of torch: pip install 'torch=={_base_version(v)}' --index-url "
               f"https://download.pytorch.org/whl/{_cuda_tag(os_view.driver_cuda)}"
               f"{f' (a CUDA at most the driver`s {os_view.driver_cuda})' if os_view.driver_cuda else ''}, "
               f"or your site's torch module; {PROTECT_TORCH}")
        wrong = "ROCm build (AMD only)" if tv.hip else None
        if problem := _build_problem(seen, v, wrong, bool(tv.cuda), _hidden("cuda", env), fix, "gpu"):
            problems.append(problem)
        elif os_view.driver_cuda and _newer(tv.cuda or "", os_view.driver_cuda):
            problems.append(Problem(
                f"torch {v} needs CUDA {tv.cuda} but the NVIDIA driver runs CUDA {os_view.driver_cuda} at most",
                f"update the driver, or {fix}"))
        else:
            problems.append(Problem(
                f"torch {v} (CUDA {tv.cuda}) cannot use the GPUs: {seen}"
                + (f"; CUDA says {tv.cuda_error}" if tv.cuda_error else ""),
                "check that this process may open /dev/nvidia* (containers: --gpus all; Slurm: --gres=gpu:N) and "
                "that the driver and torch's CUDA version match"))

    for vendor in ("amd", "hygon"):
        if not os_view.by_vendor(vendor) or (tv.of_type("cuda") and tv.hip):
            continue
        seen = _seen(os_view, vendor)
        if vendor == "hygon":
            fix = ("install the DCU build of torch that matches your DTK (your site's module, e.g. `module load "
                   "dtk` and its torch wheel; the generic ROCm wheels do not run on DCUs); " + PROTECT_TORCH)
        else:
            fix = (f"install torch's ROCm build: pip install 'torch=={_base_version(v)}' --index-url "
                   f"https://download.pytorch.org/whl/rocm6.2 (the ROCm version your driver has), or your site's "
                   f"wheel; {PROTECT_TORCH}")
        wrong = "CUDA build (NVIDIA only)" if tv.cuda else None
        gres = "dcu" if vendor == "hygon" else "gpu"
        if problem := _build_problem(seen, v, wrong, bool(tv.hip), _hidden("cuda", env), fix, gres):
            problems.append(problem)
        else:
            arch = next((a.arch for a in os_view.by_vendor(vendor) if a.arch), "")
            problems.append(Problem(
                f"torch {v} (HIP {tv.hip}) cannot use them: {seen}"
                + (f"; HIP says {tv.cuda_error}" if tv.cuda_error else ""),
                "add this user to the render and video groups (it must open /dev/kfd and /dev/dri/renderD*), and "
                f"check that this torch build includes the GPU's target{f' {arch}' if arch else ''}"))

    if os_view.by_vendor("ascend") and not tv.of_type("npu"):
        seen = _seen(os_view, "ascend")
        error = tv.npu_error or "torch_npu was not tried"
        if "No module named 'torch_npu'" in error:
            problems.append(Problem(
                f"{seen} but torch_npu is not installed",
                f"pip install torch-npu=={_base_version(v)}.* (Ascend's build for torch {_base_version(v)} and your "
                "CANN), then `source /usr/local/Ascend/ascend-toolkit/set_env.sh` before starting"))
        elif _hidden("npu", env):
            problems.append(Problem(f"{_hidden('npu', env)} hides the NPUs that {seen.split(' sees ')[0]} shows",
                                    "unset it (in a Slurm job, ask for NPUs with --gres=npu:N)"))
        else:
            problems.append(Problem(f"{seen} but torch cannot use them: {error}",
                                    "`source /usr/local/Ascend/ascend-toolkit/set_env.sh` (CANN) before starting, "
                                    f"check that torch_npu matches torch {_base_version(v)}, and that this user is "
                                    "in the HwHiAiUser group"))

    if os_view.by_vendor("apple") and not tv.of_type("mps"):
        if not tv.mps_built:
            problems.append(Problem(f"this is Apple silicon but torch {v} has no MPS support (an x86_64 Python "
                                    "under Rosetta?)", "use an arm64 Python (`python3 -c 'import platform; "
                                    "print(platform.machine())'` must say arm64) and reinstall torch"))
        else:
            problems.append(Problem("torch has MPS support but MPS is not available",
                                    "update macOS to 12.3 or later"))
    return problems


# ---------------------------------------------------------------- choosing (pure)


def _describe(device: TorchDevice) -> str:
    parts = [device.name]
    if device.free_bytes is not None and device.total_bytes:
        parts.append(f"{device.free_bytes / 2**30:.1f} of {device.total_bytes / 2**30:.1f} GiB free")
    elif device.total_bytes:
        parts.append(f"{device.total_bytes / 2**30:.1f} GiB")
    return ", ".join(parts)


def normalize(requested: str) -> str:
    """``--device`` with aliases resolved: ``rocm``/``dcu``/``hip``/``gpu`` -> ``cuda`` (keeping ``:N``)."""
    kind, _, index = requested.strip().lower().partition(":")
    kind = ALIASES.get(kind, kind)
    return f"{kind}:{index}" if index else kind


def choose(requested: str, os_view: OsView, tv: TorchView, env: Mapping[str, str] | None = None) -> Verdict:
    """``--device`` -> the device to use, its one-line summary, or why not (``device=None``)."""
    problems = tuple(diagnose(os_view, tv, env))
    torch_line = f"torch {tv.version} {tv.build}"
    requested = normalize(requested)
    if requested == "auto":
        for kind in PREFERENCE:
            usable = tv.of_type(kind)
            if usable:
                first = usable[0]
                return Verdict(first.label, f"Device {first.label} ({_describe(first)}; {torch_line})", problems)
        if os_view.required:
            return Verdict(None, "Refusing to fall back to the CPU: " + "; ".join(str(p) for p in problems)
                           + ". Pass --device cpu to serve on the CPU anyway.", problems)
        return Verdict("cpu", f"Device cpu (no accelerator found; {torch_line})", problems)
    kind, _, index = requested.partition(":")
    if kind == "cpu":
        unused = f"; {len(os_view.required)} accelerator(s) present, unused" if os_view.required else ""
        return Verdict("cpu", f"Device cpu (--device cpu{unused}; {torch_line})", problems)
    usable = tv.of_type(kind)
    wanted = next((d for d in usable if not index or str(d.index) == index), None)
    if wanted is None:
        why = "; ".join(str(p) for p in problems) if problems else f"{torch_line} sees no {kind} device"
        if kind == "npu" and tv.npu_error and not problems:
            why += f" ({tv.npu_error}; Ascend NPUs need torch_npu and `source "
            why += "/usr/local/Ascend/ascend-toolkit/set_env.sh`)"
        have = ", ".join(d.label for d in tv.devices) or "none besides the CPU"
        return Verdict(None, f"--device {requested} is not usable: {why} (usable here: {have})", problems)
    return Verdict(wanted.label, f"Device {wanted.label} ({_describe(wanted)}; {torch_line})", problems)


def pick_device(requested: str) -> torch.device:
    """``--device`` -> a torch device, printing the one-line verdict; raises ConfigError (with the fix)
    rather than serving on the CPU while an accelerator is present that torch cannot use."""
    kind = normalize(requested).partition(":")[0]
    if kind != "auto" and kind not in ("cpu", *PREFERENCE):
        try:
            torch.device(requested)
        except RuntimeError as e:
            raise ConfigError(f"--device {requested!r} is not a torch device: {e}") from None
        return torch.device(requested)  # another backend torch knows (e.g. a plugin's): taken as asked
    os_view = probe_os()
    tv = inspect_torch(want_npu=kind == "npu" or (kind == "auto" and bool(os_view.by_vendor("ascend"))),
                       memory=False)
    verdict = choose(requested, os_view, tv)
    if verdict.device is None:
        raise ConfigError(verdict.line)
    print(verdict.line, flush=True)
    return torch.device(verdict.device)


# ---------------------------------------------------------------- RAM (the CPU's "device memory")


def _cgroup_ram_left() -> int | None:
    """RAM this process's cgroup (v2) may still use, if it has a limit: containers see the host's meminfo."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" or not limit.isdigit() else max(0, int(limit) - used)


def available_ram() -> int:
    """Bytes of RAM available to new allocations: ``MemAvailable`` of /proc/meminfo (capped by a cgroup
    limit), else ``os.sysconf``'s available pages, else half the physical RAM."""
    available: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        available = None
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # macOS has no SC_AVPHYS_PAGES
            available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    cgroup_left = _cgroup_ram_left()
    return available if cgroup_left is None else min(available, cgroup_left)


# ---------------------------------------------------------------- what each backend runs


def bf16_rule(device_type: str, arch: str = "", hip: bool = False, capability: tuple[int, int] | None = None,
              macos: tuple[int, int] | None = None) -> bool:
    """Whether a device computes in bfloat16 natively, from its facts (pure; NPU and XPU ask their runtime)."""
    if device_type == "cpu":
        return True
    if device_type == "cuda" and hip:
        return not arch.startswith(NO_BF16_GFX)
    if device_type == "cuda":
        return capability is not None and capability >= (8, 0)
    if device_type == "mps":
        return macos is not None and macos >= (14, 0)
    return False


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 natively (else ``--dtype auto`` takes float16)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return bf16_rule("cuda", getattr(props, "gcnArchName", ""), bool(torch.version.hip),
                         (props.major, props.minor))
    if device.type in ("npu", "xpu"):
        backend = getattr(torch, device.type)
        return bool(getattr(backend, "is_bf16_supported", lambda: False)())
    if device.type == "mps":
        import platform

        release = tuple(int(x) for x in re.findall(r"\d+", platform.mac_ver()[0])[:2])
        return bf16_rule("mps", macos=release if len(release) == 2 else None)  # type: ignore[arg-type]
    return bf16_rule(device.type)


def attention_for(device_type: str, torch_npu_version: str | None = None) -> str | None:
    """The attention implementation a backend needs instead of transformers' choice, or None to keep it:
    eager on NPUs whose torch_npu predates its fused scaled-dot-product attention (2.1)."""
    if device_type == "npu":
        numbers = tuple(int(x) for x in re.findall(r"\d+", torch_npu_version or "")[:2])
        return None if numbers >= (2, 1) else "eager"
    return None


def adapt_to_device(config, device: torch.device) -> None:
    """Sets the block config's attention implementation to one ``device``'s backend runs."""
    version = None
    if device.type == "npu":
        import torch_npu

        version = getattr(torch_npu, "__version__", None)
    wanted = attention_for(device.type, version)
    if wanted is not None and getattr(config, "_attn_implementation", None) not in (None, wanted, "eager"):
        logger.warning("Using %s attention on %s (torch_npu %s has no fused attention)", wanted, device, version)
        config._attn_implementation = wanted


def synchronize(device: torch.device) -> None:
    """Waits for the work queued on ``device`` (a no-op on the CPU), whatever its backend."""
    sync = getattr(getattr(torch, device.type, None), "synchronize", None)
    if device.type != "cpu" and callable(sync):
        sync()


def device_name(device: torch.device) -> str:
    """A human name of ``device`` for records and logs (``NVIDIA A100-SXM4-80GB``, ``Ascend910B3``, ``cpu``)."""
    backend = getattr(torch, device.type, None)
    get_name = getattr(backend, "get_device_name", None)
    if device.type in ("cuda", "npu", "xpu") and callable(get_name):
        return str(get_name(device))
    return "Apple MPS" if device.type == "mps" else device.type
