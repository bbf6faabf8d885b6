"""Dayloop: the daily refresh loop for a two-tower recommendation model.

All logic lives here; Airflow DAG files make one call per task into this package.
"""

__version__ = "0.1.0"
