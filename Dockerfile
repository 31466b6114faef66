# The broker image: API (`broker serve`), migrations (`broker migrate`). Production mode needs
# DATABASE_URL and real secrets; the embedded PostgreSQL and the simulator are never used here.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# Dependencies and the `broker` script only: the package itself runs from /app, beside the
# alembic/ folder that `broker migrate` reads.
RUN pip install --no-cache-dir --prefix=/install . \
 && rm -rf /install/lib/python3.11/site-packages/service

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /app broker
WORKDIR /app
COPY --from=build /install /usr/local
COPY alembic.ini ./
COPY alembic ./alembic
COPY service ./service
ENV PYTHONPATH=/app \
    BROKER_ENV=production \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8000 \
    PYTHONUNBUFFERED=1
USER broker
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["broker", "serve"]
