#!/usr/bin/env bash
# A local PostgreSQL server for the tests that need one: installed from Debian's packages when missing,
# started, with a login role that may create databases (each test makes its own). Prints the line
# `export MNIST_DIFF_TEST_PG=postgresql://...` (no database name) for `eval`; everything else goes to stderr.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
  (apt-get install -y -q postgresql || (apt-get update -q && apt-get install -y -q postgresql)) >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
pg_lsclusters -h | grep -q "^$version main " || pg_createcluster "$version" main >&2
pg_ctlcluster "$version" main start >&2 2>&1 || true  # "already running" is fine; pg_isready decides
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
pg_isready -h 127.0.0.1 >&2
su postgres -c "psql -q -v ON_ERROR_STOP=1" >&2 <<'SQL'
SELECT 'CREATE ROLE mnist_diff LOGIN CREATEDB PASSWORD ''mnist_diff'''
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mnist_diff')\gexec
SQL
echo "export MNIST_DIFF_TEST_PG=postgresql://mnist_diff:mnist_diff@127.0.0.1:5432"
