"""The reward server behind ``python -m coati.serve``: engine.py (model and scoring), batcher.py (dynamic batching),
app.py (request parsing and the FastAPI app), connections.py (uvicorn connection limits) and client.py (HTTP
clients and a TRL reward function)."""
