"""The thin Airflow layer: operators, the deferrable sync sensor and its trigger."""
