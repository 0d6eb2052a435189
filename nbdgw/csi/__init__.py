"""Generated gRPC code of the CSI subset nbdgw serves (proto/nbdgw/csi/)."""
