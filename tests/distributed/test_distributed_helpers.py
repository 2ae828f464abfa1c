"""pipeline.distributed without launching processes: sharding, errors, seeds, BatchNorm swap."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddp_helpers import train_sets

from fss.errors import ConfigError
from pipeline import distributed as D


def test_rank_slices_are_disjoint_and_cover_the_global_batch():
    batch = list(range(8, 16))
    slices = [D.rank_slice(batch, r, 4) for r in range(4)]
    assert slices == [[8, 9], [10, 11], [12, 13], [14, 15]]
    assert D.rank_slice(batch, 0, 1) == batch


def test_non_divisible_global_batch_is_a_one_line_error():
    with pytest.raises(ConfigError) as info:
        D.per_rank_batch_size(6, 4)
    message = str(info.value)
    assert "\n" not in message and "train.batch_size=6" in message and "4 processes" in message
    assert D.per_rank_batch_size(8, 4) == 2


def test_non_divisible_batch_through_the_cli(synthetic_data, tmp_path, monkeypatch, capsys):
    """What each torchrun process does: rank 0 prints one line, the others exit silently;
    the check runs before any process waits for another and before the run directory exists."""
    from pipeline.cli import main

    out = tmp_path / "run"
    args = ["fss", "train", "--method", "pfenet", "--dataset", "synthetic", "--fold", "0", "--out", str(out),
            "--iterations", "2", "--device", "cpu"]
    for item in train_sets(synthetic_data, **{"train.batch_size": 3, "knobs.reduce_dim": 16}):
        args += ["--set", item]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setattr("sys.argv", args)
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == 2
        err = capsys.readouterr()
        lines = [line for line in (err.out + err.err).splitlines() if line.strip()]
        if rank == 0:
            assert len(lines) == 1 and lines[0].startswith("error:"), lines
            assert "train.batch_size=3" in lines[0] and "not divisible by the 2 processes" in lines[0]
        else:
            assert lines == []
    assert not out.exists()


def test_epoch_loader_shards_equal_the_one_process_batches(synthetic_data):
    from pipeline.config import resolve_run_config
    from pipeline.train_data import build_training_episodes, epoch_loader

    config = resolve_run_config(method="pfenet", dataset="synthetic", fold=0, shot=1, iterations=2, device="cpu",
                                set_values=train_sets(synthetic_data, **{"knobs.reduce_dim": 16}))
    dataset = build_training_episodes(config)
    whole = next(iter(epoch_loader(dataset, 1, 2, 4, 0, False)))
    parts = [next(iter(epoch_loader(dataset, 1, 2, 4, 0, False, rank=r, world_size=2))) for r in (0, 1)]
    for key in ("query_images", "query_masks", "support_images", "support_masks", "class_ids"):
        assert parts[0][key].shape[0] == 2
        assert torch.equal(torch.cat([parts[0][key], parts[1][key]]), whole[key]), key


def test_rank_seeds_differ_per_rank_and_repeat():
    def draw(rank, iteration):
        D.seed_rank_step(7, rank, iteration)
        return torch.rand(4)

    assert torch.equal(draw(0, 3), draw(0, 3))
    assert not torch.equal(draw(0, 3), draw(1, 3))
    assert not torch.equal(draw(0, 3), draw(0, 4))


def test_global_batchnorm_swap_keeps_keys_and_single_process_maths():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    swapped = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    swapped.load_state_dict(plain.state_dict())
    keys = list(swapped.state_dict())
    assert D.use_global_batchnorm(swapped) == 1
    assert isinstance(swapped[1], D.GlobalBatchNorm2d) and list(swapped.state_dict()) == keys
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(swapped(x), plain(x))
    torch.testing.assert_close(swapped[1].running_var, plain[1].running_var)


def test_single_process_context_and_backends():
    ctx, device = D.setup_distributed("cpu", "auto", env={})
    assert ctx == D.SINGLE and not ctx.distributed and ctx.is_main and device.type == "cpu"
    assert D.resolve_backend("auto", torch.device("cpu")) == "gloo"
    with pytest.raises(ConfigError, match="needs CUDA"):
        D.resolve_backend("nccl", torch.device("cpu"))
    assert D.reduce_mean({"loss": torch.tensor(2.5)}, ctx) == ({"loss": 2.5}, False)
    assert D.reduce_mean({"loss": 1.0}, ctx, flag=True) == ({"loss": 1.0}, True)
    with pytest.raises(ConfigError, match="RANK"):
        D.setup_distributed("cpu", "auto", env={"WORLD_SIZE": "2"})
