"""Imported before anything else of bayeslora: quiets what third-party libraries print on import and is no news.

bitsandbytes (which PEFT imports when it is installed) warns on CPUs with bf16 units that an optional kernel package,
fetched from the Hub, is missing; its 4-bit path works without it, and the line preceded every command's output,
``--help`` included.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
