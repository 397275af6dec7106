"""LocalExperts: this rank's copies, quantized on load, one grouped call per format, rows in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnq_ep.balance import SlotTable
from rnq_ep.experts import LocalExperts
from rnq_ep.kernels.reference import grouped_swiglu_reference
from rnq_ep.quant import dequantize, quantize
from rnq_ep.specs import FORMATS

E, H, I = 6, 40, 24  # awkward sizes: not multiples of any block


def _weights(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w_gate_up = (torch.randn(E, 2 * I, H, generator=gen) * H**-0.5).to(torch.bfloat16)
    w_down = (torch.randn(E, H, I, generator=gen) * I**-0.5).to(torch.bfloat16)
    return w_gate_up, w_down


def _table(slots: list[tuple[int, int, str]], num_gpus: int = 2) -> SlotTable:
    """Slots (gpu, expert, fmt); shares are not used by LocalExperts."""
    gpu, expert, fmt = zip(*slots)
    return SlotTable.from_arrays(
        np.array(gpu), np.array(expert), np.array([FORMATS.index(f) for f in fmt], np.int8),
        np.ones(len(slots)), num_gpus, E,
    )


MIXED = [(0, 0, "bf16"), (0, 1, "int8"), (0, 2, "bf16"), (0, 3, "int4"), (0, 4, "int8"),
         (1, 5, "bf16"), (1, 0, "int4"), (1, 1, "bf16"), (1, 2, "bf16"), (1, 3, "bf16"), (1, 4, "bf16")]


def _dense_reference(table: SlotTable, rank: int, w_gate_up, w_down, x, offsets, row_weight) -> torch.Tensor:
    """Every local copy's dequantised weights stacked format-major (the order rows arrive in), one reference call."""
    local = np.flatnonzero(table.gpu == rank)
    local = local[np.lexsort((local, table.fmt[local]))]
    gate_up = torch.stack([dequantize(quantize(w_gate_up[table.expert[s]], FORMATS[table.fmt[s]])) for s in local])
    down = torch.stack([dequantize(quantize(w_down[table.expert[s]], FORMATS[table.fmt[s]])) for s in local])
    return grouped_swiglu_reference(x, gate_up, down, offsets, row_weight)


def _rows(rows_per_copy: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    n = sum(rows_per_copy)
    offsets = torch.tensor([0, *np.cumsum(rows_per_copy)], dtype=torch.int32)
    return torch.randn(n, H, generator=gen), offsets, torch.rand(n, generator=gen)


def test_keeps_only_this_ranks_copies_in_table_order():
    experts = LocalExperts(_table(MIXED), 0, *_weights())
    assert experts.experts.tolist() == [0, 1, 2, 3, 4]
    assert [g.fmt for g in experts.groups] == ["bf16", "int8", "int4"]


@pytest.mark.parametrize("rank, rows_per_copy", [(0, [3, 0, 5, 1, 7]), (1, [2, 4, 0, 1, 9, 3])])
def test_mixed_formats_equal_the_reference_on_dequantised_weights(rank, rows_per_copy):
    w_gate_up, w_down = _weights()
    table = _table(MIXED)
    x, offsets, row_weight = _rows(rows_per_copy)
    out = LocalExperts(table, rank, w_gate_up, w_down, backend="torch")(x, offsets, row_weight)
    expected = _dense_reference(table, rank, w_gate_up, w_down, x, offsets, row_weight)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_triton_backend_matches_the_torch_backend():
    w_gate_up, w_down = _weights()
    table = _table(MIXED)
    x, offsets, row_weight = _rows([3, 0, 5, 1, 7])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    triton = LocalExperts(table, 0, w_gate_up.to(device), w_down.to(device), backend="triton")
    out = triton(x.to(device).bfloat16(), offsets.to(device), row_weight.to(device))
    expected = LocalExperts(table, 0, w_gate_up, w_down, backend="torch")(x.bfloat16().float(), offsets, row_weight)
    torch.testing.assert_close(out.float().cpu(), expected, rtol=2e-2, atol=2e-2)


def test_no_rows_gives_an_empty_output():
    x, offsets, row_weight = _rows([0, 0, 0, 0, 0])
    out = LocalExperts(_table(MIXED), 0, *_weights(), backend="torch")(x, offsets, row_weight)
    assert out.shape == (0, H)


def test_output_keeps_the_input_dtype():
    x, offsets, row_weight = _rows([1, 2, 3, 4, 5])
    out = LocalExperts(_table(MIXED), 0, *_weights(), backend="torch")(x.bfloat16(), offsets, row_weight)
    assert out.dtype == torch.bfloat16


def test_wrong_number_of_offsets_is_rejected():
    x, offsets, row_weight = _rows([1, 2, 3])
    with pytest.raises(ValueError, match="local_offsets has 4 entries, expected C\\+1 = 6"):
        LocalExperts(_table(MIXED), 0, *_weights(), backend="torch")(x, offsets, row_weight)


def test_weights_of_the_wrong_shape_are_rejected():
    w_gate_up, w_down = _weights()
    with pytest.raises(ValueError, match="does not match w_down"):
        LocalExperts(_table(MIXED), 0, w_gate_up[:, :-1], w_down)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown expert backend 'cuda'"):
        LocalExperts(_table(MIXED), 0, *_weights(), backend="cuda")


def test_own_experts_weights_build_the_same_copies_as_full_tensors():
    w_gate_up, w_down = _weights()
    table = _table(MIXED)
    own = {e: (w_gate_up[e], w_down[e]) for e in table.expert[table.gpu == 1].tolist()}
    from_full = LocalExperts(table, 1, w_gate_up, w_down, backend="torch")
    from_own = LocalExperts(table, 1, own, None, backend="torch", hidden_size=H)
    x, offsets, row_weight = _rows([2, 4, 0, 1, 9, 3])
    torch.testing.assert_close(from_own(x, offsets, row_weight), from_full(x, offsets, row_weight), rtol=0, atol=0)
    for full, mine in zip(from_full.groups, from_own.groups, strict=True):
        assert torch.equal(dequantize(full.stored_gate_up), dequantize(mine.stored_gate_up))
        assert torch.equal(dequantize(full.stored_down), dequantize(mine.stored_down))


def test_a_weights_callable_is_asked_only_for_this_ranks_experts():
    w_gate_up, w_down = _weights()
    asked = []
    LocalExperts(_table(MIXED), 0, lambda e: asked.append(e) or (w_gate_up[e], w_down[e]), None, hidden_size=H)
    assert sorted(asked) == [0, 1, 2, 3, 4]


def test_own_experts_weights_of_the_wrong_hidden_size_are_rejected():
    w_gate_up, w_down = _weights()
    with pytest.raises(ValueError, match="expert 0: gate_up \\(48, 40\\) and down \\(40, 24\\) do not match"):
        LocalExperts(_table(MIXED), 0, lambda e: (w_gate_up[e], w_down[e]), None, hidden_size=H + 1)
