"""Generated gRPC code of the nbdgw public API (see proto/)."""
