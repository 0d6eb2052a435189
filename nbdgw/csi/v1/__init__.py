"""Generated from proto/nbdgw/csi/v1 by scripts/gen-proto: do not edit."""
