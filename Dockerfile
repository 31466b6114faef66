# The broker image: API (`broker serve`), migrations (`broker migrate`), the refresher
# (`broker refresher`) and, for the compose demo only, the simulator (`broker simulator`).
# Production mode needs DATABASE_URL and real secrets; it never starts an embedded PostgreSQL
# and the simulator refuses to run in it.
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements/runtime.txt ./requirements/
# The runtime dependencies exactly as uv.lock pins them (requirements/runtime.txt is its export):
# every file's hash checked, nothing resolved, wheels only so no sdist's build code runs. No dev
# extra, so no embedded PostgreSQL. tests/test_lock.py runs this same command in a scratch venv.
RUN pip install --no-cache-dir --prefix=/install \
      --require-hashes --no-deps --only-binary=:all: -r requirements/runtime.txt

FROM python:3.11-slim
# The data dir exists, owned by the broker user, so a fresh named volume mounted on it (the dev
# encryption key shared by the API and the refresher) inherits that ownership.
RUN useradd --system --user-group --uid 10001 --home-dir /app --no-create-home broker \
 && mkdir -p /app/.broker \
 && chown broker:broker /app/.broker \
 && chmod 700 /app/.broker
WORKDIR /app
COPY --from=build /install /usr/local
COPY alembic.ini ./
COPY alembic ./alembic
COPY service ./service
# The `broker` command as pip writes it for [project.scripts]: the package runs from /app, beside
# the alembic/ folder that `broker migrate` reads, so nothing is built and no unlocked build
# backend is downloaded.
RUN printf '#!/usr/local/bin/python\nimport sys\nfrom service.ops.cli import main\nsys.exit(main())\n' \
      > /usr/local/bin/broker \
 && chmod 755 /usr/local/bin/broker
# Compiled now: the broker user cannot write __pycache__ under /app.
RUN python -m compileall -q /app/service /app/alembic
ENV PYTHONPATH=/app \
    BROKER_ENV=production \
    BROKER_DATA_DIR=/app/.broker \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8000 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER broker
# 8000: the API; 9464: `broker refresher`'s /metrics.
EXPOSE 8000 9464
# For `broker serve` (liveness; balancers use /readyz). Other commands set their own.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["broker", "serve"]
