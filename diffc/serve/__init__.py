"""``diffc serve``: a small OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of one engine.

``protocol`` holds the wire format, ``routes`` the endpoints, ``engine`` the single worker thread that
owns the pipeline, ``storage`` the output files, ``metrics`` the Prometheus registry, ``app`` the
FastAPI factory. Needs the ``serve`` extra: ``pip install 'diffc[serve]'``.
"""
