"""The FAISS index service: item indexes for several model versions, searched over HTTP.

Modules, from the wire inwards:

* ``app``: the FastAPI application and its routes (``python -m serving.index_service``
  runs it);
* ``service``: the version table, loads, unloads and searches;
* ``protocol``: request bodies, URL versions, query vectors and result rows;
* ``sources``: where an index directory is fetched from (directory, ``file://``, HTTP);
* ``meta``: ``index_meta.json`` and the file names;
* ``loading``: fetch, verify and deserialise one index directory;
* ``faiss_params``: FAISS search knobs (nprobe, efSearch), shared with ``dayloop.index``;
* ``metrics``: the Prometheus metrics;
* ``errors``: ``ServiceError``, an error with its HTTP status;
* ``client``: the lightweight clients the control plane and the router use (stdlib,
  httpx, numpy only).

This file stays empty of imports so that importing the client never loads FAISS.
"""
