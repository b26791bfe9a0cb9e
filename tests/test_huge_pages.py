"""Packed weights gathered into one buffer of huge pages: the copies are exact, keep their dtype and
shape, start on cache lines in one 2 MiB-aligned buffer, and the buffer carries the kernel's
huge-page advice (Linux marks the mapping `hg`). A packed GGUF load on the CPU puts every block
tensor there, the tied embedding and output projection still one tensor."""

import sys

import pytest
import torch

import kernelhub
from kernelhub.checkpoint.huge_pages import ALIGN, HUGE_PAGE, in_huge_pages
from kernelhub.testing.samples import smollm2_gguf


def vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address`."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_copies_are_exact_and_share_one_aligned_buffer():
    tensors = [torch.randint(0, 256, (7, 13), dtype=torch.uint8), torch.randn(5, 3).t(),  # not contiguous
               torch.arange(11, dtype=torch.int64), torch.empty(0, 4, dtype=torch.uint8)]
    copies = in_huge_pages(tensors)
    for t, c in zip(tensors, copies):
        assert c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous() and torch.equal(c, t)
        assert c.data_ptr() % ALIGN == 0
    storages = {c.untyped_storage().data_ptr() for c in copies}
    assert len(storages) == 1
    assert copies[0].data_ptr() % HUGE_PAGE == 0
    copies[0][0, 0] ^= 0xFF  # copies, not views of the inputs
    assert not torch.equal(copies[0], tensors[0])


def test_nothing_to_copy():
    assert in_huge_pages([]) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge-page advice is a Linux call; elsewhere the "
                    "copies are ordinary memory (the exactness test above still runs)")
def test_the_buffer_is_advised_huge():
    [copy] = in_huge_pages([torch.ones(3 << 20, dtype=torch.uint8)])
    assert "hg" in vm_flags(copy.data_ptr())
    assert "hg" not in vm_flags(torch.ones(3 << 20, dtype=torch.uint8).data_ptr())  # ordinary tensors are not


def test_a_packed_load_puts_every_block_tensor_in_one_buffer(monkeypatch, tmp_path):
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path))
    model = kernelhub.from_pretrained(smollm2_gguf())
    blocks = [m.qweight for m in model.modules() if isinstance(getattr(m, "qweight", None), torch.Tensor)]
    assert len(blocks) > 100
    assert len({b.untyped_storage().data_ptr() for b in blocks}) == 1
    assert model.lm_head.qweight is model.get_input_embeddings().qweight
    if sys.platform.startswith("linux"):
        assert "hg" in vm_flags(blocks[0].data_ptr())
