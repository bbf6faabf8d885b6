"""User simulator: open-loop requests to the router, clicks drawn from a panel of real tastes.

Run with ``python -m serving.simulator`` (``__main__``: the command line). The run is
:mod:`serving.simulator.simulator`; the pure parts (click model, response checks,
accounting) live in :mod:`serving.simulator.core`, and the panel file's format, written by
the control plane and read here, in :mod:`serving.simulator.panel_format`.
"""
