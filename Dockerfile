# Stem's image: the `stem` CLI with the Redis, Postgres and YAML extras, the examples,
# running as an unprivileged user. Build from the repository root:
#   docker build -t stem-tasks:dev .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stem ./stem
COPY cli ./cli
# Wheels for Stem and every dependency, so the final stage needs no compiler or cache.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[redis,postgres,yaml]"

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --home-dir /home/stem --uid 10001 stem
COPY --from=build /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY --chown=stem:stem examples ./examples
USER stem
# Healthy while the stores named by STEM_* (broker, backend, revoke and rate-limit
# stores) answer: the same URLs the worker uses when its app reads the environment.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["stem", "health"]
ENTRYPOINT []
CMD ["stem", "--help"]
