#!/usr/bin/env bash
# Prepare the test server started by docker-compose.yml for `pytest -m live_omero`:
# wait until it answers, then add a read-annotate group and a user in it. The live suite logs
# in as root (which holds every admin privilege, Sudo included) as the service account and acts
# as this user, exactly as workers do in production.
set -euo pipefail
cd "$(dirname "$0")"
omero() { docker compose exec -T omeroserver /opt/omero/server/venv3/bin/omero "$@"; }
login=(-s localhost -u root -w omero)
for _ in $(seq 1 60); do
    omero login "${login[@]}" >/dev/null 2>&1 && break
    sleep 5
done
omero login "${login[@]}"
omero group add hwsi-test --type read-annotate --ignore-existing
omero user add hwsi-user HWSI Tester --group-name hwsi-test --userpassword hwsi-user \
    --ignore-existing
echo "OMERO test server ready: service account root/omero, user hwsi-user in group hwsi-test"
