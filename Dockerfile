# One image for every service; the compose file picks the command.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY andes andes
COPY gateway gateway
COPY scheduler_service scheduler_service
COPY worker worker
COPY loadgen loadgen
COPY profiles profiles
RUN pip install --no-cache-dir .
ENV ANDES_PROFILES_DIR=/app/profiles PYTHONUNBUFFERED=1
USER nobody
