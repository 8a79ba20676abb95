"""Family- and tool-specific code, installed as ``flashar_adapt.integrations``.

Each module is a plugin: ``pyproject.toml`` declares its runners, model formats and tokenizer
kinds as entry points, and the core finds them there (``flashar_adapt.plugins``). Importing
this package imports none of them, so a family whose optional dependency is missing (e.g.
transformers) costs nothing to the others."""
