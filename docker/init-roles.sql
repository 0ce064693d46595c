-- Runs once, on first start, on both demo servers (pg-old and pg-new) via /docker-entrypoint-initdb.d.
-- Passwords come from the container's environment (psql \getenv, psql >= 15), never from this file.
\set ON_ERROR_STOP on
\getenv replicator_password PGU_REPLICATION_PASSWORD
\getenv app_password PGU_APP_PASSWORD
\getenv probe_password PGU_PROBE_PASSWORD

CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'replicator_password';
CREATE ROLE app LOGIN PASSWORD :'app_password';
-- The health probes' read-only role (README, Deployment security).
CREATE ROLE prober LOGIN PASSWORD :'probe_password';
GRANT pg_read_all_data TO prober;
