# syntax=docker/dockerfile:1
# uffdd in a container. It needs the host's userfaultfd and the VMM's socket directory:
#   docker run --device /dev/userfaultfd -v /run/uffdd:/run/uffdd \
#     -v /var/lib/uffdd:/var/lib/uffdd:ro -v /etc/uffdd:/etc/uffdd:ro uffdd
# No extra capability is needed when VMMs pass their userfaultfds over the socket (the usual
# case); /dev/userfaultfd serves bare ones (give uid 10001 access to it on the host). Docker's
# default seccomp profile allows userfaultfd(2) only with CAP_SYS_PTRACE, which the device
# makes unnecessary. See configs/README.md. Without a service manager there is no fd store:
# sessions end with the container.

# The full image has the C compiler that builds uffdd's fault fast path into the wheel.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY uffdd ./uffdd
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 uffdd \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin uffdd \
    && mkdir -p /run/uffdd /etc/uffdd /var/lib/uffdd \
    && chown uffdd:uffdd /run/uffdd
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY configs/uffdd.yaml /etc/uffdd/uffdd.yaml
USER 10001:10001
# Healthy when the daemon answers on its control socket (next to the VMM socket).
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s \
    CMD ["uffdd", "status", "--quiet", "--socket", "/run/uffdd/uffdd.ctl", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["uffdd"]
CMD ["run", "-c", "/etc/uffdd/uffdd.yaml"]
