#!/usr/bin/env bash
# Start a Ray worker node on this machine that sees none of the driver's files: the node runs in
# its own mount namespace with PRIVATE/tmp bound over /tmp (so the driver's /tmp, and every
# CYCLEGAN_HOME or working folder under it, is out of sight), HOME set to PRIVATE/home, and
# CYCLEGAN_HOME unset. What it writes stays under PRIVATE, where it can be inspected afterwards.
#
#   cluster/start_node.sh HEAD_ADDRESS PRIVATE NAME [ray start flags...]
#   cluster/start_node.sh 127.0.0.1:6390 runs/cluster-local/node2 node2 --num-cpus 2 \
#       --resources '{"trainer": 1}'
#
# Ray keeps the node's session under /tmp/ray-NAME inside the namespace (PRIVATE/tmp/ray-NAME
# outside), so `pgrep -f /tmp/ray-NAME` finds the node's processes. Needs root or unprivileged
# user namespaces (unshare --user). RAY (default: ray on PATH) is the ray command to run.
set -euo pipefail
if [ $# -lt 3 ]; then
    sed -n '2,14p' "$0" >&2
    exit 2
fi
address=$1 private=$2 name=$3
shift 3
case "$name" in *[!A-Za-z0-9_-]* | "") echo "start_node.sh: bad node name '$name'" >&2; exit 2 ;; esac
mkdir -p "$private/tmp" "$private/home"
private=$(cd "$private" && pwd)
# The project and its venv stay visible where they live under /tmp (a checkout in a temporary
# folder): they are the node's installed software, not the driver's files.
project=$(cd "$(dirname "$0")/.." && pwd)
ray_bin=$(command -v "${RAY:-ray}")
venv=$(cd "$(dirname "$ray_bin")/.." && pwd)
keep=""
case "$venv" in "$project"/*) venv="$project" ;; esac
for dir in $(printf '%s\n%s\n' "$project" "$venv" | sort -u); do
    case "$dir" in /tmp/*) keep="$keep$dir
" ;; esac
done
if [ "$(id -u)" = 0 ]; then
    namespace=(unshare --mount --propagation private)
else
    namespace=(unshare --user --map-root-user --mount --propagation private)
fi
# Inside the namespace: each kept folder is bound into the private /tmp at its own path, then
# the private /tmp (with those binds) replaces /tmp.
exec env -u CYCLEGAN_HOME HOME="$private/home" KEEP="$keep" "${namespace[@]}" sh -c '
    printf "%s" "$KEEP" | while IFS= read -r dir; do
        [ -n "$dir" ] || continue
        mkdir -p "$0/${dir#/tmp/}" && mount --bind "$dir" "$0/${dir#/tmp/}" || exit 1
    done || exit 1
    mount --rbind "$0" /tmp && exec "$@"' "$private/tmp" \
    "$ray_bin" start --address="$address" --temp-dir="/tmp/ray-$name" --disable-usage-stats "$@"
