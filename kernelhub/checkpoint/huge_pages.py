"""Tensors copied into one buffer backed by 2 MiB pages, where the OS gives them (Linux).

A packed decode step streams every weight once per token: about 100 MB for SmolLM2 Q4_1, 25,000
pages of 4 KB. Each page costs the CPU a TLB miss and a page walk, and the page tables are no longer
in cache when the next token comes round. In 2 MiB pages the same weights take about 50 entries.
Measured on a 2-core AVX-512 CPU: compiled decode about 9% faster, eager about 4%.

The buffer is one uint8 tensor aligned to 2 MiB. It is marked `madvise(MADV_HUGEPAGE)` before
anything is written to it, so the pages it faults in are huge ones when the kernel's transparent
huge pages are "always" or "madvise". Where they are "never", or the call is refused, or the OS is
not Linux, the copies are ordinary memory. Results are the same either way; only speed differs.

>>> a, b = torch.arange(6, dtype=torch.uint8).reshape(2, 3), torch.ones(5, dtype=torch.uint8)
>>> a2, b2 = in_huge_pages([a, b])
>>> torch.equal(a, a2), torch.equal(b, b2), a2.untyped_storage().data_ptr() == b2.untyped_storage().data_ptr()
(True, True, True)
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <linux/mman.h>
ALIGN = 64  # each tensor starts on a cache line


def in_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of the CPU `tensors`, views of one 2 MiB-aligned buffer asked to be backed by huge
    pages (see the module docstring), in the order given. A tensor listed twice is copied twice: pass
    each once."""
    sizes = [-(-t.nbytes // ALIGN) * ALIGN for t in tensors]
    total = sum(sizes)
    if not total:
        return [t.contiguous() for t in tensors]
    whole = -(-total // HUGE_PAGE) * HUGE_PAGE  # the last page is advised whole: the buffer reaches past it
    buffer = torch.empty(whole + HUGE_PAGE, dtype=torch.uint8)
    start = -buffer.data_ptr() % HUGE_PAGE
    _advise_huge(buffer.data_ptr() + start, whole)
    out, at = [], start
    for t, size in zip(tensors, sizes):
        view = buffer[at:at + t.nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
        at += size
    return out


def _advise_huge(address: int, length: int) -> None:
    """Ask Linux to back [address, address + length) with huge pages. A refusal costs only speed: logged,
    not raised."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.madvise(address, length, MADV_HUGEPAGE):
            logger.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:
        logger.debug("madvise is not available: %s", e)
