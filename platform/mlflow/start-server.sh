#!/usr/bin/env bash
# The shared MLflow tracking server: runs and params in PostgreSQL, artifacts in an S3-compatible bucket that the
# server proxies (clients need no bucket credentials, only the server's URL). Every setting comes from the
# environment (see env.example); nothing secret is written in a file or passed on the command line.
set -euo pipefail

missing=()
require() {
    local name
    for name in "$@"; do
        [[ -n "${!name:-}" ]] || missing+=("$name")
    done
}

# The backend store: a whole URI, or its PostgreSQL parts.
if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
    require POSTGRES_HOST POSTGRES_USER POSTGRES_PASSWORD POSTGRES_DB
fi
require MLFLOW_ARTIFACTS_DESTINATION
# An S3-compatible store (MinIO, Ceph, ...) needs keys; on AWS itself boto3 may also use an instance role.
if [[ -n "${MLFLOW_S3_ENDPOINT_URL:-}" ]]; then
    require AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
fi
if ((${#missing[@]})); then
    echo "start-server.sh: missing required environment variable(s): ${missing[*]} (see platform/mlflow/env.example)" >&2
    exit 2
fi
if [[ "$MLFLOW_ARTIFACTS_DESTINATION" != s3://* ]]; then
    echo "start-server.sh: MLFLOW_ARTIFACTS_DESTINATION must be an s3:// URI, got '$MLFLOW_ARTIFACTS_DESTINATION'" >&2
    exit 2
fi

# Fail now rather than at the first run or the first artifact upload.
if ! python3 -c 'import boto3, psycopg' 2>/dev/null; then
    echo "start-server.sh: the server needs boto3 and psycopg (pip install boto3 'psycopg[binary]')" >&2
    exit 2
fi

if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
    # The password may hold characters that are special in a URI.
    password=$(python3 -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["POSTGRES_PASSWORD"], safe=""))')
    MLFLOW_BACKEND_STORE_URI="postgresql://${POSTGRES_USER}:${password}@${POSTGRES_HOST}:${POSTGRES_PORT:-5432}/${POSTGRES_DB}"
fi
# mlflow reads the backend store from the environment, which keeps the password out of the process list.
export MLFLOW_BACKEND_STORE_URI

# Loopback unless told otherwise: inside a container or behind a proxy, set MLFLOW_HOST=0.0.0.0 and
# MLFLOW_SERVER_ALLOWED_HOSTS to the names clients use.
exec mlflow server \
    --host "${MLFLOW_HOST:-127.0.0.1}" \
    --port "${MLFLOW_PORT:-5000}" \
    --serve-artifacts \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
