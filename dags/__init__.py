"""Dayloop's DAG files. A package only so the layering contracts (pyproject.toml,
``make lint``) can name it; Airflow parses each file on its own."""
