"""The router: Dayloop's public request path (``/recommend``, ``/feedback``)."""
