"""`tunelab api`: an OpenAI-compatible HTTP server over the inference engine.

protocol.py (the wire format as pydantic data) -> app.py (HTTP routes, key, size cap, errors) -> serving.py
(requests -> prompts, token streams -> responses, tool calls via tools.py) -> scheduler.py (continuous batching on
the engine's slot decoder). server.py assembles them; tunelab.commands.api is the command line.
"""
