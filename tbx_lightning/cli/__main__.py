"""``python -m tbx_lightning.cli``: the same as the ``tbx-lightning`` command."""

import sys

from tbx_lightning.cli._main import main

sys.exit(main())
