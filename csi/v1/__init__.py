"""Generated from proto/csi/v1 by scripts/gen-proto: do not edit."""
