"""``swarm api``: an OpenAI-compatible HTTP API and a chat page over the models a swarm serves.

Imports ``client/`` and ``swarm/`` (never the reverse); nothing else imports it.

- ``schemas``     requests and responses as declared dataclasses; request parsing that names the bad field
- ``errors``      ``ApiError`` and the one mapping from Swarm's exceptions to HTTP statuses (OpenAI's error shape)
- ``sampling``    penalties, temperature, top-p, seeded sampling and logprobs over one step's logits
- ``text``        incremental detokenization per choice, stop strings, tool-call sections held back from content
- ``tools``       tool-call formats read from chat templates (Qwen2.5/Qwen3 ``<tool_call>``, Llama 3.1 JSON)
- ``generation``  the per-request loop: local embeddings and head, remote blocks through one inference session
- ``catalog``     the models the swarm serves (DHT model index), their completeness, limits and lazy loading
- ``serving``     ``ApiService`` (peer, catalog, executor, ``--max-concurrent`` slots) and checked requests (``Job``)
- ``responses``   a job's events as OpenAI's completions, chat completions and stream chunks
- ``metrics``     Prometheus series: requests, errors, time to first token, tokens/s
- ``app``         the Starlette app (routes, auth, SSE streaming, disconnects) and ``run_api``
- ``static/``     the chat page (plain HTML/JS/CSS, no build step)
"""
