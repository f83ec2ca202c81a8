"""Log records of the libraries the worker uses that say nothing a user of llmq can act on, quietened one by one.

- bitsandbytes (0.50), on a CPU with AVX512-BF16, tries at import to fetch a fused nf4 matmul kernel from the model
  hub through the optional `kernels` package, and warns at every start that it could not ("Failed to load CPU
  gemm_4bit_forward from kernels-community: No module named 'kernels' ..."). llmq never fetches code from the hub;
  bitsandbytes then uses its own CPU kernels, which give the same results. The record is kept at DEBUG, with
  this explanation, instead of a WARNING at every worker start. Any other bitsandbytes record passes unchanged.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward from kernels-community"
BNB_KERNELS_NOTE = (
    "bitsandbytes: no hub-fetched fused CPU nf4 kernel (the optional `kernels` package is not installed; llmq "
    "fetches no code from the hub): nf4 layers use bitsandbytes' own CPU kernels"
)


class BitsandbytesKernelsNote(logging.Filter):
    """Turns bitsandbytes' warning about the missing `kernels` package into a DEBUG note; passes anything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(BNB_KERNELS_MESSAGE):
            record.msg, record.args = BNB_KERNELS_NOTE, ()
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quieten_library_logs() -> None:
    """Installs the filters above (idempotent); before the libraries are imported, as worker/__init__ does."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, BitsandbytesKernelsNote) for f in logger.filters):
        logger.addFilter(BitsandbytesKernelsNote())
