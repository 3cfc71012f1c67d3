"""The hookledger service: aiohttp app (receiver, admin API, feed, dashboard), dispatcher, CLI."""
