"""The gRPC API stubs, generated from protos/gptserve/v1 (`make protos`)."""
