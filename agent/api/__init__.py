"""The agent's REST app: node routes and auth (`app`), cluster routes served by every agent (`cluster`)."""
