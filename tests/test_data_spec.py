"""The --data spec string: parsing, validation errors naming the field, round trip."""

import pytest
import torch

from fedpara.data.spec import DataSpec, format_data_spec, parse_data_spec

torch.set_num_threads(1)


def test_parse_full_example():
    spec = parse_data_spec("fashion-mnist,partition=dirichlet:0.5,clients=10,index=3,seed=0")
    assert spec == DataSpec(name="fashion-mnist", partition="dirichlet:0.5", clients=10,
                            index=3, seed=0)
    assert spec.path is None and spec.limit is None


@pytest.mark.parametrize("text", [
    "fashion-mnist",
    "fashion-mnist,path=/data/fmnist",
    "fashion-mnist,partition=shards:2,clients=100,index=99,seed=7,limit=600,test_size=50",
    "cifar10,path=/data/cifar-10-batches-bin",
    "cifar100,path=/data,label=coarse,partition=dirichlet:0.1,clients=5,index=1",
    "shakespeare,path=/data/texts,clients=100,index=7",
    "synthetic,n=64,shape=3x8x8,classes=4",
])
def test_round_trip(text):
    spec = parse_data_spec(text)
    assert parse_data_spec(str(spec)) == spec
    assert format_data_spec(spec) == str(spec)


def test_defaults_and_values():
    assert parse_data_spec("shakespeare").partition == "natural"
    assert parse_data_spec("cifar10").partition == "iid"
    assert parse_data_spec(" synthetic , shape=1X4 ").shape == (1, 4)
    assert parse_data_spec("fashion-mnist,partition=dirichlet:0.50").partition == "dirichlet:0.5"
    spec = parse_data_spec("fashion-mnist,clients=4,index=1")
    assert spec.replace(index=3).index == 3
    with pytest.raises(ValueError, match="index"):
        spec.replace(index=4)


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("mnist", "unknown dataset 'mnist'"),
    ("fashion-mnist,colour=red", "unknown key 'colour'"),
    ("fashion-mnist,n=5", "unknown key 'n' for fashion-mnist"),
    ("synthetic,path=/x", "unknown key 'path' for synthetic"),
    ("cifar10,label=fine", "unknown key 'label'"),
    ("fashion-mnist,clients", "not key=value"),
    ("fashion-mnist,=3", "not key=value"),
    ("fashion-mnist,seed=1,seed=2", "'seed' given twice"),
    ("fashion-mnist,clients=ten", "clients must be an integer"),
    ("fashion-mnist,clients=0", "clients must be >= 1"),
    ("fashion-mnist,clients=4,index=4", "index must be in 0..3"),
    ("fashion-mnist,index=-1", "index"),
    ("fashion-mnist,seed=-1", "seed"),
    ("fashion-mnist,limit=0", "limit"),
    ("fashion-mnist,test_size=0", "test_size"),
    ("fashion-mnist,partition=zipf", "partition: unknown partition 'zipf'"),
    ("fashion-mnist,partition=dirichlet:0", "partition"),
    ("fashion-mnist,partition=natural", "partition"),
    ("shakespeare,partition=iid", "partition"),
    ("cifar100,label=medium", "label"),
    ("synthetic,shape=1xAx2", "shape"),
    ("synthetic,shape=1x0", "shape"),
    ("synthetic,classes=0", "classes"),
    ("synthetic,n=0", "n must be"),
])
def test_errors_name_the_field(text, message):
    with pytest.raises(ValueError, match=message):
        parse_data_spec(text)


def test_dataclass_rejects_keys_that_do_not_apply():
    with pytest.raises(ValueError, match="path does not apply to synthetic"):
        DataSpec(name="synthetic", path="/x")
    with pytest.raises(ValueError, match="name"):
        DataSpec(name="imagenet")
