"""The bitwise comparison that every resume test relies on must see every difference."""
import torch

from compare_checkpoints import state_differences


def state():
    return {"model": {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor(3.0)},
            "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "lr": [0.1]},
            "rng": {"python": {"state": torch.arange(4)}}, "meta": {"saved_at": 1.0}}


def test_identical_states_have_no_differences():
    assert state_differences(state(), state()) == []


def test_meta_is_ignored():
    other = state()
    other["meta"]["saved_at"] = 2.0
    assert state_differences(state(), other) == []


def test_one_ulp_in_a_weight_is_a_difference():
    other = state()
    other["model"]["w"][1] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))
    assert state_differences(state(), other) == ["/model/w: 1 of 2 elements differ"]


def test_zero_dim_tensors_dtypes_and_plain_values_are_compared():
    other = state()
    other["model"]["step"] = torch.tensor(4.0)
    other["optimizer"]["lr"] = [0.2]
    other["rng"]["python"]["state"] = torch.arange(4, dtype=torch.int32)
    found = state_differences(state(), other)
    assert len(found) == 3, found


def test_negative_zero_and_nan_are_compared_by_bits():
    assert state_differences({"x": torch.tensor([0.0])}, {"x": torch.tensor([-0.0])}) != []
    nan = torch.tensor([float("nan")])
    assert state_differences({"x": nan}, {"x": nan.clone()}) == []


def test_missing_keys_are_reported():
    other = state()
    del other["optimizer"]["lr"]
    assert state_differences(state(), other) == ["/optimizer/lr: only in first"]
