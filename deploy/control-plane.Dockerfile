# edgefleet control plane: HTTP API, model registry and variant builds, TUF repository,
# telemetry ingestion and rollouts. Used by deploy/compose.yaml.
FROM python:3.12.8-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY control_plane ./control_plane
RUN python -m venv /opt/edgefleet \
 && /opt/edgefleet/bin/pip install --only-binary=:all: ".[control-plane,postgres]"

FROM python:3.12.8-slim-bookworm
RUN groupadd --system --gid 10002 edgefleet \
 && useradd --system --uid 10002 --gid edgefleet --home-dir /var/lib/edgefleet edgefleet \
 && install -d -o edgefleet -g edgefleet -m 0750 /var/lib/edgefleet
COPY --from=build /opt/edgefleet /opt/edgefleet
ENV PATH=/opt/edgefleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    EDGEFLEET_CP__DATA_DIR=/var/lib/edgefleet \
    EDGEFLEET_CP__HOST=0.0.0.0
USER 10002:10002
VOLUME ["/var/lib/edgefleet"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["edgectl"]
CMD ["serve"]
