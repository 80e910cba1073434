"""The zarr v2 reader on hand-written arrays: any region of any layout equals numpy's slice of the whole array."""
import json
import os

import numpy as np
import pytest
import torch

from nemotron.checkpoint.shards import CheckpointError
from nemotron.checkpoint.zarr import ZarrArray


def write_array(path, data, chunks, dtype, order="C", separator=None, raw=None):
    """Write `data` as an uncompressed zarr v2 array (edge chunks padded to full size, as zarr does)."""
    os.makedirs(path)
    meta = {"zarr_format": 2, "shape": list(data.shape), "chunks": list(chunks), "dtype": dtype,
            "compressor": None, "fill_value": None, "filters": None, "order": order}
    if separator is not None:
        meta["dimension_separator"] = separator
    with open(os.path.join(path, ".zarray"), "w") as f:
        json.dump(meta, f)
    grid = [range(-(-n // c)) for n, c in zip(data.shape, chunks)]
    store = raw if raw is not None else data
    for index in np.ndindex(*[len(g) for g in grid]):
        block = np.zeros(chunks, dtype=store.dtype)
        src = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, data.shape))
        block[tuple(slice(0, s.stop - s.start) for s in src)] = store[src]
        key = (separator or ".").join(map(str, index))
        file = os.path.join(path, *key.split("/"))
        os.makedirs(os.path.dirname(file), exist_ok=True)
        with open(file, "wb") as f:
            f.write(block.tobytes(order=order))


REGIONS = [None, (slice(0, 7), slice(0, 10)), (slice(2, 5), slice(3, 9)), (slice(4, 5), slice(0, 1)),
           (slice(6, 7), slice(9, 10)), (slice(3, 3), slice(0, 10))]


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f2", "<i8", "bfloat16"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("separator", [None, "/"])
def test_regions_equal_numpy(dtype, order, separator, tmp_path):
    g = np.random.default_rng(0)
    full = g.standard_normal((7, 10)).astype(np.float32)
    if dtype == "bfloat16":
        expect = torch.from_numpy(full).to(torch.bfloat16)
        raw = expect.view(torch.uint16).numpy()
        write_array(str(tmp_path / "a"), raw, (3, 4), dtype, order, separator, raw=raw)
    else:
        data = (full * 100).astype(np.dtype(dtype))
        expect = torch.from_numpy(data.astype(data.dtype.newbyteorder("=")))
        write_array(str(tmp_path / "a"), data, (3, 4), dtype, order, separator)
    array = ZarrArray(str(tmp_path / "a"), "t")
    assert array.shape == (7, 10) and array.torch_dtype == expect.dtype
    for region in REGIONS:
        got = array.read(region)
        want = expect if region is None else expect[region]
        assert got.dtype == want.dtype and torch.equal(got, want), region


def test_reads_only_overlapping_chunks(tmp_path, monkeypatch):
    data = np.arange(6 * 8, dtype="<f4").reshape(6, 8)
    write_array(str(tmp_path / "a"), data, (2, 4), "<f4")
    array = ZarrArray(str(tmp_path / "a"), "t")
    opened = []
    real = np.memmap
    monkeypatch.setattr(np, "memmap", lambda p, *a, **k: opened.append(os.path.basename(p)) or real(p, *a, **k))
    assert torch.equal(array.read((slice(2, 4), slice(4, 8))), torch.from_numpy(data[2:4, 4:8]))
    assert opened == ["1.1"]


def test_out_of_range_region(tmp_path):
    write_array(str(tmp_path / "a"), np.zeros((4, 4), "<f4"), (2, 2), "<f4")
    with pytest.raises(CheckpointError, match="out of range"):
        ZarrArray(str(tmp_path / "a"), "t").read((slice(0, 5), slice(0, 4)))


@pytest.mark.parametrize("field,value,message", [("dtype", "|O", "unsupported dtype"),
                                                 ("zarr_format", 3, "zarr_format"),
                                                 ("filters", [{"id": "delta"}], "filters"),
                                                 ("order", "K", "order"), ("chunks", [0, 2], "chunks")])
def test_bad_metadata(field, value, message, tmp_path):
    write_array(str(tmp_path / "a"), np.zeros((4, 4), "<f4"), (2, 2), "<f4")
    meta_path = tmp_path / "a" / ".zarray"
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message) as info:
        ZarrArray(str(tmp_path / "a"), "my.tensor")
    assert "my.tensor" in str(info.value) and str(meta_path) in str(info.value)
