"""The FastAPI server around ChatStream."""
