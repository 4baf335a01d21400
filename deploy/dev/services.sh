#!/usr/bin/env bash
# Starts the local Mosquitto and PostgreSQL that the test suite talks to, if they are not running,
# and installs HAProxy (Debian package) when it is missing.
# Idempotent; prints what it did. Used by `make test` and `make demo`.
set -u
port_open() { python3 - "$1" <<'PY'
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}
wait_port() { for _ in $(seq 1 30); do port_open "$1" && return 0; sleep 0.5; done; return 1; }

if port_open 1883; then
  echo "mosquitto: running on 127.0.0.1:1883"
elif command -v mosquitto >/dev/null 2>&1; then
  conf=/etc/mosquitto/mosquitto.conf
  if [ -f "$conf" ]; then mosquitto -d -c "$conf"; else mosquitto -d -p 1883; fi
  wait_port 1883 && echo "mosquitto: started" || echo "mosquitto: failed to start" >&2
else
  echo "mosquitto: not installed (apt-get install mosquitto); broker tests will fail" >&2
fi

if port_open 5432; then
  echo "postgresql: running on 127.0.0.1:5432"
elif command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  for v in $(ls /etc/postgresql); do pg_ctlcluster --skip-systemctl-redirect "$v" main start || true; done
  wait_port 5432 && echo "postgresql: started" || echo "postgresql: failed to start" >&2
else
  echo "postgresql: not installed (apt-get install postgresql); postgres tests will fail" >&2
fi
# HAProxy balances several `edgectl serve` replicas in the scale-out tests and the fleet bench.
if command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ]; then
  echo "haproxy: installed"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q haproxy >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q haproxy >/dev/null 2>&1; }) \
    && echo "haproxy: installed (apt-get)" || echo "haproxy: apt-get install haproxy failed" >&2
else
  echo "haproxy: not installed (apt-get install haproxy); load-balancer tests will fail" >&2
fi
# wrk (Debian package) drives the fixed-rate desired-state poll search in bench/bench_fleet.py.
if command -v wrk >/dev/null 2>&1; then
  echo "wrk: installed"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q wrk >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wrk >/dev/null 2>&1; }) \
    && echo "wrk: installed (apt-get)" || echo "wrk: apt-get install wrk failed" >&2
else
  echo "wrk: not installed (apt-get install wrk); bench_fleet.py falls back to its Python poller" >&2
fi
# promtool (Debian's prometheus package) checks the alert rules under deploy/prometheus/.
if command -v promtool >/dev/null 2>&1; then
  echo "promtool: installed"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }) \
    && echo "promtool: installed (apt-get install prometheus)" || echo "promtool: apt-get install prometheus failed" >&2
else
  echo "promtool: not installed (apt-get install prometheus); the rules test checks structure only" >&2
fi
# Chromium (Debian's package) for the browser tests of the fleet page (Playwright drives it at
# /usr/bin/chromium; `playwright install` is never needed).
if [ -x /usr/bin/chromium ]; then
  echo "chromium: installed"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }) \
    && echo "chromium: installed (apt-get)" || echo "chromium: apt-get install chromium failed" >&2
else
  echo "chromium: not installed (apt-get install chromium); the browser tests are skipped" >&2
fi
# GStreamer's RTSP server for the system Python: the RTSP camera of the stream tests.
if /usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" >/dev/null 2>&1; then
  echo "gst-rtsp-server: installed"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  rtsp_pkgs="python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good"
  (apt-get install -y -q --no-install-recommends $rtsp_pkgs >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $rtsp_pkgs >/dev/null 2>&1; }) \
    && echo "gst-rtsp-server: installed (apt-get)" || echo "gst-rtsp-server: apt-get install failed" >&2
else
  echo "gst-rtsp-server: not installed (apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi); the RTSP camera tests are skipped" >&2
fi
exit 0
