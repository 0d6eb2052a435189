"""Generated from proto/nbdgw/v1 by scripts/gen-proto: do not edit."""
