"""Online serving: the OpenAI-compatible HTTP server (``api_server.py``) over ``AsyncLLM``, its
request bodies (``protocol.py``), the generation endpoints (``serving.py``) and the
``portable-xy serve`` command (``cli.py``)."""
