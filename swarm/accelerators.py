"""Which accelerators the operating system shows, whatever torch thinks: vendor tools and device nodes.

- NVIDIA: ``nvidia-smi`` (a CSV query, and the header for the CUDA version the driver supports)
- AMD: ``rocm-smi``; Hygon DCU: ``hy-smi`` (a ``rocm-smi`` fork: ``DCU[n]``/``HCU[n]`` lines, MiB)
- Ascend NPU: ``npu-smi info``
- Apple silicon: the CPU brand (``sysctl``); Intel GPUs: PCI vendor ids in sysfs (shown, never required)
- without a tool: device nodes (``/dev/nvidiaN``, ``/dev/davinciN``, AMD/Hygon render nodes)

The parsers are pure (text in, :class:`Accelerator` list out) and tested against captured outputs
(``tests/fixtures/smi/``); :func:`probe_os` runs what is installed, each tool bounded in time.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

TOOL_TIMEOUT = 15.0  # seconds one vendor tool may take (npu-smi can take several on a busy node)
MIB = 2**20

# vendor -> the torch device type that drives it (AMD and Hygon through torch's HIP build, as "cuda")
TORCH_TYPE = {"nvidia": "cuda", "amd": "cuda", "hygon": "cuda", "ascend": "npu", "intel": "xpu", "apple": "mps"}
# vendors whose presence means "this machine has an accelerator to serve with": Intel GPUs seen in
# sysfs are often integrated graphics, so they are shown but never make the CPU a refusal
REQUIRED_VENDORS = ("nvidia", "amd", "hygon", "ascend", "apple")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One device as the OS shows it. Memory is ``None`` where the source does not say."""

    vendor: str  # nvidia | amd | hygon | ascend | intel | apple
    index: int
    name: str
    source: str  # the tool or device node that showed it
    total_bytes: int | None = None
    free_bytes: int | None = None
    arch: str = ""  # compute capability (8.0) or gfx target (gfx942)

    @property
    def torch_type(self) -> str:
        return TORCH_TYPE[self.vendor]


@dataclasses.dataclass(frozen=True)
class OsView:
    """Everything the OS side found: devices, the tools looked for, their failures, driver facts."""

    accelerators: tuple[Accelerator, ...] = ()
    tools: dict[str, str | None] = dataclasses.field(default_factory=dict)  # tool -> path, None: not found
    errors: dict[str, str] = dataclasses.field(default_factory=dict)  # tool -> why it failed
    driver_cuda: str | None = None  # the CUDA version the NVIDIA driver supports (nvidia-smi header)

    def by_vendor(self, vendor: str) -> list[Accelerator]:
        return [a for a in self.accelerators if a.vendor == vendor]

    @property
    def required(self) -> list[Accelerator]:
        return [a for a in self.accelerators if a.vendor in REQUIRED_VENDORS]


# ---------------------------------------------------------------- parsers (pure)

NVIDIA_QUERY = "index,name,memory.total,memory.free,compute_cap"


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_nvidia_query(text: str) -> list[Accelerator]:
    """``nvidia-smi --query-gpu=index,name,memory.total,memory.free[,compute_cap] --format=csv,noheader,nounits``
    (memory in MiB)."""
    found = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        total, free = _number(cells[2]), _number(cells[3])
        found.append(Accelerator(
            "nvidia", int(cells[0]), cells[1], "nvidia-smi",
            total_bytes=int(total * MIB) if total is not None else None,
            free_bytes=int(free * MIB) if free is not None else None,
            arch=cells[4] if len(cells) > 4 and _number(cells[4]) is not None else ""))
    return found


def parse_nvidia_cuda_version(text: str) -> str | None:
    """The ``CUDA Version: 12.4`` of ``nvidia-smi``'s header: the newest CUDA the driver runs."""
    match = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return match[1] if match else None


_ROCM_LINE = re.compile(r"^\s*(GPU|DCU|HCU)\[(\d+)\]\s*:\s*([^:]+?)\s*:\s*(.*?)\s*$", re.IGNORECASE)


def parse_rocm_smi(text: str, tool: str = "rocm-smi") -> list[Accelerator]:
    """``rocm-smi --showproductname --showmeminfo vram`` (AMD: ``GPU[n]``, bytes) or the same from
    ``hy-smi`` (Hygon DCU: ``DCU[n]``/``HCU[n]``, MiB). JSON output (``--json``) is read too."""
    cards: dict[int, dict[str, str]] = {}
    labels: set[str] = set()
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            data = {}
        for key, fields in data.items() if isinstance(data, dict) else ():
            match = re.fullmatch(r"card(\d+)", str(key))
            if match and isinstance(fields, dict):
                cards[int(match[1])] = {str(k).lower(): str(v) for k, v in fields.items()}
    else:
        for line in text.splitlines():
            match = _ROCM_LINE.match(line)
            if match:
                labels.add(match[1].upper())
                cards.setdefault(int(match[2]), {})[match[3].lower()] = match[4]
    hygon = tool == "hy-smi" or labels & {"DCU", "HCU"} or re.search(r"haiguang|hygon", text, re.IGNORECASE)
    found = []
    for index, fields in sorted(cards.items()):
        total = _memory(fields, "vram total memory")
        used = _memory(fields, "vram total used memory")
        name = fields.get("card series") or fields.get("card model") or ("Hygon DCU" if hygon else "AMD GPU")
        found.append(Accelerator(
            "hygon" if hygon else "amd", index, name, tool, total_bytes=total,
            free_bytes=total - used if total is not None and used is not None else None,
            arch=fields.get("gfx version", "")))
    return found


def _memory(fields: dict[str, str], key: str) -> int | None:
    for unit, scale in (("(b)", 1), ("(mib)", MIB), ("(mb)", MIB)):
        value = _number(fields.get(f"{key} {unit}", ""))
        if value is not None:
            return int(value * scale)
    return None


def parse_npu_smi(text: str) -> list[Accelerator]:
    """``npu-smi info``: a table of two rows per chip (``NPU Name | Health | ...`` then
    ``Chip [Device] | Bus-Id | AICore(%) Memory-Usage(MB) [HBM-Usage(MB)]``); the last ``used / total``
    pair of the second row is the memory models compute in (HBM where the card has it)."""
    found: list[Accelerator] = []
    name = ""
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 2 and cells[1].lower().startswith("process id"):
            break  # the process table follows the device table
        if len(cells) < 3:
            continue
        if re.fullmatch(r"\d+(\s+\d+)?", cells[0]):  # "Chip [Device]": a chip of the NPU row above
            if not name:
                continue
            pairs = [(int(u), int(t)) for u, t in re.findall(r"(\d+)\s*/\s*(\d+)", cells[2]) if int(t) > 0]
            used, total = pairs[-1] if pairs else (None, None)
            found.append(Accelerator(
                "ascend", len(found), f"Ascend {name}", "npu-smi",
                total_bytes=total * MIB if total is not None else None,
                free_bytes=(total - used) * MIB if total is not None and used is not None else None))
            continue
        npu = re.fullmatch(r"(\d+)\s+(\S.*)", cells[0])  # "NPU Name"
        if npu:
            name = npu[2]
    return found


# ---------------------------------------------------------------- probing the machine

Runner = Callable[[list[str]], "tuple[int, str]"]


def run_tool(argv: list[str]) -> tuple[int, str]:
    """``(exit code, stdout + stderr)``; a tool that hangs counts as failed."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                              stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} did not answer within {TOOL_TIMEOUT:.0f}s"
    except OSError as e:
        return 127, str(e)
    return done.returncode, done.stdout + done.stderr


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "no output")


def probe_os(which: Callable[[str], str | None] = shutil.which, run: Runner = run_tool,
             glob_paths: Callable[[str], list[str]] = glob.glob, read: Callable[[str], str] | None = None,
             platform: str = sys.platform) -> OsView:
    """Runs the vendor tools found on PATH and looks at device nodes. Never raises for a broken tool:
    its failure is recorded in ``errors`` (a driver that does not load is exactly what doctor reports)."""
    read = read or _read_text
    tools = {name: which(name) for name in ("nvidia-smi", "rocm-smi", "hy-smi", "npu-smi")}
    errors: dict[str, str] = {}
    found: list[Accelerator] = []
    driver_cuda = None

    if tools["nvidia-smi"]:
        code, out = run(["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"])
        if code != 0 and "compute_cap" in out:  # drivers before 510 lack the field
            code, out = run(["nvidia-smi", f"--query-gpu={NVIDIA_QUERY.rsplit(',', 1)[0]}",
                             "--format=csv,noheader,nounits"])
        if code == 0:
            found += parse_nvidia_query(out)
            driver_cuda = parse_nvidia_cuda_version(run(["nvidia-smi"])[1])
        else:
            errors["nvidia-smi"] = _first_line(out)
    for tool in ("hy-smi", "rocm-smi"):  # a Hygon node may have both: hy-smi names the DCUs better
        if tools[tool] and not any(a.vendor in ("amd", "hygon") for a in found):
            code, out = run([tool, "--showproductname", "--showmeminfo", "vram"])
            if code == 0:
                found += parse_rocm_smi(out, tool)
            else:
                errors[tool] = _first_line(out)
    if tools["npu-smi"]:
        code, out = run(["npu-smi", "info"])
        if code == 0:
            found += parse_npu_smi(out)
        else:
            errors["npu-smi"] = _first_line(out)

    found += _device_nodes(found, glob_paths, read)
    if platform == "darwin":
        code, brand = run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if code == 0 and brand.strip().startswith("Apple"):
            found.append(Accelerator("apple", 0, f"{brand.strip()} GPU", "sysctl"))
    return OsView(tuple(found), tools, errors, driver_cuda)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


PCI_VENDORS = {"0x10de": "nvidia", "0x1002": "amd", "0x1d94": "hygon", "0x8086": "intel"}


def _device_nodes(seen: list[Accelerator], glob_paths: Callable[[str], list[str]],
                  read: Callable[[str], str]) -> list[Accelerator]:
    """Devices whose tool is missing or failed: ``/dev/nvidiaN``, ``/dev/davinciN``, and render nodes of
    AMD, Hygon and Intel GPUs (PCI vendor id in sysfs)."""
    vendors = {a.vendor for a in seen}
    found: list[Accelerator] = []
    if "nvidia" not in vendors:
        for path in sorted(p for p in glob_paths("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", p)):
            found.append(Accelerator("nvidia", int(path[len("/dev/nvidia"):]), "NVIDIA GPU", path))
    if "ascend" not in vendors:
        for path in sorted(p for p in glob_paths("/dev/davinci*") if re.fullmatch(r"/dev/davinci\d+", p)):
            found.append(Accelerator("ascend", int(path[len("/dev/davinci"):]), "Ascend NPU", path))
    counts: dict[str, int] = {}
    for node in sorted(glob_paths("/sys/class/drm/renderD*")):
        vendor = PCI_VENDORS.get(read(os.path.join(node, "device", "vendor")))
        if vendor is None or vendor == "nvidia" or vendor in vendors:
            continue
        if vendor in ("amd", "hygon") and not glob_paths("/dev/kfd"):
            continue  # a display GPU without the compute driver
        index = counts[vendor] = counts.get(vendor, -1) + 1
        label = {"amd": "AMD GPU", "hygon": "Hygon DCU", "intel": "Intel GPU"}[vendor]
        found.append(Accelerator(vendor, index, label, f"/dev/dri/{os.path.basename(node)}"))
    return found
