"""Generated gRPC stubs for protos/embedforge/v1/embedding.proto (regenerate: python scripts/gen_proto.py)."""
