"""Serving to other tools: an OpenAI-compatible HTTP endpoint on its own port (``/v1/models``,
``/v1/chat/completions``, ``/v1/completions``, with SSE streaming) over the workspace's models.

* :mod:`~services.serving.catalog`: the model names it answers to (base models, ``RUN@ITER``, ``RUN``, published);
* :mod:`~services.serving.pool`: one model worker per base (:class:`~services.inference.service.ModelService`),
  adapters swapped in it;
* :mod:`~services.serving.protocol`: OpenAI request fields to ForgeLLM requests, replies, chunks and errors;
* :mod:`~services.serving.server`: the Starlette app and the uvicorn server (a thread, or the CLI's foreground).

No NiceGUI here; the access gate for the LAN (token, Host, Origin) is handed in by ``app``.
"""
