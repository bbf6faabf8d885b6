"""Dayloop's data plane: Triton (user tower), the FAISS index service, the router, the user
simulator and Prometheus configuration. Never imports ``dayloop``; the control plane reaches
it only through :mod:`serving.client` and the services' HTTP/gRPC APIs."""
