#!/usr/bin/env bash
# Re-resolves the agent images' pinned dependency sets for their target platforms (aarch64) from
# the project's extras, without downloading wheels: `pip install --dry-run --report`.
# Run from the repository root after changing dependencies in pyproject.toml.
set -euo pipefail
pip=${PIP:-.venv/bin/pip}
plat=(--platform manylinux_2_35_aarch64 --platform manylinux_2_34_aarch64 --platform manylinux_2_31_aarch64
      --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64
      --platform manylinux2014_aarch64)
resolve() {  # python-version extras output header
  local report; report=$(mktemp)
  "$pip" install -q --dry-run --ignore-installed --only-binary=:all: "${plat[@]}" \
    --python-version "$1" --implementation cp --target "$(mktemp -d)" --report "$report" ".[$2]"
  python3 - "$report" "$3" "$4" <<'PY'
import json, sys
report, out, head = sys.argv[1:]
pins = sorted(f"{i['metadata']['name'].lower()}=={i['metadata']['version']}"
              for i in json.load(open(report))["install"]
              if i["metadata"]["name"].lower() != "edgefleet")
with open(out, "w") as f:
    f.write(f"# Pinned versions for {head}\n# Regenerate: deploy/constraints/regenerate.sh\n")
    f.write("\n".join(pins) + "\n")
PY
}
resolve 3.10 agent,openvino,tensorrt deploy/constraints/jetson-py310-aarch64.txt \
  "Jetson (JetPack 6, Ubuntu 22.04, Python 3.10, aarch64): agent,openvino,tensorrt extras.
# onnxruntime-gpu replaces onnxruntime from NVIDIA's Jetson index in Dockerfile.jetson."
resolve 3.11 agent,openvino deploy/constraints/rpi-py311-aarch64.txt \
  "Raspberry Pi (Debian 12, Python 3.11, aarch64): agent,openvino extras."
echo "constraints regenerated"
