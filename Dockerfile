# railwatch daemon image: the same install as `make` (pip install of the package from pyproject.toml).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAILWATCH_CONFIG=/etc/railwatch/railwatch.toml

# Non-root user that owns only the state folder.
RUN groupadd --system --gid 10001 railwatch \
    && useradd --system --uid 10001 --gid railwatch --home-dir /var/lib/railwatch --create-home railwatch

WORKDIR /opt/railwatch
COPY pyproject.toml README.md ./
COPY service ./service
# rasterio, shapely and pyproj ship manylinux wheels with GDAL/GEOS/PROJ inside: no apt packages needed.
RUN pip install --no-cache-dir .

COPY config/railwatch.toml /etc/railwatch/railwatch.toml
COPY aoi /etc/railwatch/aoi

# Relative paths in the config resolve against the working directory: state lives in the volume.
WORKDIR /var/lib/railwatch
ENV RAILWATCH_AOI__DIR=/etc/railwatch/aoi \
    RAILWATCH_IMAGERY__FILES__ROOT=/var/lib/railwatch/archive \
    RAILWATCH_STORE__URL=sqlite:////var/lib/railwatch/railwatch.db \
    RAILWATCH_DAEMON__LISTEN=0.0.0.0:9466 \
    MALLOC_ARENA_MAX=2
# Health and Prometheus metrics (the soak showed glibc arenas hold memory without MALLOC_ARENA_MAX).
EXPOSE 9466
VOLUME ["/etc/railwatch", "/var/lib/railwatch"]
USER 10001:10001

# The daemon's /healthz on [daemon] listen (default 127.0.0.1:9466): 200 while the scheduler runs and
# the store answers, 503 (an exception here, so exit 1) otherwise. slim has no curl: Python's urllib.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:9466/healthz', timeout=4)"]

ENTRYPOINT ["railwatch"]
CMD ["run"]
