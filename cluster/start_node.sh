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
if [ "$(id -u)" = 0 ]; then
    namespace=(unshare --mount --propagation private)
else
    namespace=(unshare --user --map-root-user --mount --propagation private)
fi
exec env -u CYCLEGAN_HOME HOME="$private/home" "${namespace[@]}" \
    sh -c 'mount --bind "$0" /tmp && exec "$@"' "$private/tmp" \
    "${RAY:-ray}" start --address="$address" --temp-dir="/tmp/ray-$name" --disable-usage-stats "$@"
