#!/usr/bin/env bash
# Event mode for watch-bucket: S3 event notifications -> SQS, consumed by the watch-events flow.
#
#   infra/setup-sqs.sh <bucket> [queue-name] [key-prefix]
#
# Creates the queue (idempotent), a queue policy that lets only this bucket send to it, and a
# notification for ObjectCreated/ObjectRemoved under <key-prefix>models/ (infra/s3-sqs-notification.json),
# keeping the bucket's other notification configurations. Prints the queue URL; then
#
#   prefect deployment run watch-events/... or  python -c 'from flows.events import watch_events; watch_events(URL, "s3://bucket")'
#
# Credentials and region come from the usual AWS environment; TRTFLOW_S3_ENDPOINT_URL and
# AWS_ENDPOINT_URL_SQS point it at MinIO/moto/LocalStack instead of AWS.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 <bucket> [queue-name] [key-prefix]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" - "$@" <<'PYEOF'
import sys
from flows.events import setup_event_notifications

bucket = sys.argv[1]
queue = sys.argv[2] if len(sys.argv) > 2 else "trtflow-model-events"
prefix = sys.argv[3] if len(sys.argv) > 3 else ""
print(setup_event_notifications(bucket, queue, prefix))
PYEOF
