#!/usr/bin/env bash
# Installs edge-agent as a systemd service on a robot (Jetson, Raspberry Pi, x86).
# Usage: sudo deploy/install.sh [EXTRAS]     e.g. EXTRAS=agent,openvino   or  agent,tensorrt
# Jetson: run with the system Python 3.10 so TensorRT's system bindings are visible
# (the venv is created with --system-site-packages for that reason).
set -euo pipefail
extras=${1:-agent,openvino}
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/edge-agent
python=${PYTHON:-python3}

[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "install.sh: Python 3.10 or newer is required" >&2; exit 1; }

"$python" -m venv --system-site-packages "$prefix"
"$prefix/bin/pip" install --quiet --upgrade pip
"$prefix/bin/pip" install --quiet "$src[$extras]"
install -d -m 0755 "$prefix/share/docs"
cp "$src"/docs/*.md "$prefix/share/docs/"
install -d -m 0755 /etc/edge-agent
if [ ! -f /etc/edge-agent/agent.toml ]; then
  install -m 0640 "$src/deploy/systemd/agent.toml.example" /etc/edge-agent/agent.toml
  echo "install.sh: wrote /etc/edge-agent/agent.toml from the example: edit it before starting"
fi
install -m 0644 "$src/deploy/systemd/edge-agent.service" /etc/systemd/system/edge-agent.service
systemctl daemon-reload
systemctl enable edge-agent.service
echo "install.sh: enabled edge-agent.service; start it with: systemctl start edge-agent"
