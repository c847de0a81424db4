"""The API server: FastAPI routers plus background loops."""
