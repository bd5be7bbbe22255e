"""The REST API's contract as its callers see it: the client (the routes are served by `agent.api`)."""
