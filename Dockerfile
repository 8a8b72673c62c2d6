# The pluginhost image: the library, the workflows package and the onboarding example.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# only what the install needs, so an edit to the example does not reinstall everything
COPY pyproject.toml README.md ./
COPY pluginhost ./pluginhost
COPY workflows ./workflows
# Flower 2.x: the README's notes on its API and authentication are about 2.x
RUN pip install ".[postgres,redis]" "flower>=2,<3"

# the example is imported from /app (PYTHONPATH), not installed
COPY examples ./examples

RUN useradd --create-home --uid 1000 pluginhost
USER pluginhost

CMD ["celery", "-A", "examples.onboarding.app", "worker", "--loglevel=INFO"]
