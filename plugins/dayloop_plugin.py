"""Dayloop's Airflow plugin: registers the run listener that clears a canary left routed by a
daily run that ended without its rollback task (see dayloop.airflow.listener)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from dayloop.airflow import listener


class DayloopPlugin(AirflowPlugin):
    name = "dayloop"
    listeners = [listener]
