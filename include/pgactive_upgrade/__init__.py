"""Rolling major-version upgrades of PostgreSQL with pgactive or native logical replication."""
