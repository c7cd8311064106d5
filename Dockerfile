# The example app's image: the same image runs the web app and the worker (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EXAMPLE_INSTANCE_PATH=/data

WORKDIR /app
COPY . .
RUN pip install . \
    && useradd --create-home app \
    && mkdir -p /data && chown app /data
USER app

EXPOSE 5000
CMD ["flask", "--app", "example_app", "run", "--host", "0.0.0.0", "--port", "5000"]
