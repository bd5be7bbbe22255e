"""Local tooling: several agents on loopback addresses of one machine (demo, benches, tests)."""
