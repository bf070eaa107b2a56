# One image for every crew: `docker run ... waterdoctor <crew>`.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir "uv==0.13.9"
COPY pyproject.toml uv.lock README.md ./
COPY handoff handoff
COPY ingest ingest
COPY analytics analytics
COPY alerting alerting
COPY retention retention
COPY simulators simulators
COPY waterdoctor waterdoctor
# Bytecode compiled here: the crews run as nobody, who cannot write it, and would compile every library from
# source at each start (seconds of CPU per crew and per fit process).
RUN uv sync --frozen --no-dev --compile-bytecode \
    && /app/.venv/bin/python -m compileall -q handoff ingest analytics alerting retention simulators waterdoctor \
    && ln -s /app/.venv/bin/waterdoctor /usr/local/bin/waterdoctor
# The analytics kernels (numba) compile once here; the crews run as nobody, who can read and extend this cache.
ENV NUMBA_CACHE_DIR=/app/.numba-cache
RUN /app/.venv/bin/python -c "import analytics._jit" && chmod -R a+rwX /app/.numba-cache
USER nobody
