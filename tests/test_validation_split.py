"""The validation split (data spec ``val=FRAC``): carved out of the train split, disjoint from every
client's shard and from the test split, deterministic, and what ``split=val`` evaluates on."""
import numpy as np
import pytest
import torch

from fedpara.data import (
    client_indices,
    load_client_data,
    load_test_data,
    parse_data_spec,
    validation_indices,
    validation_split,
)
from fedpara.data import shakespeare as sh

torch.set_num_threads(1)


def test_validation_split_is_disjoint_complete_sized_and_deterministic():
    fit, val = validation_split(1000, 0.1, seed=3)
    assert len(val) == 100 and len(fit) == 900
    assert np.intersect1d(fit, val).size == 0
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(1000))
    assert np.all(np.diff(fit) > 0) and np.all(np.diff(val) > 0)
    fit2, val2 = validation_split(1000, 0.1, seed=3)
    assert np.array_equal(val, val2) and np.array_equal(fit, fit2)
    assert not np.array_equal(val, validation_split(1000, 0.1, seed=4)[1])
    assert len(validation_split(7, 0.01)[1]) == 1  # at least one row, never all of them
    assert len(validation_split(7, 0.99)[0]) == 1


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, float("nan")])
def test_validation_split_rejects_bad_fractions(bad):
    with pytest.raises(ValueError):
        validation_split(100, bad)


def test_spec_keys_validate_and_round_trip():
    spec = parse_data_spec("fashion-mnist,val=0.1,split=val")
    assert spec.val == 0.1 and spec.split == "val"
    assert parse_data_spec(str(spec)) == spec
    assert str(parse_data_spec("fashion-mnist,val=0.2,clients=4,index=1")) == \
        "fashion-mnist,clients=4,index=1,val=0.2"
    with pytest.raises(ValueError, match="split=val needs val"):
        parse_data_spec("fashion-mnist,split=val")
    with pytest.raises(ValueError, match="val must be a fraction"):
        parse_data_spec("fashion-mnist,val=1.5")
    with pytest.raises(ValueError, match="split must be test or val"):
        parse_data_spec("fashion-mnist,val=0.1,split=train")


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5", "shards:2"])
def test_shards_and_validation_rows_are_disjoint_and_cover_the_train_split(partition):
    base = f"synthetic,n=400,classes=4,val=0.2,partition={partition},clients=4"
    val = validation_indices(base)
    assert len(val) == 80
    shards = [client_indices(f"{base},index={i}") for i in range(4)]
    every = np.concatenate(shards + [val])
    assert len(every) == 400 and np.array_equal(np.sort(every), np.arange(400))
    # without val the shards cover everything, so val really removes rows from the clients
    plain = np.concatenate([client_indices(f"synthetic,n=400,classes=4,partition={partition},clients=4,"
                                           f"index={i}") for i in range(4)])
    assert len(plain) == 400


def test_split_val_evaluates_exactly_the_held_out_train_rows():
    from fedpara.data import make_synthetic

    x, y = make_synthetic(400, (1, 28, 28), 4, "train")
    idx = validation_indices("synthetic,n=400,classes=4,val=0.25")
    ds = load_test_data("synthetic,n=400,classes=4,val=0.25,split=val")
    assert torch.equal(ds.tensors[0], x[idx]) and torch.equal(ds.tensors[1], y[idx])
    # a client's training rows never include them
    train, info = load_client_data("synthetic,n=400,classes=4,val=0.25,clients=2,index=0")
    own = client_indices("synthetic,n=400,classes=4,val=0.25,clients=2,index=0")
    assert np.intersect1d(own, idx).size == 0 and len(train) == len(own) == info["num_samples"]
    # the test split is untouched by val
    t0 = load_test_data("synthetic,n=400,classes=4")
    t1 = load_test_data("synthetic,n=400,classes=4,val=0.25")
    assert torch.equal(t0.tensors[0], t1.tensors[0])


def test_shakespeare_val_is_the_end_of_each_roles_train_windows(tmp_path):
    text = "HAMLET.\n" + " ".join(f"word{i} is here and there" for i in range(60)) + "\n"
    (tmp_path / "play_gut.txt").write_text(text)
    xtr, ytr, _ = sh.load_shakespeare("train", tmp_path)
    xf, yf, _ = sh.load_shakespeare("train", tmp_path, val_fraction=0.25)
    xv, yv, _ = sh.load_shakespeare("val", tmp_path, val_fraction=0.25)
    xte, _, _ = sh.load_shakespeare("test", tmp_path, val_fraction=0.25)
    assert len(yf) + len(yv) == len(ytr) and len(yv) == round(len(ytr) * 0.25)
    assert torch.equal(torch.cat([xf, xv]), xtr)  # train then val, in time order, no overlap
    assert torch.equal(xte, sh.load_shakespeare("test", tmp_path)[0])
    with pytest.raises(ValueError, match="val_fraction"):
        sh.load_shakespeare("val", tmp_path)
