# parallel-dispatch daemon: watches /workspace for task files and runs them.
# Agent CLIs are not included; build FROM this image and install the ones you use.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/parallel-dispatch
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# The daemon extra (watchfiles): `watch` is what this image runs.
RUN pip install --no-cache-dir './[daemon]' \
    && groupadd --gid 10001 dispatch \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin dispatch

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
WORKDIR /workspace

ENTRYPOINT ["parallel-dispatch"]
CMD ["watch", "/workspace"]
