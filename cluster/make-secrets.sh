#!/bin/sh
# Creates the cluster's two secrets on your machine, outside the repo, readable by you only:
#   ~/.cyclegan-cluster/ray_auth_token   Ray's token (RAY_AUTH_MODE=token on every node)
#   ~/.cyclegan-cluster/mlflow_password  the password of MLflow's `admin` user
# `ray up cluster/gpu.yaml` copies the directory to every node (file_mounts); nothing secret is
# written into the YAML or the repo. Existing files are kept, so running it again is safe.
# Usage: sh cluster/make-secrets.sh
set -eu
dir="$HOME/.cyclegan-cluster"
umask 077
mkdir -p "$dir"
chmod 700 "$dir"
for name in ray_auth_token mlflow_password; do
    if [ -s "$dir/$name" ]; then
        echo "kept    $dir/$name"
    else
        # 256 random bits as 64 hex characters (MLflow wants at least 12).
        python3 -c 'import secrets; print(secrets.token_hex(32))' > "$dir/$name"
        echo "created $dir/$name"
    fi
    chmod 600 "$dir/$name"
done
