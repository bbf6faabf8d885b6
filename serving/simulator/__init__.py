"""User simulator: open-loop requests to the router, clicks drawn from a panel of real tastes.

Run with ``python -m serving.simulator``; the pure parts (panel, click model, accounting)
live in :mod:`serving.simulator.core`.
"""
