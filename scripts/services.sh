#!/usr/bin/env bash
# Start the local services the test-suite and the job system use: PostgreSQL, Redis, RabbitMQ.
# Installs a service from Debian packages when missing (needs root), starts it when it is not
# answering, and waits until it is ready. Safe to run again: running services are left alone.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "services.sh: installing $1 needs root" >&2; exit 1; }; }
installed_apt_update=0
apt_install() {
  need_root "$*"
  if [ "$installed_apt_update" = 0 ]; then apt-get update -qq; installed_apt_update=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {  # name port seconds
  for _ in $(seq 1 "$3"); do port_open "$2" && { echo "$1 ready on 127.0.0.1:$2"; return 0; }; sleep 1; done
  echo "services.sh: $1 did not answer on 127.0.0.1:$2 within $3 s" >&2; return 1
}

# Redis
if ! port_open 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi
wait_port Redis 6379 30

# PostgreSQL (trust auth on 127.0.0.1 is the Debian default for local test clusters)
if ! port_open 5432; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
fi
wait_port PostgreSQL 5432 60

# RabbitMQ
if ! port_open 5672; then
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  rabbitmq-server -detached
fi
wait_port RabbitMQ 5672 120
