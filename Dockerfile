# syntax=docker/dockerfile:1
# uffdd in a container. It needs the host's userfaultfd and the VMM's socket directory:
#   docker run --device /dev/userfaultfd -v /run/uffdd:/run/uffdd \
#     -v /var/lib/uffdd:/var/lib/uffdd:ro -v /etc/uffdd:/etc/uffdd:ro uffdd
# (see README "Running it as a service").

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY uffdd ./uffdd
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin uffdd \
    && mkdir -p /run/uffdd /etc/uffdd /var/lib/uffdd \
    && chown uffdd:uffdd /run/uffdd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY configs/uffdd.yaml /etc/uffdd/uffdd.yaml
USER uffdd
HEALTHCHECK --interval=30s --timeout=5s CMD ["python", "-c", "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/uffdd/uffdd.sock')"]
ENTRYPOINT ["uffdd"]
CMD ["run", "-c", "/etc/uffdd/uffdd.yaml"]
