"""The gRPC API stubs, generated from protos/gptserve/v1 when the package is built (setup.py)."""
