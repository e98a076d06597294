"""The one place pytest meets the harness. Plugins (loaded by pytest, never imported by one another):
plugin (the entry point), core (options, markers, collection, Unsupported -> skip), health, fixtures,
memory, race, outcome. Plain modules they share: options (every option, typed accessors), ktap."""
