"""The gRPC servicers, one module per service of ``proto/nbdgw/v1``, and what they share: the
reading of request names and page tokens (:mod:`names`) and the hand-built data messages of
StreamExtents (:mod:`framing`)."""
