"""pd-agent: the per-node daemon that makes its node match its assignment."""
