"""Detects the device's ``HardwareProfile`` (``agent.contracts.profile``).

Owns reading the board's files under a root directory (``/`` on a device; a recorded copy in
tests): ``proc/cpuinfo``, ``proc/meminfo``, ``proc/device-tree/model`` and ``compatible``,
``etc/nv_tegra_release``, ``etc/os-release``; the L4T -> JetPack table; Jetson GPU compute
capability by SoC; and, when probing the live host, NVML (desktop/server NVIDIA GPUs) and the
installed runtimes (through the backends' probes, plus cuda-python). Every reader tolerates a
missing or unreadable file. What the profile is used for (variant selection, backend choice) is
left to ``agent.backends.choice`` and the update client.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent.contracts.profile import BoardInfo, CpuInfo, GpuInfo, HardwareProfile, RuntimeInfo
from agent.contracts.state import bounded_text
from agent.logs import get_logger

__all__ = [
    "JETPACK_BY_L4T",
    "JETSON_MODULES",
    "JETSON_SOCS",
    "ParsedCpuinfo",
    "detect_profile",
    "detect_runtimes",
    "jetpack_for",
    "parse_cpuinfo",
    "parse_device_tree_strings",
    "parse_meminfo",
    "parse_nv_tegra_release",
]

log = get_logger(__name__)

# L4T (Jetson Linux) release -> JetPack release, from NVIDIA's JetPack archive pages.
# An L4T release missing here keeps ``jetpack=None``; the L4T version is still reported.
JETPACK_BY_L4T: dict[str, str] = {
    "32.4.3": "4.4",
    "32.4.4": "4.4.1",
    "32.5.0": "4.5",
    "32.5.1": "4.5.1",
    "32.5.2": "4.5.1",
    "32.6.1": "4.6",
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "32.7.6": "4.6.6",
    "34.1.0": "5.0",
    "34.1.1": "5.0.1",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "35.6.1": "5.1.5",
    "36.2.0": "6.0",  # developer preview
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "38.2.0": "7.0",
}

# Tegra SoC (device-tree ``compatible``) -> (GPU name, CUDA compute capability).
JETSON_SOCS: dict[str, tuple[str, str]] = {
    "tegra210": ("Maxwell (Jetson Nano/TX1)", "5.3"),
    "tegra186": ("Pascal (Jetson TX2)", "6.2"),
    "tegra194": ("Volta (Jetson Xavier)", "7.2"),
    "tegra234": ("Ampere (Jetson Orin)", "8.7"),
    "tegra264": ("Blackwell (Jetson Thor)", "11.0"),  # sm_110 since CUDA 13 (was 10.1)
}

# Jetson module part numbers (device-tree ``compatible``) -> product name.
JETSON_MODULES: dict[str, str] = {
    "p3701-0000": "Jetson AGX Orin",
    "p3701-0004": "Jetson AGX Orin 32GB",
    "p3701-0005": "Jetson AGX Orin 64GB",
    "p3767-0000": "Jetson Orin NX 16GB",
    "p3767-0001": "Jetson Orin NX 8GB",
    "p3767-0003": "Jetson Orin Nano 8GB",
    "p3767-0004": "Jetson Orin Nano 4GB",
    "p3767-0005": "Jetson Orin Nano Developer Kit",
    "p2888-0001": "Jetson AGX Xavier",
    "p2888-0004": "Jetson AGX Xavier 8GB",
    "p2888-0005": "Jetson AGX Xavier 64GB",
    "p3668-0000": "Jetson Xavier NX",
    "p3668-0001": "Jetson Xavier NX",
    "p3448-0000": "Jetson Nano",
    "p3448-0002": "Jetson Nano",
    "p3448-0003": "Jetson Nano 2GB",
}

# Thermal-zone names only Tegra kernels of the JetPack 4 era use ("Always On" and PLL sensors).
_TEGRA_THERMAL_ZONES = {"AO-therm", "PLL-therm"}

# ARM (implementer, part) -> core name, for cpuinfo files that carry no model name.
_ARM_CORES: dict[tuple[str, str], str] = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x4e", "0x004"): "NVIDIA Carmel",
}

# x86 flags kept in the profile (those that decide variants and runtimes), normalized names.
_X86_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
_ARM_FLAGS = ("asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")

_L4T = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class ParsedCpuinfo:
    """What ``/proc/cpuinfo`` says, normalized."""

    processors: int = 0
    model: str | None = None
    flags: tuple[str, ...] = ()
    arch: str | None = None  # "x86_64", "aarch64", "armv7l" when the file tells
    board_model: str | None = None  # the Raspberry Pi ``Model`` line
    hardware: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def parse_cpuinfo(text: str) -> ParsedCpuinfo:
    """Parse ``/proc/cpuinfo`` of x86 or ARM; never raises on odd text."""
    processors = 0
    first: dict[str, str] = {}
    trailer: dict[str, str] = {}
    for raw in text.splitlines():
        key, sep, value = raw.partition(":")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "processor":
            processors += 1
            continue
        if key in ("hardware", "model", "revision", "serial") and (
            key != "model" or not value.isdigit()
        ):
            trailer.setdefault(key, value)  # the Pi trailer (x86 ``model`` is a number)
        first.setdefault(key, value)
    x86_flags = first.get("flags", "").split()
    arm_flags = first.get("features", "").split()
    flags: list[str]
    arch: str | None = None
    if x86_flags:
        arch = "x86_64" if "lm" in x86_flags else "i686"
        have = set(x86_flags)
        flags = [f for f in _X86_FLAGS if f in have]
        if "amx_tile" in have:
            flags.append("amx")
    elif arm_flags:
        have = set(arm_flags)
        flags = [f for f in _ARM_FLAGS if f in have]
        arch_field = first.get("cpu architecture", "")
        arch = "armv7l" if arch_field.startswith("7") or "neon" in have else "aarch64"
    else:
        flags = []
    model = first.get("model name")
    if arm_flags and (not model or model.startswith("ARMv")):
        core = _ARM_CORES.get(
            (first.get("cpu implementer", "").lower(), first.get("cpu part", "").lower())
        )
        model = core or model
    return ParsedCpuinfo(
        processors=processors,
        model=model or None,
        flags=tuple(flags),
        arch=arch,
        board_model=trailer.get("model"),
        hardware=trailer.get("hardware"),
    )


def parse_nv_tegra_release(text: str) -> str | None:
    """``# R36 (release), REVISION: 4.3, ...`` -> ``"36.4.3"``; ``None`` if not recognised."""
    m = _L4T.search(text)
    if not m:
        return None
    major, minor, patch = m.group(1), m.group(2), m.group(3) or "0"
    return f"{int(major)}.{int(minor)}.{int(patch)}"


def jetpack_for(l4t: str | None) -> str | None:
    """The JetPack release of an L4T version, from ``JETPACK_BY_L4T``."""
    return JETPACK_BY_L4T.get(l4t) if l4t else None


def parse_device_tree_strings(data: bytes) -> tuple[str, ...]:
    """A device-tree string-list property (NUL-terminated, NUL-separated) -> its strings."""
    return tuple(
        s.decode("utf-8", "replace").strip() for s in data.split(b"\0") if s.strip(b"\0 \n")
    )


def parse_meminfo(text: str) -> int:
    """Bytes of ``MemTotal`` in ``/proc/meminfo``; 0 when absent."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "MemTotal":
            parts = value.split()
            if parts and parts[0].isdigit():
                unit = parts[1].lower() if len(parts) > 1 else "b"
                return int(parts[0]) * {"kb": 1024, "mb": 1 << 20, "gb": 1 << 30}.get(unit, 1)
    return 0


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _os_name(root: Path, host: bool) -> str:
    text = _read_text(root / "etc" / "os-release") or ""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "PRETTY_NAME" and value.strip('"'):
            return value.strip().strip('"')
    return f"{platform.system()} {platform.release()}" if host else "unknown"


def _board(
    root: Path, cpu: ParsedCpuinfo, compatible: tuple[str, ...]
) -> tuple[BoardInfo, GpuInfo | None]:
    model_bytes = _read_bytes(root / "proc" / "device-tree" / "model")
    dt_model = parse_device_tree_strings(model_bytes)[0] if model_bytes else None
    tegra = _read_text(root / "etc" / "nv_tegra_release")
    l4t = parse_nv_tegra_release(tegra) if tegra else None
    socs = [c.split(",", 1)[1] for c in compatible if c.startswith("nvidia,tegra")]
    soc = next((s for s in socs if s in JETSON_SOCS), socs[0] if socs else None)
    is_jetson = bool(
        soc
        or l4t
        or (dt_model and "jetson" in dt_model.lower())
        or cpu.model == "NVIDIA Carmel"
        or _tegra_thermal_zones(root)
    )
    if is_jetson:
        if soc is None and cpu.model == "NVIDIA Carmel":
            soc = "tegra194"  # Carmel cores exist only in Xavier
        if soc is None and l4t and l4t.startswith("36."):
            soc = "tegra234"  # L4T R36 (JetPack 6) supports only Orin modules
        gpu: GpuInfo | None = None
        if soc in JETSON_SOCS:
            name, cc = JETSON_SOCS[soc]
            gpu = GpuInfo(vendor="nvidia", name=name, compute_capability=cc, integrated=True)
        model = dt_model or _jetson_model_from_compatible(compatible, soc)
        board = BoardInfo(kind="jetson", model=model, l4t=l4t, jetpack=jetpack_for(l4t))
        return board, gpu
    pi_model = dt_model if dt_model and dt_model.startswith("Raspberry Pi") else None
    pi_model = pi_model or (
        cpu.board_model if cpu.board_model and cpu.board_model.startswith("Raspberry Pi") else None
    )
    if pi_model or any(c.startswith("raspberrypi,") for c in compatible):
        return BoardInfo(kind="raspberry-pi", model=pi_model or compatible[0]), None
    return BoardInfo(kind="generic", model=dt_model), None


def _tegra_thermal_zones(root: Path) -> bool:
    base = root / "sys" / "class" / "thermal"
    try:
        zones = [z for z in base.iterdir() if z.name.startswith("thermal_zone")]
    except OSError:
        return False
    names = {(_read_text(z / "type") or "").strip() for z in zones}
    return bool(names & _TEGRA_THERMAL_ZONES)


def _jetson_model_from_compatible(compatible: tuple[str, ...], soc: str | None) -> str | None:
    for entry in compatible:
        part = entry.split(",", 1)[-1]
        for module_part in reversed(part.split("+")):  # "p3737-0000+p3701-0005": module last
            if module_part in JETSON_MODULES:
                return JETSON_MODULES[module_part]
    names = {"tegra234": "Jetson Orin", "tegra194": "Jetson Xavier", "tegra210": "Jetson Nano/TX1"}
    if soc in names:
        return names[soc]
    return compatible[0] if compatible else None


def _nvml_gpus() -> list[GpuInfo]:
    """Discrete NVIDIA GPUs through NVML (nvidia-ml-py); empty when NVML is absent."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_* subclasses: library or driver missing
        log.debug("nvml_unavailable", reason=str(exc))
        return []
    gpus: list[GpuInfo] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            gpus.append(
                GpuInfo(
                    vendor="nvidia",
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    compute_capability=f"{major}.{minor}",
                    memory_bytes=memory,
                )
            )
    except Exception as exc:  # a device that vanished or a driver that refuses a query
        log.warning("nvml_query_failed", reason=str(exc))
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:
            log.debug("nvml_shutdown_failed", reason=str(exc))
    return gpus


def _cuda_runtime() -> RuntimeInfo | None:
    """cuda-python: installed, and whether the CUDA driver initialises."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver
        except ImportError:
            return None
    try:
        from cuda import bindings

        version = str(bindings.__version__)
    except (ImportError, AttributeError):
        version = "unknown"
    try:
        (err,) = driver.cuInit(0)
    except Exception as exc:  # RuntimeError when libcuda cannot be loaded
        return RuntimeInfo(
            name="cuda", version=version[:64], usable=False, reason=bounded_text(str(exc), 1000)
        )
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        return RuntimeInfo(
            name="cuda", version=version, usable=False, reason=f"cuInit failed: {name}"
        )
    count_err, count = driver.cuDeviceGetCount()
    devices = tuple(f"cuda:{i}" for i in range(count if int(count_err) == 0 else 0))
    return RuntimeInfo(name="cuda", version=version, usable=bool(devices), devices=devices)


def _reason(text: str | None) -> str | None:
    return None if text is None else bounded_text(text, 1000)


def detect_runtimes() -> tuple[RuntimeInfo, ...]:
    """Every inference runtime installed in this Python, usable or not (with the reason)."""
    from agent.backends import probe_all

    found: list[RuntimeInfo] = []
    for probe in probe_all():
        if probe.version is None and not probe.usable and "not installed" in (probe.reason or ""):
            found.append(
                RuntimeInfo(name=probe.name, version="", usable=False, reason=_reason(probe.reason))
            )
            continue
        found.append(
            RuntimeInfo(
                name=probe.name,
                version=(probe.version or "unknown")[:64],
                usable=probe.usable,
                reason=_reason(probe.reason),
                devices=tuple(d[:64] for d in probe.devices[:32]),
            )
        )
    cuda = _cuda_runtime()
    if cuda is not None:
        found.append(cuda)
    return tuple(found)


def _intel_gpus(runtimes: Iterable[RuntimeInfo]) -> list[GpuInfo]:
    ov = next((r for r in runtimes if r.name == "openvino" and r.usable), None)
    if ov is None or not any(d.startswith("GPU") for d in ov.devices):
        return []
    from agent.backends.openvino import OpenVinoBackend

    gpus = []
    for device in (d for d in ov.devices if d.startswith("GPU")):
        try:
            name = str(OpenVinoBackend.core().get_property(device, "FULL_DEVICE_NAME"))
        except RuntimeError:
            name = device
        gpus.append(GpuInfo(vendor="intel", name=name, integrated=True))
    return gpus


def detect_profile(
    root: Path | str = "/",
    *,
    host: bool | None = None,
    runtimes: Iterable[RuntimeInfo] | None = None,
) -> HardwareProfile:
    """The profile of the board whose files live under ``root``.

    ``host`` (default: ``root`` is ``/``) adds what only the live machine can tell: CPU count and
    architecture fallbacks, NVML GPUs, installed runtimes. ``runtimes`` overrides the runtime
    probe (tests pass ``()`` for a recorded board).
    """
    root = Path(root)
    live = (root.resolve() == Path("/").resolve()) if host is None else host
    cpuinfo = parse_cpuinfo(_read_text(root / "proc" / "cpuinfo") or "")
    compat_bytes = _read_bytes(root / "proc" / "device-tree" / "compatible")
    compatible = parse_device_tree_strings(compat_bytes) if compat_bytes else ()
    board, soc_gpu = _board(root, cpuinfo, compatible)

    arch = cpuinfo.arch
    if live:
        arch = platform.machine() or arch
    elif arch is None and (compatible or board.kind != "generic"):
        arch = "aarch64"  # device-tree boards here are all arm64
    cores = cpuinfo.processors or ((os.cpu_count() or 1) if live else 1)

    if runtimes is None:
        runtimes = detect_runtimes() if live else ()
    runtime_list = tuple(runtimes)
    gpus: list[GpuInfo] = [soc_gpu] if soc_gpu else []
    if live:
        gpus += _nvml_gpus() if not soc_gpu else []
        gpus += _intel_gpus(runtime_list)
    memory = parse_meminfo(_read_text(root / "proc" / "meminfo") or "")
    return HardwareProfile(
        arch=arch or "unknown",
        os=_os_name(root, live),
        python=platform.python_version(),
        cpu=CpuInfo(model=cpuinfo.model, cores=max(cores, 1), flags=cpuinfo.flags),
        board=board,
        gpus=tuple(gpus),
        memory_bytes=memory,
        runtimes=runtime_list,
    )
