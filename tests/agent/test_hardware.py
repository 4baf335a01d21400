"""Hardware profile detection against recorded files from real boards (tests/fixtures/boards)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.hardware import (
    JETPACK_BY_L4T,
    detect_profile,
    jetpack_for,
    parse_cpuinfo,
    parse_device_tree_strings,
    parse_meminfo,
    parse_nv_tegra_release,
)

BOARDS = Path(__file__).resolve().parent.parent / "fixtures" / "boards"

# folder -> (arch, board kind, board model, l4t, jetpack, cpu model, cores, flags, gpu cc)
EXPECTED = {
    "jetson-orin-nano-super-jp6": (
        "aarch64",
        "jetson",
        "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
        "36.4.3",
        "6.2",
        None,
        1,
        (),
        "8.7",
    ),
    "jetson-orin-jp6-r36.3": (
        "aarch64",
        "jetson",
        "Jetson Orin",
        "36.3.0",
        "6.0",
        None,
        1,
        (),
        "8.7",
    ),
    "jetson-agx-orin-64gb": (
        "aarch64",
        "jetson",
        "Jetson AGX Orin 64GB",
        None,
        None,
        None,
        1,
        (),
        "8.7",
    ),
    "jetson-agx-xavier-jp5": (
        "aarch64",
        "jetson",
        "Jetson Xavier",
        None,
        None,
        "NVIDIA Carmel",
        8,
        ("asimd", "asimdhp"),
        "7.2",
    ),
    "jetson-nano-2gb-jp4": ("aarch64", "jetson", None, None, None, None, 1, (), None),
    "rpi5-bookworm": (
        "aarch64",
        "raspberry-pi",
        "Raspberry Pi 5 Model B Rev 1.0",
        None,
        None,
        "Cortex-A76",
        4,
        ("asimd", "asimdhp", "asimddp"),
        None,
    ),
    "rpi4b-bookworm": (
        "aarch64",
        "raspberry-pi",
        "Raspberry Pi 4 Model B Rev 1.5",
        None,
        None,
        "Cortex-A72",
        4,
        ("asimd",),
        None,
    ),
    "x86-intel-sapphire-rapids": (
        "x86_64",
        "generic",
        None,
        None,
        None,
        "Intel(R) Xeon(R) Platinum 8480+",
        1,
        (
            "avx2",
            "avx512f",
            "avx512_vnni",
            "avx512_bf16",
            "avx_vnni",
            "amx_int8",
            "amx_bf16",
            "amx",
        ),
        None,
    ),
    "x86-amd-zen4": (
        "x86_64",
        "generic",
        None,
        None,
        None,
        "AMD EPYC 9654 96-Core Processor",
        1,
        ("avx2", "avx512f", "avx512_vnni", "avx512_bf16"),
        None,
    ),
}


def test_every_board_folder_has_expectations() -> None:
    folders = {p.name for p in BOARDS.iterdir() if p.is_dir()}
    assert folders == set(EXPECTED)


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_board(folder: str) -> None:
    arch, kind, model, l4t, jetpack, cpu_model, cores, flags, cc = EXPECTED[folder]
    profile = detect_profile(BOARDS / folder)
    assert profile.arch == arch
    assert profile.board.kind == kind
    assert profile.board.model == model
    assert profile.board.l4t == l4t
    assert profile.board.jetpack == jetpack
    assert profile.cpu.model == cpu_model
    assert profile.cpu.cores == cores
    assert profile.cpu.flags == flags
    assert profile.compute_capability() == cc
    assert profile.runtimes == ()  # a recorded board: nothing probed from this Python
    if cc:
        assert profile.gpus[0].integrated
        assert profile.gpus[0].vendor == "nvidia"


def test_raspberry_pi_without_device_tree_uses_cpuinfo_model(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    text = (BOARDS / "rpi4b-bookworm" / "proc" / "cpuinfo").read_text()
    (tmp_path / "proc" / "cpuinfo").write_text(text)
    profile = detect_profile(tmp_path)
    assert profile.board.kind == "raspberry-pi"
    assert profile.board.model == "Raspberry Pi 4 Model B Rev 1.1"


def test_unreadable_and_missing_files_are_tolerated(tmp_path: Path) -> None:
    (tmp_path / "proc" / "cpuinfo").mkdir(parents=True)  # a directory where a file should be
    (tmp_path / "proc" / "device-tree").mkdir()
    (tmp_path / "proc" / "device-tree" / "model").write_bytes(b"\xff\xfe\0")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "nv_tegra_release").write_bytes(b"\x00garbage")
    profile = detect_profile(tmp_path)
    assert profile.cpu.cores == 1
    assert profile.memory_bytes == 0
    empty = detect_profile(tmp_path / "does-not-exist")
    assert empty.arch == "unknown"
    assert empty.board.kind == "generic"


def test_meminfo(tmp_path: Path) -> None:
    assert parse_meminfo("MemTotal:        7989048 kB\nMemFree: 1 kB\n") == 7989048 * 1024
    assert parse_meminfo("nothing here") == 0
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "meminfo").write_text("MemTotal:       16384 kB\n")
    assert detect_profile(tmp_path).memory_bytes == 16384 * 1024


@pytest.mark.parametrize(
    ("line", "l4t", "jetpack"),
    [
        ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic", "36.4.3", "6.2"),
        ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref", "35.4.1", "5.1.2"),
        ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref", "32.7.1", "4.6.1"),
        ("# R36 (release), REVISION: 9.9, GCID: 1", "36.9.9", None),
        ("# R36 (release), REVISION: 4", "36.4.0", "6.1"),
    ],
)
def test_nv_tegra_release(line: str, l4t: str, jetpack: str | None) -> None:
    assert parse_nv_tegra_release(line) == l4t
    assert jetpack_for(l4t) == jetpack


def test_jetpack_table_is_well_formed() -> None:
    for l4t, jp in JETPACK_BY_L4T.items():
        assert [int(p) for p in l4t.split(".")]
        assert [int(p) for p in jp.split(".")]


def test_device_tree_strings() -> None:
    assert parse_device_tree_strings(b"raspberrypi,5-model-b\0brcm,bcm2712\0") == (
        "raspberrypi,5-model-b",
        "brcm,bcm2712",
    )
    assert parse_device_tree_strings(b"") == ()


def test_live_host_profile() -> None:
    profile = detect_profile()
    assert profile.arch
    assert profile.cpu.cores >= 1
    assert profile.memory_bytes > 0
    ort = profile.runtime("onnxruntime")
    assert ort is not None
    assert "CPUExecutionProvider" in ort.devices
    names = {r.name for r in profile.runtimes}
    assert {"onnxruntime", "openvino", "tensorrt"} <= names
    for rt in profile.runtimes:
        assert rt.usable or rt.reason  # an unusable runtime always says why


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_cpuinfo_parser_never_crashes(text: str) -> None:
    parsed = parse_cpuinfo(text)
    assert parsed.processors >= 0


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                "processor\t: 0",
                "flags\t: avx2 amx_tile lm",
                "Features\t: asimddp",
                "Model\t: ",
                "CPU implementer\t: 0x41",
                "CPU part\t: 0xd0b",
                ":",
                "model name:",
                "\t: x",
            ]
        )
        | st.text(max_size=40)
    ).map("\n".join)
)
def test_cpuinfo_parser_on_cpuinfo_like_text(text: str) -> None:
    parsed = parse_cpuinfo(text)
    assert all(isinstance(f, str) and f for f in parsed.flags)


@settings(max_examples=300, deadline=None)
@given(st.text() | st.builds(lambda a, b: f"# R{a} (release), REVISION: {b}", st.text(), st.text()))
def test_nv_tegra_release_parser_never_crashes(text: str) -> None:
    result = parse_nv_tegra_release(text)
    assert result is None or len(result.split(".")) == 3


@settings(max_examples=200, deadline=None)
@given(st.binary())
def test_device_tree_parser_never_crashes(data: bytes) -> None:
    assert all("\0" not in s for s in parse_device_tree_strings(data))
