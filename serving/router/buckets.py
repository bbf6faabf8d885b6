"""The router's histogram bounds (stdlib only, so the control plane's tests and benchmarks can
read them without prometheus_client, which only the serving venv has)."""

LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05,
                   0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0)
SCORE_BUCKETS = tuple(round(-1.0 + 0.1 * i, 1) for i in range(21))
