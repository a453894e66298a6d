"""The reward server behind ``python -m coati.serve``: engine.py (model and scoring), batcher.py (dynamic batching),
app.py (request parsing and the FastAPI app) and connections.py (uvicorn connection limits)."""
