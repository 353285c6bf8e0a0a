"""The OpenAI-compatible HTTP server: build_app(engine) in app.py; one module per job beside it."""
