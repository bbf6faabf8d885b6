"""Domain errors. Each carries a human-readable reason; Airflow wrappers turn the
gate failures into non-retryable task failures (retrying a failed gate changes nothing)."""

from __future__ import annotations


class DayloopError(Exception):
    """Base class for every error Dayloop raises on purpose."""


class DataUnavailable(DayloopError):
    """The source has no data for the requested logical date."""


class GateFailed(DayloopError):
    """A gate decided no. ``reasons`` lists every failed check in words."""

    def __init__(self, gate: str, reasons: list[str]):
        self.gate = gate
        self.reasons = list(reasons)
        super().__init__(f"{gate} failed: " + "; ".join(self.reasons))


class DataGateFailed(GateFailed):
    def __init__(self, reasons: list[str]):
        super().__init__("data gate", reasons)


class OfflineGateFailed(GateFailed):
    def __init__(self, reasons: list[str]):
        super().__init__("offline gate", reasons)


class IndexGateFailed(GateFailed):
    def __init__(self, reasons: list[str]):
        super().__init__("index gate", reasons)
