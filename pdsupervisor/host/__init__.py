"""This machine: host facts read from /sys, /proc and psutil (`probes`), atomic files (`files`)."""
