"""The demo's control plane process: ``create_app`` under uvicorn, settings from the environment.

``python -m demo.server`` is ``edgectl serve`` that also stops when the demo
that started it is gone (``exit_with_parent``), so a demo killed outright leaves no control
plane behind.
"""

from __future__ import annotations

import sys


def main() -> int:
    import uvicorn

    from agent.logs import configure_logging
    from control_plane.app import create_app
    from control_plane.settings import Settings
    from demo.procs import exit_with_parent

    settings = Settings()  # type: ignore[call-arg]  # the demo passes every field in the env
    configure_logging(settings.log_level)
    app = create_app(settings)
    exit_with_parent()  # uvicorn turns our SIGTERM into a clean shutdown
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
