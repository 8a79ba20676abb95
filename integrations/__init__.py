"""Family- and tool-specific code, installed as ``flashar_adapt.integrations``.

Importing this package registers the shipped backends ("llamagen", "transformers", "emu3p5")."""
from . import emu3p5, hf, llamagen, transformers_vq  # noqa: F401
