"""gptserve: the command line, and the gRPC API stubs generated from protos/ at install time (gptserve.v1)."""
