"""Which form a small embedding table's token factor takes (:mod:`twolevel_kfac.curvature.
token_form`): the vector of frequencies where the optimizer reads nothing but ``G`` of an
untied table, the dense one-hot ``G`` elsewhere; two live optimizers that chose differently
for one table; checkpoints saved in the dense form."""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import twolevel_kfac as tk
from test_token_table import SEQUENCE, TokenNet, data, loss_fn
from twolevel_kfac.curvature import layer_types
from twolevel_kfac.curvature.kronecker import KroneckerFactors
from twolevel_kfac.curvature.tokens import TokenFactors
from twolevel_kfac.optim.construction import dense_tables

FORMS = [
    (tk.KFAC, {}, False, True),
    (tk.EKFAC, {}, False, True),
    (tk.TwoLevelKFAC, {}, False, True),
    (tk.TwoLevelKFAC, {"coarse_space": "spectral", "combination": "adef2"}, False, True),
    (tk.KPSVD, {}, False, False),
    (tk.KFACCorrected, {}, False, False),
    (tk.TwoLevelKFAC, {"fine": "kpsvd"}, False, False),
    (tk.KFAC, {"weight_sharing": "reduce"}, False, False),
    (tk.KFAC, {}, True, False),  # tied to its Linear head
]


@pytest.mark.parametrize(("optimizer", "kwargs", "tied", "vector"), FORMS)
def test_small_tables_keep_the_dense_block_where_the_options_read_it(
    optimizer: type, kwargs: dict, tied: bool, vector: bool
) -> None:
    net = TokenNet(tied=tied)
    opt = optimizer(net, lr=0.01, cov_interval=1, inv_interval=1, **SEQUENCE, **kwargs)
    factors = opt.preconditioner.factors["emb"]
    assert isinstance(factors, TokenFactors if vector else KroneckerFactors)
    line = next(row for row in opt.describe_blocks().splitlines() if "emb.weight" in row)
    assert ("token frequencies kept as a vector" in line) == vector, line
    tokens, y = data()
    targets = tokens if tied else y
    opt.zero_grad()
    F.cross_entropy(net(tokens).flatten(0, 1), targets.flatten()).backward()
    opt.step()  # the statistics are captured in the form chosen
    assert factors.factor_shapes() == (((4, 4), (20,)) if vector else ((4, 4), (20, 20)))


def test_an_optimizer_whose_table_form_was_changed_since_refuses_to_step() -> None:
    """A KPSVD built on the model after a KFAC gives the table the dense form: stepping the
    KFAC then is refused (its factors are the vector), naming the layer; nothing moves;
    once the KPSVD is dropped it steps. Rebinding one name to a new optimizer (the old one
    dropped) is not refused."""
    net = TokenNet()
    tokens, y = data()
    kfac = tk.KFAC(net, lr=0.01, **SEQUENCE)
    kpsvd = tk.KPSVD(net, lr=0.01, **SEQUENCE)
    loss_fn(net, tokens, y).backward()
    kpsvd.step()
    before = [p.detach().clone() for p in net.parameters()]
    kpsvd.zero_grad()
    loss_fn(net, tokens, y).backward()
    with pytest.raises(ValueError, match=r"layer 'emb'.*built on the model since keeps it as a"):
        kfac.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    del kpsvd  # its choice goes with it: the KFAC steps again (on a new batch's statistics)
    kfac.zero_grad()
    loss_fn(net, tokens, y).backward()
    kfac.step()
    assert not all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    opt = tk.KFAC(net, lr=0.01, **SEQUENCE)
    opt = tk.KPSVD(net, lr=0.01, **SEQUENCE)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(net, tokens, y).backward()
        opt.step()


def resumed_from_dense(optimizer: type, settings: dict) -> torch.optim.Optimizer:
    """Three steps of ``optimizer`` with the table dense, its checkpoint loaded into one of
    the vector form on a copy of the model, three more steps of each: the same parameters
    (the dense one is returned)."""
    tokens, y = data()
    net = TokenNet()
    with dense_tables():
        dense = optimizer(net, **settings)
    for _ in range(3):
        dense.zero_grad()
        loss_fn(net, tokens, y).backward()
        dense.step()
    twin = copy.deepcopy(net)
    resumed = optimizer(twin, **settings)
    resumed.load_state_dict(copy.deepcopy(dense.state_dict()))  # (not shared with it)
    assert isinstance(resumed.preconditioner.factors["emb"], TokenFactors)
    for model, opt in ((net, dense), (twin, resumed)):
        for _ in range(3):
            opt.zero_grad()
            loss_fn(model, tokens, y).backward()
            opt.step()
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    return dense


def test_a_dense_checkpoint_of_an_untied_table_loads_as_its_frequencies(float64: None) -> None:
    """A checkpoint saved while small tables were dense (before 2026-12-09) resumes with
    the same steps; one whose ``G`` is not diagonal is refused by name."""
    settings = {"lr": 0.1, "cov_interval": 2, "inv_interval": 2, **SEQUENCE}
    dense = resumed_from_dense(tk.KFAC, settings)
    net = TokenNet()
    state = dense.state_dict()
    emb = state["preconditioner"]["factors"]["emb"]
    emb["G"] = emb["G"] + 1e-3  # a tied head's G: not diagonal
    with pytest.raises(ValueError, match=r"layer 'emb'.*not of this layer's block"):
        tk.KFAC(net, **settings).load_state_dict(state)


def test_a_checkpoint_of_the_vector_form_into_a_dense_optimizer_names_the_options() -> None:
    net = TokenNet()
    opt = tk.KFAC(net, lr=0.1, **SEQUENCE)
    tokens, y = data()
    loss_fn(net, tokens, y).backward()
    opt.step()
    reduce = tk.KFAC(copy.deepcopy(net), lr=0.1, weight_sharing="reduce", **SEQUENCE)
    with pytest.raises(ValueError, match=r"layer 'emb'.*weight_sharing='reduce'"):
        reduce.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("rows", [20, 5000])
def test_adaptive_damping_reads_a_float32_tables_statistics(rows: int) -> None:
    """The exact Fisher products of adaptive damping cast the step's direction to the
    statistics' dtype, not to the token ids' float64 (raised before 2026-12-09)."""
    net = TokenNet(vocabulary=rows)
    tokens, y = data(rows)
    opt = tk.KFAC(net, lr=0.1, adaptive_damping=True, fisher="empirical", **SEQUENCE)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(net, tokens, y)
        loss.backward()
        return loss

    before = net.emb.weight.detach().clone()
    for _ in range(3):
        opt.step(closure)
    assert isinstance(opt.preconditioner.factors["emb"], TokenFactors)
    assert torch.isfinite(net.emb.weight).all() and not torch.equal(net.emb.weight, before)


def test_the_dense_inverse_of_a_table_is_the_dense_paths(float64: None) -> None:
    """``FineLevel.dense_inverse`` (the oracles' and the analysis' dense ``M_i⁻¹``) of a
    table in the vector form equals the dense form's (it read a dense ``G``)."""
    tokens, y = data()
    inverses = []
    for dense in (True, False):
        net = TokenNet()
        with dense_tables() if dense else contextlib.nullcontext():
            opt = tk.KFAC(net, lr=0.1, cov_interval=1, inv_interval=1, **SEQUENCE)
        loss_fn(net, tokens, y).backward()
        opt.step()
        inverses.append(opt.preconditioner.fine.dense_inverse("emb", opt.preconditioner.damping))
    assert inverses[0].shape == (20 * 4, 20 * 4)
    torch.testing.assert_close(inverses[1], inverses[0], rtol=1e-10, atol=1e-12)


def test_a_large_table_under_reduce_keeps_the_expand_view_and_says_so(float64: None) -> None:
    """Over 4096 rows the table's token factor is a vector, which has no reduce view: its
    step is expand's (first step, the table's rows; no KL clip, which reads every layer),
    warned once (silent before 2026-12-09)."""
    tokens, y = data(5000)
    steps = []
    for sharing in ("expand", "reduce"):
        net = TokenNet(vocabulary=5000)
        before = net.emb.weight.detach().clone()
        opt = tk.KFAC(net, lr=0.1, weight_sharing=sharing, cov_interval=1, kl_clip=None, **SEQUENCE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                opt.zero_grad()
                loss_fn(net, tokens, y).backward()
                opt.step()
                steps.append(net.emb.weight.detach() - before) if _ == 0 else None
        told = [str(w.message) for w in caught if "keeps the expand view" in str(w.message)]
        assert len(told) == (sharing == "reduce"), told
        if told:
            assert "'emb': an embedding table of more than 4096 rows" in told[0]
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-12, atol=1e-14)


def test_an_ekfac_checkpoint_of_the_dense_form_resumes_in_token_order(float64: None) -> None:
    """EKFAC's scalings of a dense table are rows of ``G``'s eigenbasis (``eigh`` sorts
    the tokens by frequency): loaded into the vector form they are put in token order
    (read row by row, a resume was 1 % off, before 2026-12-09)."""
    settings = {"lr": 0.1, "cov_interval": 1, "inv_interval": 2, "ema_decay": 0.9, **SEQUENCE}
    resumed_from_dense(tk.EKFAC, settings)


def test_two_tables_sharing_a_weight_pad_each_with_its_own_token(float64: None) -> None:
    """Each call's ``padding_idx`` leaves its own positions out (one for the whole block
    was 0.12–0.71 off the dense path, tables over 4096 rows included, before 2026-12-09)."""

    class Shared(torch.nn.Module):
        def __init__(self, rows: int) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a = torch.nn.Embedding(rows, 4, padding_idx=0)
            self.b = torch.nn.Embedding(rows, 4)
            self.b.weight = self.a.weight
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.a(x) + self.b(x.flip(1))))

    tokens = torch.randint(0, 6, (6, 5), generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 3, (6, 5), generator=torch.Generator().manual_seed(5))
    settings = {"lr": 0.1, "cov_interval": 1, "kl_clip": None, **SEQUENCE}
    steps = []
    for form in ("dense", "vector", "large"):
        saved = layer_types.EMBEDDING_MAX_ROWS
        layer_types.EMBEDDING_MAX_ROWS = 4 if form == "large" else saved
        try:
            net = Shared(8)
            before = net.a.weight.detach().clone()
            with dense_tables() if form == "dense" else contextlib.nullcontext():
                opt = tk.KFAC(net, **settings)
            loss_fn(net, tokens, y).backward()
            opt.step()
        finally:
            layer_types.EMBEDDING_MAX_ROWS = saved
        steps.append(net.a.weight.detach() - before)
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(steps[2], steps[0], rtol=1e-10, atol=1e-12)


def test_a_half_factor_dtype_keeps_a_small_table_dense() -> None:
    """bf16 holds token ids up to 256 exactly, fp16 up to 2048: a small table keeps its
    dense block there (the vector form was refused at the first step, for 20 rows)."""
    net = TokenNet()
    opt = tk.KFAC(net, lr=0.01, factor_dtype=torch.bfloat16, **SEQUENCE)
    assert isinstance(opt.preconditioner.factors["emb"], KroneckerFactors)
    tokens, y = data()
    loss_fn(net, tokens, y).backward()
    opt.step()


def test_an_optimizer_chooses_for_its_own_tables_while_it_lives() -> None:
    """Another optimizer's choice for a table stands only while it is alive and only for
    the tables it preconditions: one over the head alone, one dropped, and one whose
    construction failed leave a KFAC on the table stepping (each refused it before the
    2026-12-09 review)."""
    net = TokenNet()
    tokens, y = data()
    kfac = tk.KFAC(net, lr=0.01, **SEQUENCE)
    head = tk.KPSVD(net, params=net.head.parameters(), lr=0.01, **SEQUENCE)
    dropped = tk.KPSVD(net, lr=0.01, **SEQUENCE)
    del dropped
    with pytest.raises(ValueError, match="power_iterations"):
        tk.KPSVD(net, lr=0.01, power_iterations=0, **SEQUENCE)
    for _ in range(2):
        kfac.zero_grad()
        loss_fn(net, tokens, y).backward()
        kfac.step()
    assert isinstance(kfac.preconditioner.factors["emb"], TokenFactors) and head is not None


class Bags(torch.nn.Module):
    """A multi-hot feature: a bag of ids per sample summed (``padding_idx=0`` fills it)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(12, 4, padding_idx=0)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.table(ids).sum(1)))


@pytest.mark.parametrize("dense", [False, True], ids=["vector", "dense"])
def test_padding_slots_of_a_bag_are_left_out(float64: None, dense: bool) -> None:
    """The padding slots of a pooled bag get an output gradient but give the table none:
    they are left out of ``A`` and ``T``, so the same samples padded to 5 or 10 slots take
    the same step (34–38 % apart, silently, before 2026-12-09)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 12, (6, 5), generator=gen)
    ids[torch.rand(6, 5, generator=gen) < 0.4] = 0  # (bags of 1–5 ids)
    y = torch.randint(0, 3, (6,), generator=gen)
    steps = []
    for length in (5, 10):
        net = Bags()
        before = net.table.weight.detach().clone()
        with dense_tables() if dense else contextlib.nullcontext():
            opt = tk.KFAC(net, lr=0.1, fisher="empirical", cov_interval=1, kl_clip=None)
        padded = torch.nn.functional.pad(ids, (0, length - 5))
        F.cross_entropy(net(padded), y).backward()
        opt.step()
        steps.append(net.table.weight.detach() - before)
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-10, atol=1e-12)
