"""Generated gRPC code of the CSI subset nbdgw serves (proto/csi/)."""
