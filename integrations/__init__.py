"""Family- and tool-specific code, installed as ``flashar_adapt.integrations``.

Importing this package registers the shipped backends ("llamagen", "transformers")."""
from . import hf, llamagen  # noqa: F401
