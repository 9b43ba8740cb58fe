"""Transport layer: process groups for collectives, message transports for the
parameter server, and gradient codecs (pure functions)."""
