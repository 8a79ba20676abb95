"""``python -m flashar_adapt.commands ...``: the ``flashar-adapt`` command (for launchers such
as ``torchrun`` and ``accelerate launch`` that run a module)."""

import sys

from . import main

sys.exit(main())
