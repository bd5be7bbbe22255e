"""Small asyncio helpers shared by the daemons: waiting and cancelling (`wait`), serving (`serve`)."""
