"""An RTSP camera on loopback for the stream tests: GStreamer's RTSP server (Debian
``gir1.2-gst-rtsp-server-1.0`` with ``python3-gi``), run by the system Python as a process of its
own. It serves ``rtsp://127.0.0.1:<port>/cam``: a generated moving test pattern, MJPEG over RTP,
at the given frame rate. Prints ``ready <port>`` once it listens.

    /usr/bin/python3 tests/agent/loop/rtsp_server.py PORT FPS   (PORT 0: any free port)
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
port, fps = sys.argv[1], int(sys.argv[2])
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    "( videotestsrc is-live=true pattern=ball "
    f"! video/x-raw,format=I420,width=320,height=240,framerate={fps}/1 "
    "! jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26 )"
)
factory.set_shared(True)
server.get_mount_points().add_factory("/cam", factory)
server.attach(None)
print(f"ready {server.get_bound_port()}", flush=True)
GLib.MainLoop().run()
