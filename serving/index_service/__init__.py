"""The FAISS index service: item indexes for several model versions, searched over HTTP.

``app`` holds the FastAPI application (FAISS, FastAPI, prometheus_client), ``client`` the
lightweight clients the control plane and the router use (stdlib, httpx, numpy only).
This file stays empty of imports so that importing the client never loads FAISS.
"""
